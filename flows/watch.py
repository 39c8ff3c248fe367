"""The new-data trigger: a retrain starts when enough new or changed files appear in the data sources.

How: a small check flow (``lmforge-new-data``) served as the deployment ``lmforge-new-data/watch``
on an interval schedule (``retrain.check_every_s``, beside the retrain deployment: ``lmforge
schedule``). Each check reads the retrain deployment's config from the Prefect server (one source
of truth: a config edited in the Prefect UI is the one watched), digests the configured source
files, and starts the retrain deployment with ``trigger=new-data`` (``run_deployment(...,
timeout=0)``: the check does not wait for it) when all of these hold:

- no run of the retrain deployment is running, pending or late (the deployment's concurrency limit
  would cancel a second one anyway; the check does not even ask);
- a pipeline run of this config has finished before: the first model is trained by hand or by the
  schedule (``lmforge trigger retrain``), the trigger retrains it;
- the sources' data digest is not that of the last finished run, nor of a run started since (a
  failed run is not retried on the same data: that needs a person);
- compared by content sha256 with the ``provenance.csv`` of the last finished run's ingest, at
  least ``retrain.min_new_files`` files are new or changed, holding at least ``retrain.min_new_mb``.

Why not a Prefect event with a deployment trigger: Prefect does not watch file systems, so
something would still have to look at the files and emit the event, and the thresholds and the
comparison with the last finished run have to be applied before a run starts. One check flow does
both, in one place, and each check's log in the Prefect UI says why it did or did not start a run.
As a deployment it runs where the retrain runs (the same machine or work pool sees the same files).
What it reads of MLflow (the pipeline runs of the config, the last one's ingest folder) comes from
``lm.tracking.runs``.
"""

from __future__ import annotations

import datetime as dt

from prefect import flow, get_run_logger

from lm.config import Config
from lm.tracking.runs import pipeline_runs, stage_output

RETRAIN = "lmforge-pipeline/retrain"
PIPELINE_FLOW = "lmforge-pipeline"


def should_retrain(cfg: Config) -> tuple[bool, str]:
    """Whether the sources hold enough new data for a retrain of ``cfg``, and why (one line)."""
    from lm.data.ingest import PROVENANCE
    from lm.pipeline.retrain import data_digest, digest_cache, new_data, read_provenance, source_digests

    uri, experiment = cfg.tracking_uri(), cfg.tracking.experiment
    # The whole-pipeline runs of this config (a run of some stages only is no retrain), newest first.
    runs = pipeline_runs(uri, experiment, 50, config=cfg.name, targets="all")
    finished = next((r for r in runs if r["status"] == "FINISHED"), None)
    if finished is None:
        return False, (f"no finished pipeline run of config {cfg.name!r} in {experiment!r} yet: start the first "
                       "by hand (lmforge trigger retrain) or let the schedule do it")
    files = source_digests(cfg.data, digest_cache(cfg))
    digest = data_digest(files, cfg.data)
    since = runs[: runs.index(finished) + 1]  # the last finished run and every run started after it
    for run in since:
        if run["tags"].get("lmforge.data_digest") == digest:
            how = "finished" if run["status"] == "FINISHED" else run["status"].lower()
            return False, f"no new data: run {run['run_id']} ({how}) had the same data digest {digest[:12]}"
    folder = stage_output(uri, finished, "ingest")
    seen = read_provenance(folder / PROVENANCE) if folder and (folder / PROVENANCE).is_file() else {}
    new = new_data(files, seen)
    r = cfg.retrain
    if not new.enough(r):
        return False, (f"{new.describe()} since run {finished['run_id']}: below retrain.min_new_files="
                       f"{r.min_new_files} / retrain.min_new_mb={r.min_new_mb}")
    return True, f"{new.describe()} since run {finished['run_id']}"


def active_runs(client, deployment_id) -> list:
    """Runs of a deployment that are running, pending, being cancelled, or due (late)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    busy = (StateType.RUNNING, StateType.PENDING, StateType.CANCELLING, StateType.SCHEDULED)
    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(busy)))),
    )
    now = dt.datetime.now(dt.UTC)
    return [
        r for r in runs
        if r.state_type != StateType.SCHEDULED or (r.expected_start_time and r.expected_start_time <= now)
    ]


@flow(name="lmforge-new-data")
def new_data_check(deployment: str = RETRAIN) -> str:
    """Start a run of ``deployment`` (trigger new-data) when its data sources hold enough new or
    changed files since its last finished run (retrain.min_new_files, retrain.min_new_mb)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    log = get_run_logger()
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        busy = active_runs(client, dep.id)
    if busy:
        message = f"not checking: {deployment} has a run in progress ({busy[0].name}, {busy[0].state_name})"
        log.info(message)
        return message
    cfg = Config.model_validate(dep.parameters["config"])
    start, why = should_retrain(cfg)
    if not start:
        log.info(why)
        return why
    run = run_deployment(deployment, parameters={"trigger": "new-data"}, timeout=0)
    message = f"started {deployment} run {run.name} ({run.id}): {why}"
    log.info(message)
    return message
