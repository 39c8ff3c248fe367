"""The one Prefect task every stage runs as, and the MLflow child run around it.

A stage's task calls ``lm.pipeline.stage.execute`` on its row of the stage table. It is cached across runs by
its output folder (itself the hash of all the stage's inputs and code): when the folder is
complete Prefect reports the task ``Cached`` and skips it. The child run is still created, tagged
``lmforge.cached=true``, and gets the stored metrics, so every pipeline run in MLflow shows the
whole tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from lm.config import Config
from lm.pipeline.stage import Stage, StageContext, StageResult, execute, is_complete
from lm.pipeline.workspace import config_values
from lm.tracking import runs as tracking
from tasks.cluster import dask_map
from tasks.common import stream_subprocess


def output_dir_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key = the stage's output folder, which is itself a hash of all the stage's inputs.
    Hashing a path (not Python objects) keeps keys stable across processes (PrefectHQ/prefect#12229)."""
    blob = f"{context.task.name}:{Path(parameters['out_dir']).resolve()}"
    return hashlib.sha256(blob.encode()).hexdigest()


def _launcher(cfg: Config, run_id: str | None):
    """How a stage runs a child process: streamed into the Prefect log, with the machine's CPU,
    memory (and GPU) sampled into the stage's run meanwhile."""

    def launch(cmd: list[str], env: dict[str, str] | None = None) -> None:
        uri = cfg.tracking_uri()
        monitor = tracking.system_metrics(uri, run_id) if run_id else contextlib.nullcontext()
        with monitor:
            stream_subprocess(cmd, env=env)

    return launch


class _ToRunLog(logging.Handler):
    """What the lm library logs while a stage runs (``logging.getLogger("lm....")``: what a data
    stage found, how it mixed its sources) goes to the stage's Prefect log: terminal and UI."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.run_logger = get_run_logger()

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, record.getMessage())


@contextlib.contextmanager
def _library_log_to_run_log():
    library, handler = logging.getLogger("lm"), _ToRunLog()
    level, propagate = library.level, library.propagate
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False  # said once, as the task's: not again by a handler of the root logger
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
        library.propagate = propagate


def stage_task(stage: Stage) -> Task:
    """The Prefect task of one stage: runs ``stage.run`` through ``execute``; returns the output folder."""

    def run(cfg: Config, out_dir: str, inputs: dict[str, str], run_id: str | None = None) -> str:
        ctx = StageContext(
            cfg,
            {name: Path(path) for name, path in inputs.items()},
            Path(out_dir),
            run_id,
            launch=_launcher(cfg, run_id),
            cluster_map=dask_map(cfg.data.dask_address) if cfg.data.dask_address else None,
        )
        with _library_log_to_run_log():
            execute(stage, ctx)
        return out_dir

    if stage.cached:
        return task(run, name=stage.name, cache_key_fn=output_dir_key, persist_result=True)
    # Not cached (the registry may have moved since): its I/O is retried, as Prefect's examples do.
    return task(run, name=stage.name, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)


def run_in_child_run(
    stage: Stage,
    stage_task_: Task,
    cfg: Config,
    out_dir: str,
    inputs: dict[str, str],
    parent_run_id: str | None,
) -> str:
    """Run one stage's task inside its own nested MLflow run and log what it produced."""
    logger = get_run_logger()
    uri = cfg.tracking_uri()
    params = config_values(cfg, stage)
    run_id = tracking.start_stage_run(uri, parent_run_id, stage.name, params) if parent_run_id else None
    logger.info("stage %s: started -> %s", stage.name, out_dir)
    t0 = time.monotonic()
    ok = False
    try:
        call = (
            stage_task_.with_options(refresh_cache=not is_complete(Path(out_dir)))
            if stage.cached
            else stage_task_
        )
        state = call(cfg, out_dir=out_dir, inputs=inputs, run_id=run_id, return_state=True)
        if state.is_failed():
            state.result()  # raises the task's exception
        cached = state.name == "Cached"
        result = StageResult.load(Path(out_dir))
        if run_id:
            tracking.log_stage_result(
                uri,
                run_id,
                Path(out_dir),
                result,
                params,
                cached=cached,
                log_result_metrics=cached or not stage.live_metrics,
            )
        ok = True
        logger.info(
            "stage %s: finished in %.1fs%s", stage.name, time.monotonic() - t0, " (cached)" if cached else ""
        )
        return out_dir
    finally:
        if run_id:
            tracking.end_run(uri, run_id, ok)
