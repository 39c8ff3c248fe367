"""What every stage task shares: the cache key (the stage's output folder), its MLflow child run,
and streaming a training subprocess into the Prefect log.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from lm import __version__, tracking
from lm.config import Config
from lm.errors import LmforgeError, TrainingError
from lm.stage import StageResult, is_complete


def output_dir_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key = the stage's output folder, which is itself a hash of all the stage's inputs.
    Hashing a path (not Python objects) keeps keys stable across processes (PrefectHQ/prefect#12229)."""
    blob = f"{__version__}:{context.task.name}:{Path(parameters['out_dir']).resolve()}"
    return hashlib.sha256(blob.encode()).hexdigest()


def stage_task(fn: Callable[..., str]):
    """A stage task: cached across runs by output folder, result persisted so reruns reuse it."""
    return task(fn, name=fn.__name__, cache_key_fn=output_dir_key, persist_result=True)


def run_stage_in_child_run(stage_task_fn, stage: str, cfg: Config, parent_run_id: str | None,
                           out_dir: str, *, pass_run_id: bool = False, metrics_logged_live: bool = False,
                           **inputs: Any) -> str:
    """Run one stage's task inside its own nested MLflow run and log what it produced.

    The task is skipped (Prefect state ``Cached``) when its output folder is complete; the child
    run is still created, tagged ``lmforge.cached=true``, and gets the stored metrics, so every
    pipeline run in MLflow shows the whole tree.
    """
    logger = get_run_logger()
    uri = cfg.tracking_uri()
    params = tracking.stage_params(cfg, stage)
    run_id = tracking.start_stage_run(cfg, parent_run_id, stage, params) if parent_run_id else None
    logger.info("stage %s: started -> %s", stage, out_dir)
    t0 = time.monotonic()
    ok = False
    try:
        call = stage_task_fn.with_options(refresh_cache=not is_complete(Path(out_dir)))
        kwargs = dict(inputs)
        if pass_run_id:
            kwargs["run_id"] = run_id
        state = call(cfg.model_dump(mode="json"), out_dir=out_dir, return_state=True, **kwargs)
        if state.is_failed():
            state.result()  # raises the task's exception
        cached = state.name == "Cached"
        result = StageResult.load(Path(out_dir))
        if run_id:
            tracking.log_stage_result(uri, run_id, Path(out_dir), result, cached=cached,
                                      log_result_metrics=cached or not metrics_logged_live)
        ok = True
        logger.info("stage %s: finished in %.1fs%s", stage, time.monotonic() - t0, " (cached)" if cached else "")
        return out_dir
    finally:
        if run_id:
            tracking.end_run(uri, run_id, ok)


def stream_subprocess(cmd: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None) -> list[str]:
    """Run ``cmd``, showing its progress bar on our terminal and its ``lmforge:`` lines in the
    Prefect log (Prefect does not forward a subprocess's output by itself, PrefectHQ/prefect#9797).

    Progress bars redraw a line with carriage returns, so the output is read in chunks and cut at
    both "\\r" and "\\n": what holds ``lmforge:`` goes to the log from that marker on, the rest is
    echoed to our stderr. Returns the ``lmforge:`` lines; a non-zero exit raises TrainingError
    with the process's last error line.
    """
    logger = get_run_logger()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MLFLOW_RUN_ID", None)  # would make MLflow resume the wrong run (mlflow#15713)
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tail: deque[str] = deque(maxlen=40)
    marked: list[str] = []
    lock = threading.Lock()

    def pump(stream) -> None:
        pending = ""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks split characters
        for chunk in iter(lambda: stream.read1(4096), b""):
            pending += decoder.decode(chunk)
            # Segments end in "\n" or "\r" (a progress bar redraws its line with "\r").
            *segments, pending = re.split(r"(?<=[\r\n])", pending)
            echo = []
            for seg in segments:
                if "lmforge:" in seg:
                    head, rest = seg.split("lmforge:", 1)
                    line = "lmforge: " + rest.strip()
                    echo.append(head)
                    tail.append(line)
                    marked.append(line)
                    logger.info(line)  # shown on the terminal by Prefect's console handler
                else:
                    echo.append(seg)
                    if seg.strip():
                        tail.append(seg.strip())
            with lock:
                sys.stderr.write("".join(echo))
                sys.stderr.flush()
        if pending.strip():
            tail.append(pending.strip())

    threads = [threading.Thread(target=pump, args=(proc.stdout,), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr,), daemon=True)]
    for t in threads:
        t.start()
    rc = proc.wait()
    for t in threads:
        t.join(timeout=10)
    if rc != 0:
        lines = [ln for ln in tail if ln]
        errors = [ln for ln in lines if ln.startswith(("lmforge: error:", "TrainingError", "Error"))]
        reason = (errors or lines or ["no output"])[-1].removeprefix("lmforge: error:").strip()
        raise TrainingError(f"training failed (exit code {rc}): {reason}")
    return marked


def user_error_message(exc: BaseException) -> str | None:
    """The message of the first LmforgeError in an exception chain (Prefect may wrap ours)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, LmforgeError):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


class _UserErrorWithoutTraceback(logging.Filter):
    """Bad input is reported by the CLI in one line; Prefect's console need not print its traceback.
    (The Prefect API log handler is left alone, so the UI still shows the full record.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and user_error_message(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_errors() -> None:
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if type(handler).__name__ != "APILogHandler":
                handler.addFilter(_UserErrorWithoutTraceback())
