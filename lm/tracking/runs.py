"""The runs of a pipeline run in MLflow: start them, log what the stages produced, sample the
machine meanwhile, end them, and find them again (:func:`run_tree`, :func:`pipeline_runs`).

One parent run per pipeline run, one nested child run per stage. Run ids are passed explicitly
(``MlflowClient``, never the fluent API's global "active run"): Prefect runs tasks in threads, and
``MLFLOW_RUN_ID`` in the environment turns nesting into resuming (mlflow/mlflow#15713).

Beside it: the client and its errors (``client``), the training's metric sender
(``metric_sender``), the parent run's summary (``summary``), the registry (``registry``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import math
import os
import socket
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lm.config import Config, display_uri
from lm.errors import TrackingError
from lm.fileio import process_alive
from lm.pipeline.stage import StageResult
from lm.tracking.client import known_unreachable, mlflow_client, user_errors
from lm.tracking.metric_sender import UNSENT_METRICS, send_unsent_metrics

log = logging.getLogger(__name__)

# A cached stage's child run repeats its small artifacts (stats, tables, samples), not its weights.
CACHED_ARTIFACT_MAX_BYTES = 5_000_000

# MLflow 3's UI opens an experiment on its GenAI overview (traces) unless told it holds model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_VIEW = "workflowType=machine_learning"  # the UI's own switch between its GenAI and model-training views


def experiment_id(uri: str, name: str) -> str:
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            # Beside the database, not in whatever folder the process started in (MLflow's ./mlruns).
            location = (Path(uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
        except Exception:  # created by a concurrent process meanwhile
            exp = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND[0] not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def git_commit(root: Path | None = None) -> str | None:
    root = root or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = str(v)[:6000]
    return flat


@user_errors
def start_pipeline_run(cfg: Config, tags: Mapping[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run; returns its id."""
    uri = cfg.tracking_uri()
    client = mlflow_client(uri)
    exp = experiment_id(uri, cfg.tracking.experiment)
    name = f"{cfg.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    all_tags = {"lmforge.config": cfg.name, "mlflow.source.type": "JOB", **_process_tags()}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    all_tags.update(tags or {})
    run = client.create_run(exp, run_name=name, tags=all_tags)
    run_id = run.info.run_id
    _log_params(client, run_id, _flatten(cfg.model_dump(mode="json")))
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    end_abandoned_runs(client, exp, run_id)
    return run_id


def _process_tags() -> dict[str, str]:
    """Which process on which host owns a run: how a later run tells a killed one from a live one."""
    return {"lmforge.pid": str(os.getpid()), "lmforge.host": socket.gethostname()}


def end_abandoned_runs(client, experiment: str, by_run_id: str) -> list[str]:
    """Mark FAILED the runs this host's killed lmforge processes left RUNNING (kill -9, out of
    memory: nothing could end them), each tagged with the run that noticed; that run is tagged with
    the pipeline runs it took over from. Returns the ids of the ended runs."""
    host = socket.gethostname()
    running = client.search_runs(
        [experiment], filter_string=f"attributes.status = 'RUNNING' and tags.`lmforge.host` = '{host}'"
    )
    ended, parents = [], []
    for run in running:
        pid = int(run.data.tags.get("lmforge.pid", "0") or 0)
        if run.info.run_id == by_run_id or process_alive(pid):
            continue
        client.set_tag(run.info.run_id, "lmforge.abandoned", f"process {pid} on {host} ended without ending it "
                       f"(killed, or the tracking server was away); noticed by run {by_run_id}")
        client.set_terminated(run.info.run_id, "FAILED")
        ended.append(run.info.run_id)
        if "mlflow.parentRunId" not in run.data.tags:
            parents.append(run.info.run_id)
    if parents:
        client.set_tag(by_run_id, "lmforge.takes_over", ",".join(parents))
    return ended


@user_errors
def start_stage_run(uri: str, parent_run_id: str, stage: str, params: Mapping[str, Any]) -> str:
    """A nested run for one stage, with the stage's config values as params. Values still open
    (None: a tokenizer file's vocabulary) are left for the stage's result to fill, so that every
    param is logged once, with the value in force."""
    client = mlflow_client(uri)
    parent = client.get_run(parent_run_id)
    tags = {"mlflow.parentRunId": parent_run_id, "lmforge.stage": stage, **_process_tags()}
    tags.update({k: v for k, v in parent.data.tags.items() if k.startswith("lmforge.prefect")})
    run = client.create_run(parent.info.experiment_id, run_name=stage, tags=tags)
    _log_params(client, run.info.run_id, {k: v for k, v in params.items() if v is not None})
    return run.info.run_id


def _log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # the store's batch limit
        client.log_batch(run_id, params=items[i : i + 100])


@user_errors
def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(dt.datetime.now().timestamp() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if v is not None and math.isfinite(float(v))
    ]
    for i in range(0, len(items), 500):
        mlflow_client(uri).log_batch(run_id, metrics=items[i : i + 500])


def _output_kept(fn):
    """A stage's logging that failed says its finished output is kept, and how it gets logged."""

    @functools.wraps(fn)
    def wrapper(uri: str, run_id: str, out_dir: Path, *args, **kwargs):
        try:
            return fn(uri, run_id, out_dir, *args, **kwargs)
        except TrackingError as e:
            raise TrackingError(
                f"{e}. The stage's output {out_dir} is complete and kept: run the same command again once the "
                "server answers, and it is logged from there"
            ) from None

    return wrapper


