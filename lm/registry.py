"""The MLflow model registry: register an exported model and promote it behind an alias only if
it beats the version that holds the alias now (a promotion gate, not a blind overwrite).
Registry stages are deprecated in MLflow 3; aliases (``models:/name@champion``) replace them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lm.stage import StageResult

log = logging.getLogger(__name__)


class LmforgePyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc face of an exported folder: a DataFrame with a ``text`` column in, labels out."""

    def load_context(self, context) -> None:
        from lm.serving import TextClassifier

        self.classifier = TextClassifier(context.artifacts["model"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        if isinstance(model_input, pd.DataFrame):
            texts = model_input["text"].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
        probs = self.classifier.predict_proba(texts)
        return pd.DataFrame(
            {"label": [self.classifier.labels[i] for i in probs.argmax(-1)], "score": probs.max(-1)}
        )


def _better(new: float, old: float | None, metric: str) -> bool:
    if old is None or math.isnan(old):
        return True
    lower_is_better = metric.endswith(("loss", "ppl", "bpb"))
    return new < old if lower_is_better else new > old


def deploy(
    uri: str,
    run_id: str,
    export_dir: Path,
    export_key: str,
    metrics: dict[str, float],
    model_name: str,
    alias: str,
    promote_metric: str,
    *,
    out_dir: Path | None = None,
) -> StageResult:
    """Log the exported folder as a pyfunc model, register a version, move ``alias`` if better."""
    client = MlflowClient(tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="lmforge text classifier")

    # The same export registered twice is one version: reruns with nothing changed add nothing.
    existing = client.search_model_versions(
        f"name = '{model_name}' and tag.lmforge_export_key = '{export_key}'"
    )
    if existing:
        version = existing[0]
        reused = True
    else:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("registry_model.py")),
                artifacts={"model": str(export_dir)},
                pip_requirements=["lmforge", "torch", "tokenizers", "safetensors", "pandas"],
            )
        version = mlflow.register_model(info.model_uri, model_name, tags={"lmforge_export_key": export_key})
        reused = False
        for k, v in metrics.items():
            client.set_model_version_tag(model_name, version.version, k, str(v))

    new_value = float(metrics.get(promote_metric, float("nan")))
    try:
        champion = client.get_model_version_by_alias(model_name, alias)
        old = champion.tags.get(promote_metric)
        old_value = float(old) if old is not None else None
        champion_version = champion.version
    except MlflowException:
        old_value, champion_version = None, None

    promoted = champion_version == version.version or _better(new_value, old_value, promote_metric)
    if promoted and champion_version != version.version:
        client.set_registered_model_alias(model_name, alias, version.version)
        log.info(
            "promoted %s version %s to @%s (%s %.4f vs %s)",
            model_name,
            version.version,
            alias,
            promote_metric,
            new_value,
            old_value,
        )
    elif not promoted:
        client.set_registered_model_alias(model_name, "challenger", version.version)
        log.info(
            "kept @%s on version %s: %s %.4f does not beat %.4f",
            alias,
            champion_version,
            promote_metric,
            new_value,
            old_value,
        )
    return StageResult(
        metrics={"deploy/version": float(version.version), "deploy/promoted": float(promoted)},
        params={"model_name": model_name, "alias": alias, "reused_version": reused},
        outputs={
            "model_uri": f"models:/{model_name}/{version.version}",
            "alias_uri": f"models:/{model_name}@{alias}",
        },
    )
