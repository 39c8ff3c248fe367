"""The temporary Prefect server of a run started without one, tied to the run's life.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server in a child process and stops it at
exit; a run killed with ``kill -9`` (or by the kernel's out-of-memory killer) never reaches that exit,
and the server then runs on with nobody to stop it. :func:`temporary_server` starts the same server
(Prefect's own app, as Prefect's temporary server runs it) itself, asking Linux to kill it when its
parent dies (``PR_SET_PDEATHSIG``), and points this process's Prefect settings at it. Elsewhere (or
with a server configured) it does nothing and Prefect behaves as usual.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lm.errors import LmforgeError
from lm.fileio import exclusive_lock
from lm.lifetime import die_with_parent


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    die_with_parent(signal.SIGTERM)


def _drain() -> None:
    """Send the run's last logs and events while the server is still there: left for the exit, they
    would find it gone (and, the settings restored, Prefect would start a temporary server of its
    own just to fail sending them: a minute and "Error logging to API" after the run's summary)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_and_wait(log_path: Path, port: int, url: str, env: dict[str, str], startup_s: float) -> subprocess.Popen:
    """Prefect's server app under uvicorn on 127.0.0.1:``port``, once it answers ``/health``; a server
    that stops, or stays silent for ``startup_s``, is stopped and said in one line."""
    import httpx
    import prefect

    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if server.poll() is not None:
                raise LmforgeError(f"the temporary Prefect server stopped at start (exit code {server.returncode}); "
                                   f"see {log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LmforgeError(f"the temporary Prefect server did not answer within {startup_s:g} s (a busy "
                                   f"machine? see {log_path}); or start one: make ui, then "
                                   "export PREFECT_API_URL=http://127.0.0.1:4200/api")
            time.sleep(0.2)
    except BaseException:
        _stop(server)
        raise


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextlib.contextmanager
def temporary_server(log_path: Path, startup_s: float) -> Iterator[str | None]:
    """Within the block, Prefect talks to a temporary server that cannot outlive this process; yields
    its API URL (None when a server is configured, or off Linux: Prefect's own behaviour then)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if PREFECT_API_URL.value() or not sys.platform.startswith("linux"):
        yield None
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Servers of runs started at once share Prefect's database (PREFECT_HOME/prefect.db): one at a
    # time creates or migrates it; the others wait until it answers (two migrating a new database at
    # once failed one of them: "no such table: block").
    home = Path(get_current_settings().home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(home / ".lmforge-server-start.lock"):
        server = _start_and_wait(log_path, port, url, env, startup_s)
    try:
        # The settings context is a context variable, which threads started in the run (a stage
        # streaming its training's output, Prefect's own workers) do not inherit: they read Prefect's
        # global settings, made from the environment when prefect was imported. Without this they
        # found no server, and Prefect started one of its own that nothing ties to this process.
        from prefect.context import refresh_global_settings_context

        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        refresh_global_settings_context()
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _drain()
        finally:
            if before is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = before
            refresh_global_settings_context()
    finally:
        _stop(server)