@_output_kept
@user_errors
def log_stage_result(
    uri: str,
    run_id: str,
    out_dir: Path,
    result: StageResult,
    config_params: Mapping[str, Any],
    *,
    cached: bool,
    log_result_metrics: bool = True,
) -> None:
    """Log what a stage produced to its child run: metrics, params, artifacts, dataset inputs; and
    the training metrics its run could not send then (:data:`UNSENT_METRICS`), to their own run."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    send_unsent_metrics(uri, Path(out_dir) / UNSENT_METRICS)
    client = mlflow_client(uri)
    client.set_tag(run_id, "lmforge.cached", str(cached).lower())
    client.set_tag(run_id, "lmforge.output", str(out_dir))
    for key, value in result.tags.items():
        client.set_tag(run_id, key, value)
    # The result's params, and the config values that were still open at the start (see start_stage_run).
    _log_params(client, run_id, {**{k: v for k, v in config_params.items() if v is None}, **result.params})
    if log_result_metrics:
        log_metrics(uri, run_id, result.metrics)
    for rel in result.artifacts:
        path = (out_dir / rel).resolve()
        if not path.is_relative_to(out_dir.resolve()) or not path.exists():
            log.warning("artifact %s is not inside %s; not logged", rel, out_dir)
            continue
        if cached and path.is_file() and path.stat().st_size > CACHED_ARTIFACT_MAX_BYTES:
            continue  # uploaded by the run that made it (tag lmforge.output points at it); not again
        if path.is_dir():
            client.log_artifacts(run_id, str(path), rel)
        else:
            client.log_artifact(run_id, str(path))
    for rel in result.tables:
        path = (out_dir / rel).resolve()
        if path.is_relative_to(out_dir.resolve()) and path.is_file():
            # MlflowClient.log_table: the UI's evaluation/table view shows it row by row.
            import pandas as pd

            client.log_table(run_id, data=pd.read_csv(path, keep_default_na=False), artifact_file=Path(rel).with_suffix(".json").name)
    inputs = []
    for ds in result.datasets:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local files
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str((out_dir / ds["path"]).resolve()))
        meta = MetaDataset(source=source, name=ds.get("name"), digest=str(ds.get("digest", ""))[:36] or None)
        context = ds.get("context", "training")
        inputs.append(DatasetInput(meta._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def end_run(uri: str, run_id: str, ok: bool) -> None:
    if not ok and known_unreachable(uri):
        # Ending a failed run (in a finally) must not hide why it failed behind "unreachable" again;
        # the next pipeline run marks it FAILED (end_abandoned_runs).
        log.warning("MLflow run %s is left RUNNING: the tracking server %s did not answer", run_id, display_uri(uri))
        return
    _end_run(uri, run_id, ok)


@user_errors
def _end_run(uri: str, run_id: str, ok: bool) -> None:
    mlflow_client(uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


SYSTEM_METRICS_FINISH_SECONDS = 15.0


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str, interval: float = 5.0) -> Iterator[None]:
    """Sample CPU, memory (and GPU, where pynvml finds one) into the run while the block runs."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        # finish() waits for the monitor's thread, which may be inside a call to a tracking server that
        # is away (MLflow's retries: minutes); the stage does not wait that long for samples.
        import threading

        done = threading.Thread(target=monitor.finish, name="system-metrics-finish", daemon=True)
        done.start()
        done.join(SYSTEM_METRICS_FINISH_SECONDS)
        if done.is_alive():
            log.warning("system metrics: the tracking server %s did not answer within %.0f s; the last "
                        "samples are not logged", display_uri(uri), SYSTEM_METRICS_FINISH_SECONDS)


@user_errors
def run_page(uri: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The run's page in the MLflow UI that ``make ui`` starts (its runs table: the stages nest under it),
    in the UI's model-training view (MLflow 3.17 opens its GenAI view unless the link asks)."""
    return f"{ui}/#/experiments/{mlflow_client(uri).get_run(run_id).info.experiment_id}/runs/{run_id}?{UI_VIEW}"


@user_errors
def run_tree(uri: str, parent_run_id: str) -> dict[str, Any]:
    """The parent run and its children by stage name: what the summary and the tests read."""
    client = mlflow_client(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return {"parent": parent, "children": {r.info.run_name: r for r in children}}


@user_errors
def pipeline_runs(
    uri: str,
    experiment: str,
    last: int,
    *,
    config: str | None = None,
    targets: str | None = None,
    flow_run_id: str | None = None,
) -> list[dict[str, Any]]:
    """The ``last`` newest pipeline (parent) runs of ``experiment``, newest first, as plain dicts
    (run_id, experiment_id, name, start and end in ms, status, metrics, tags); none when the store or
    the experiment does not exist. Only those of config ``config``, of stages ``targets`` (``"all"``:
    the whole pipeline), or made by the Prefect flow run ``flow_run_id``, where given."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return []  # no store yet: reading must not create one
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    wanted = {"lmforge.config": config, "lmforge.targets": targets, "lmforge.prefect_flow_run_id": flow_run_id}
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=" and ".join(
            ["tags.mlflow.parentRunId IS NULL", *(f"tags.`{k}` = '{v}'" for k, v in wanted.items() if v is not None)]
        ),
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    return [
        {
            "run_id": r.info.run_id,
            "experiment_id": r.info.experiment_id,
            "name": r.info.run_name,
            "start": r.info.start_time,
            "end": r.info.end_time,
            "status": r.info.status,
            "metrics": dict(r.data.metrics),
            "tags": dict(r.data.tags),
        }
        for r in runs
    ]


@user_errors
def stage_output(uri: str, pipeline_run: Mapping[str, Any], stage: str) -> Path | None:
    """The output folder of a pipeline run's stage (its child run's tag lmforge.output), or None."""
    runs = mlflow_client(uri).search_runs(
        [pipeline_run["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{pipeline_run['run_id']}' and tags.`lmforge.stage` = '{stage}'",
        max_results=1,
    )
    out = runs[0].data.tags.get("lmforge.output") if runs else None
    return Path(out) if out else None
