"""What the orchestration layer shares: streaming a child process (training) into the Prefect log,
and reporting a user's error in one line, without a traceback.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from prefect import get_run_logger

from lm.errors import LmforgeError, TrainingError


def stream_subprocess(
    cmd: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None
) -> list[str]:
    """Run ``cmd``, showing its progress bar on our terminal and its ``lmforge:`` lines in the
    Prefect log (Prefect does not forward a subprocess's output by itself, PrefectHQ/prefect#9797).

    Progress bars redraw a line with carriage returns, so the output is read in chunks and cut at
    both "\\r" and "\\n": what holds ``lmforge:`` goes to the log from that marker on, the rest is
    echoed to our stderr. Returns the ``lmforge:`` lines; a non-zero exit raises TrainingError
    with the process's last error line.
    """
    logger = get_run_logger()
    # LMFORGE_DIE_WITH_PARENT: training stops when this process is killed, instead of running on alone.
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMFORGE_DIE_WITH_PARENT": "1", **(env or {})}
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

    threads = [
        threading.Thread(target=pump, args=(proc.stdout,), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr,), daemon=True),
    ]
    for t in threads:
        t.start()
    rc = proc.wait()
    for t in threads:
        t.join(timeout=10)
    if rc != 0:
        raise TrainingError(f"training failed ({_exit_reason(rc)}): {failure_reason(list(tail))}")
    return marked


# The last line of a Python traceback: "OSError: [Errno 28] No space left on device".
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b:? ")


def failure_reason(lines: list[str]) -> str:
    """Why a process failed, from the end of its output: its own ``lmforge: error:`` line, else the
    exception a traceback ended with, else its last line that is not a progress bar."""
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        if ln.startswith("lmforge: error:"):
            return ln.removeprefix("lmforge: error:").strip()
    for ln in reversed(lines):
        if _EXCEPTION_LINE.match(ln):
            return ln
    plain = [ln for ln in lines if "it/s]" not in ln and "s/it]" not in ln and not re.search(r"\d+%\|", ln)]
    return (plain or ["no output"])[-1]


def _exit_reason(rc: int) -> str:
    if rc < 0:
        name = signal.Signals(-rc).name
        hint = " (killed from outside: out of memory, or stopped by hand?)" if -rc == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {rc}"


# Where the services lmforge drives raise from: their failures (a Prefect server that did not start,
# a database MLflow cannot use) are the user's to fix, not a bug of ours to debug from a traceback.
SERVICE_MODULES = ("prefect", "mlflow", "sqlalchemy", "httpx", "httpcore", "alembic")


def user_error_message(exc: BaseException) -> str | None:
    """What to tell the user, in one line, about an exception chain (Prefect may wrap ours): the
    message of the first LmforgeError in it, else that of an error raised by Prefect, MLflow or
    their databases; None for anything else (a bug, shown with its traceback)."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if isinstance(e, LmforgeError):
            return str(e)
    for e in chain:
        service = _raised_by_service(e)
        if service:
            first = (str(e).strip().splitlines() or [""])[0][:500]
            return f"{service} failed: {type(e).__name__}: {first}"
    return None


def _raised_by_service(exc: BaseException) -> str | None:
    """The service package whose code raised ``exc`` (its class's module, else its innermost frame)."""
    root = type(exc).__module__.split(".")[0]
    if root in SERVICE_MODULES:
        return root
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        parts = Path(tb.tb_frame.f_code.co_filename).parts
        for name in SERVICE_MODULES:
            if name in parts[-4:-1]:
                return name
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
