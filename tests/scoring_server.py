"""MLflow's own scoring server (``mlflow models serve``) started on a registered lmforge model, as a
user would start it: the command line, the local environment, 127.0.0.1 and a free port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from train_fixtures import free_port

START_TIMEOUT_S = 300  # downloading the model and importing torch on a busy 2-core machine


@contextlib.contextmanager
def mlflow_models_serve(model_uri: str, tracking_uri: str, log: Path) -> Iterator[str]:
    """Start ``mlflow models serve -m MODEL_URI --env-manager local``; yield its base URL once /ping
    answers; stop it (and the uvicorn it started) on the way out. Its output goes to ``log``."""
    port = free_port()
    # mlflow runs `uvicorn` from PATH: this environment's.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                raise AssertionError(f"mlflow models serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow models serve did not answer /ping in {START_TIMEOUT_S} s:\n"
                                     f"{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        # Its own session: the mlflow process and the uvicorn it launched, nothing else.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def invoke(url: str, payload: dict) -> dict:
    """POST ``payload`` to /invocations; the JSON answer."""
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())
