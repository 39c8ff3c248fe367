"""The MLflow model registry: register an exported model and promote it behind an alias only if
it beats the version that holds the alias now (a promotion gate, not a blind overwrite).

Only ``MlflowClient`` calls, with the tracking URI and run id passed in: no global "active run",
which Prefect's task threads would share. Registry stages are deprecated in MLflow 3; aliases
(``models:/name@champion``) replace them, and a model is a LoggedModel linked to the run that
made it.

The registered model is self-contained: the export folder, lmforge's own ``lm`` package as code
(it is not published on PyPI), and pip requirements pinned to the versions it was made with. It
loads with ``mlflow.pyfunc.load_model`` through a models-from-code entry (``registry_model.py``),
so loading never unpickles anything (CVE-2024-37052).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import shutil
import tempfile
from pathlib import Path

from lm.config import DeployConfig
from lm.errors import ConfigError
from lm.stage import StageResult

log = logging.getLogger(__name__)

# What loading the model imports (lm.finetune.<method>, lm.model, lm.tokenizer, lm.config ...).
REQUIREMENTS = (
    "torch",
    "lightning",
    "tokenizers",
    "safetensors",
    "numpy",
    "pandas",
    "pyarrow",
    "pydantic",
    "pyyaml",
    "jinja2",  # chat templates (lm.chat)
)
EXPORT_KEY_TAG = "lmforge_export_key"


def pip_requirements() -> list[str]:
    """The model's requirements, pinned to this environment's versions (local build tags such as
    ``+cpu`` dropped: pip resolves the public release)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def _save_pyfunc(export_dir: Path, work: Path) -> Path:
    """The MLflow model folder for ``export_dir``: pyfunc files, the export, lmforge's code."""
    import mlflow
    from mlflow.models import Model, infer_signature
    from mlflow.models.model import MLMODEL_FILE_NAME

    from lm.finetune import method
    from lm.model import read_model_json

    code = work / "code" / "lm"
    # The package's sources only: compiled .pyc files carry the absolute path they were built from.
    shutil.copytree(Path(__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    predictor = method(read_model_json(export_dir)["task"]).Predictor(export_dir)
    example = predictor.input_example()
    model_dir = work / "model"
    mlflow.pyfunc.save_model(
        path=str(model_dir),
        python_model=str(Path(__file__).with_name("registry_model.py")),
        artifacts={"model": str(export_dir)},
        code_paths=[str(code)],
        pip_requirements=pip_requirements(),
        # Generation params (max_new_tokens, temperature ...) are part of the signature, so
        # predict(..., params=...) and the scoring server pass them through.
        signature=infer_signature(example, predictor.predict(example), params=getattr(predictor, "PARAM_DEFAULTS", None)),
        input_example=example,
    )
    # MLflow notes where the files came from (this machine's paths); loading reads only the copies.
    mlmodel = Model.load(str(model_dir / MLMODEL_FILE_NAME))
    pyfunc = mlmodel.flavors["python_function"]
    pyfunc["model_code_path"] = Path(pyfunc["model_code_path"]).name
    for artifact in pyfunc.get("artifacts", {}).values():
        artifact.pop("uri", None)
    mlmodel.save(str(model_dir / MLMODEL_FILE_NAME))
    return model_dir


def _better(new: float, old: float | None, mode: str) -> bool:
    if old is None or math.isnan(old):
        return True
    return new > old if mode == "max" else new < old


def deploy(
    cfg: DeployConfig,
    uri: str,
    run_id: str,
    export_dir: Path,
    export_key: str,
    metrics: dict[str, float],
    *,
    out_dir: Path | None = None,
) -> StageResult:
    """Register ``export_dir`` as a version of ``cfg.model_name`` (once per export); move
    ``cfg.alias`` to it if it beats the holder on ``cfg.promote_metric``, else tag it ``challenger``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if cfg.promote_metric not in metrics:
        raise ConfigError(
            f"deploy.promote_metric={cfg.promote_metric!r} is not among the evaluate stage's metrics: "
            f"{', '.join(sorted(metrics))}"
        )
    client = MlflowClient(tracking_uri=uri)
    name = cfg.model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="lmforge model (see each version's run)")

    # The same export registered twice is one version: reruns with nothing changed add nothing.
    existing = client.search_model_versions(f"name = '{name}' and tag.{EXPORT_KEY_TAG} = '{export_key}'")
    if existing:
        version, reused = existing[0], True
    else:
        experiment = client.get_run(run_id).info.experiment_id
        with tempfile.TemporaryDirectory(prefix="lmforge-model-") as work:
            model_dir = _save_pyfunc(Path(export_dir), Path(work))
            logged = client.create_logged_model(experiment, name="model", source_run_id=run_id)
            client.log_model_artifacts(logged.model_id, str(model_dir))
            client.finalize_logged_model(logged.model_id, "READY")
        tags = {EXPORT_KEY_TAG: export_key, **{k: str(v) for k, v in metrics.items()}}
        # The logged model's storage location, not models:/<id>: MLflow's registry store resolves such a
        # URI with the process-global tracking URI, not this client's (mlflow/store/model_registry).
        version = client.create_model_version(
            name, source=logged.artifact_location, run_id=run_id, tags=tags, model_id=logged.model_id
        )
        reused = False

    new_value = float(metrics[cfg.promote_metric])
    try:
        holder = client.get_model_version_by_alias(name, cfg.alias)
        old = holder.tags.get(cfg.promote_metric)
        old_value, holder_version = (float(old) if old is not None else None), str(holder.version)
    except MlflowException:
        old_value, holder_version = None, None

    this_version = str(version.version)
    promoted = holder_version == this_version or _better(new_value, old_value, cfg.promote_mode)
    if promoted and holder_version != this_version:
        client.set_registered_model_alias(name, cfg.alias, version.version)
        log.info(
            "promoted %s version %s to @%s (%s %.4f vs %s)",
            name,
            version.version,
            cfg.alias,
            cfg.promote_metric,
            new_value,
            old_value,
        )
    elif not promoted:
        client.set_registered_model_alias(name, "challenger", version.version)
        log.info(
            "kept @%s on version %s: %s %.4f does not beat %.4f",
            cfg.alias,
            holder_version,
            cfg.promote_metric,
            new_value,
            old_value,
        )
    return StageResult(
        metrics={"deploy/version": float(version.version), "deploy/promoted": float(promoted)},
        params={"reused_version": reused},
        outputs={
            "model_uri": f"models:/{name}/{version.version}",
            "alias_uri": f"models:/{name}@{cfg.alias}",
        },
    )


def _parse_registered(spec: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version)."""
    import re

    m = re.fullmatch(r"models:/([A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@([A-Za-z0-9][A-Za-z0-9._-]{0,127})|/(\d+))", spec)
    if not m:
        raise ConfigError(f"model.init_from={spec!r}: a registered model is models:/NAME@ALIAS or models:/NAME/VERSION")
    return m.group(1), m.group(2), m.group(3)


def _model_version(spec: str, uri: str):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, version = _parse_registered(spec)
    client = MlflowClient(tracking_uri=uri)
    try:
        if alias is not None:
            return client, client.get_model_version_by_alias(name, alias)
        return client, client.get_model_version(name, version)
    except MlflowException as e:
        raise ConfigError(f"model.init_from={spec!r} is not in the registry at {uri}: {e.message}") from None


def resolve_registered(spec: str, uri: str) -> dict[str, str]:
    """The version an alias points at now (aliases move: this is what a cache key must hold)."""
    _, mv = _model_version(spec, uri)
    return {"name": mv.name, "version": str(mv.version), "run_id": str(mv.run_id), "source": str(mv.source)}


def download_registered(spec: str, uri: str, dst: Path) -> tuple[Path, str]:
    """Download a registered lmforge model; returns (its export folder, the version)."""
    import mlflow
    import yaml

    client, mv = _model_version(spec, uri)
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(mv.name, mv.version), dst_path=str(dst), tracking_uri=uri
        )
    )
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    artifact = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {}).get("model")
    if not artifact:
        raise ConfigError(f"model.init_from={spec!r} is not an lmforge model (its MLmodel has no 'model' artifact)")
    folder = (local / artifact["path"]).resolve()
    if not folder.is_relative_to(local.resolve()) or not (folder / "model.json").is_file():
        raise ConfigError(f"model.init_from={spec!r}: its model artifact is not an lmforge export folder")
    return folder, str(mv.version)
