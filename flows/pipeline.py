"""The lmforge pipeline, built by walking the stage table (``lm/stages.py``).

Each stage runs as its own subflow, named after it, around its one task (``tasks/stage.py``); the
pipeline flow runs, in table order, the stages its targets need (all of them by default), each
with the output folders of the stages it reads. One MLflow parent run holds a child run per stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from prefect import Flow, flow, get_run_logger
from prefect.runtime import flow_run

from lm.config import Config, display_uri
from lm.pipeline.retrain import config_digest, data_digest, digest_cache, source_digests
from lm.pipeline.stage import Stage
from lm.pipeline.workspace import stage_dirs
from lm.stages import STAGES, preflight, stages_for
from lm.tracking import runs as tracking
from lm.tracking.client import check_tracking_uri
from lm.tracking.summary import summarize_pipeline_run
from tasks.stage import run_in_child_run, stage_task


def stage_flow(stage: Stage) -> Flow:
    """The subflow of one stage: its task inside the stage's MLflow child run; returns its folder."""
    task_ = stage_task(stage)

    def run(
        config: Config, out_dir: str, inputs: dict[str, str] | None = None, parent_run_id: str | None = None
    ) -> str:
        return run_in_child_run(stage, task_, config, out_dir, inputs or {}, parent_run_id)

    run.__doc__ = stage.help
    return flow(run, name=stage.command)


def check(config: Config, stages: Sequence[Stage]) -> None:
    """Everything that can be checked before the first stage starts (the CLI runs it before Prefect
    starts; the flow again, for runs started from a deployment)."""
    check_tracking_uri(config.tracking_uri())
    preflight(config, stages)


# What started a pipeline run (the tag lmforge.trigger on its MLflow parent run).
Trigger = Literal["manual", "schedule", "new-data"]


def review_tags(config: Config, trigger: Trigger) -> dict[str, str]:
    """What a reviewer compares pipeline runs by: what started the run, the config's and the data's
    digests, and the run's page in the Prefect UI (when a Prefect server's URL is known)."""
    from prefect.context import FlowRunContext
    from prefect.utilities.urls import url_for

    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None and ctx.flow_run.auto_scheduled:
        trigger = "schedule"  # created by the deployment's cron schedule, whatever its parameters say
    tags = {
        "lmforge.trigger": trigger,
        "lmforge.config_hash": config_digest(config),
        "lmforge.data_digest": data_digest(source_digests(config.data, digest_cache(config)), config.data),
    }
    page = url_for("flow-run", obj_id=str(flow_run.id)) if flow_run.id else None
    if page:
        tags["lmforge.prefect_ui"] = page
    return tags


def build_pipeline(table: Sequence[Stage] = STAGES) -> Flow:
    """The pipeline flow of a stage table."""
    subflows = {stage.name: stage_flow(stage) for stage in table}

    @flow(name="lmforge-pipeline")
    def pipeline(config: Config, targets: list[str] | None = None, trigger: Trigger = "manual") -> dict[str, str]:
        """Run the stages ``targets`` need (stage or group names; all stages when empty); finished,
        unchanged stages are reused from cache. ``trigger`` says what started the run (a run created
        by a deployment's schedule is tagged ``schedule`` whatever it says). Returns each stage's
        output folder and the MLflow run."""
        stages = stages_for(targets or [], table, config)
        check(config, stages)
        dirs = stage_dirs(config, stages)
        uri = config.tracking_uri()
        parent = tracking.start_pipeline_run(
            config,
            {
                "lmforge.prefect_flow_run_id": str(flow_run.id),
                "lmforge.targets": ",".join(targets or ["all"]),
                **review_tags(config, trigger),
            },
        )
        shown = display_uri(uri)
        get_run_logger().info("MLflow parent run %s (tracking %s)", parent, shown)
        out: dict[str, str] = {"mlflow_run_id": parent, "tracking_uri": shown}
        ok = False
        try:
            for stage in stages:
                inputs = {name: out[name] for name in stage.inputs}
                out[stage.name] = subflows[stage.name](config, str(dirs[stage.name]), inputs, parent)
            # What a reviewer opens first: key metrics, datasets, the registered version, a description.
            summarize_pipeline_run(uri, parent)
            ok = True
            return out
        finally:
            tracking.end_run(uri, parent, ok)

    return pipeline


pipeline = build_pipeline()
