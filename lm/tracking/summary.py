"""The pipeline run's summary, on its parent run, where a reviewer looks first: the stages' child
runs are read, and the parent is given their key metrics, the datasets they logged, the model
version deploy registered, and the markdown description.

The MLflow side only: what the parent repeats of its stages and how the description reads are
``lm.tracking.report``'s (plain data in, numbers, tags and text out).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from lm.tracking import report
from lm.tracking.client import mlflow_client, user_errors
from lm.tracking.registry import EVAL_SET_TAG
from lm.tracking.runs import log_metrics, run_tree

NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)

# The stages' pictures, shown in the parent's description through the UI server's artifact endpoint
# (a path relative to the UI's root: the description is rendered there).
FIGURES = (("clean", "length_hist.png"), ("clean", "dropped_by_reason.png"), ("evaluate", "loss_curves.png"),
           ("evaluate", "confusion.png"))


@user_errors
def summarize_pipeline_run(uri: str, parent_run_id: str) -> str:
    """Give the parent run what its stages' child runs hold, where a reviewer looks first: the key
    metrics (lm.tracking.report.parent_metrics), the datasets the stages logged, the model version deploy
    registered (tags, a link, the logged model as the run's output) and the markdown description.
    Returns the description."""
    client = mlflow_client(uri)
    tree = run_tree(uri, parent_run_id)
    parent = tree["parent"]
    children = sorted(tree["children"].values(), key=lambda r: r.info.start_time)
    stages = {r.info.run_name: _stage_run(r) for r in children}
    seconds = dt.datetime.now().timestamp() - parent.info.start_time / 1000
    log_metrics(uri, parent_run_id, report.parent_metrics(stages, seconds))
    _copy_datasets(client, parent_run_id, children)
    champion = model_version = link = None
    deploy = stages.get("deploy")
    if deploy is not None and "deploy/version" in deploy.metrics:
        model_version, link, champion = _show_model_version(client, parent, deploy)
    note = report.summary_markdown(
        run_name=parent.info.run_name,
        config=parent.data.tags.get("lmforge.config", "?"),
        targets=parent.data.tags.get("lmforge.targets", "all"),
        commit=parent.data.tags.get("mlflow.source.git.commit"),
        seconds=seconds,
        stages=stages,
        champion=champion,
        model_version=model_version,
        model_link=link,
        figures=_figures(client, tree["children"]),
    )
    client.set_tag(parent_run_id, NOTE_TAG, note)
    return note


def _stage_run(run) -> report.StageRun:
    """A stage's child run as the report reads it (the system metrics left out)."""
    return report.StageRun(
        metrics={k: v for k, v in run.data.metrics.items() if not k.startswith("system/")},
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        seconds=(run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
    )


def _copy_datasets(client, parent_run_id: str, children: list) -> None:
    """The datasets each stage logged (documents, clean splits, evaluation sets), on the parent too."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    seen, inputs = set(), []
    for run in children:
        for di in run.inputs.dataset_inputs:
            d = di.dataset
            if (d.name, d.digest) not in seen:
                seen.add((d.name, d.digest))
                copy = Dataset(d.name, d.digest, d.source_type, d.source, d.schema, d.profile)
                inputs.append(DatasetInput(copy, tags=[InputTag(t.key, t.value) for t in di.tags]))
    if inputs:
        client.log_inputs(parent_run_id, datasets=inputs)


def _show_model_version(client, parent, deploy: report.StageRun) -> tuple[str, str, report.Champion | None]:
    """Tag the parent with the version deploy registered and its decision (report.parent_tags) and
    make the version's logged model the parent's output, so that the run page lists the version
    under "Registered models". Returns its models:/ URI, its page in the UI, and the champion
    deploy compared it with (None where no version held the alias)."""
    from mlflow.entities import LoggedModelOutput

    name = deploy.params["deploy.model_name"]
    version = client.get_model_version(name, str(int(deploy.metrics["deploy/version"])))
    model_version = f"models:/{name}/{version.version}"
    link = f"#/models/{name}/versions/{version.version}"
    for key, value in report.parent_tags(deploy, model_version).items():
        client.set_tag(parent.info.run_id, key, value)
    model_id = _logged_model_of(client, version)
    logged = {o.model_id for o in (parent.outputs.model_outputs if parent.outputs else [])}
    if model_id and model_id not in logged:
        client.log_outputs(parent.info.run_id, [LoggedModelOutput(model_id, step=0)])
    return model_version, link, _champion(client, deploy, version)


def _champion(client, deploy: report.StageRun, version) -> report.Champion | None:
    """The version that held the alias when deploy decided, with its registered evaluation metrics."""
    held = deploy.params.get("champion_version", "none")  # before the decision; this version on a rerun
    if held == "none":
        return None
    theirs = version if held == str(version.version) else client.get_model_version(version.name, held)
    return report.Champion(
        held,
        {k: float(v) for k, v in theirs.tags.items() if k.startswith("eval/")},
        same_set=theirs.tags.get(EVAL_SET_TAG) == deploy.params.get("eval_set"),
    )


def _figures(client, children: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for stage, name in FIGURES:
        if stage in children:
            run_id = children[stage].info.run_id
            if any(a.path == name for a in client.list_artifacts(run_id)):
                out.append((f"{stage}: {name}", f"get-artifact?path={name}&run_uuid={run_id}"))
    return out


def _logged_model_of(client, version) -> str | None:
    """The logged model a registered version was made from, tagged with the version
    (``mlflow.modelVersions``: how the UI goes from a run's logged model to its registered version).
    A sqlite registry keeps no ``model_id`` on the version: then it is the model its run logged."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model_id = version.model_id
    if not model_id:
        run = client.get_run(version.run_id)
        found = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{version.run_id}'", max_results=1
        )
        model_id = found[0].model_id if found else None
    if model_id:
        model = client.get_logged_model(model_id)
        linked = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        this = {"name": version.name, "version": str(version.version)}
        if this not in linked:
            client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, this])})
    return model_id
