"""Nothing not written by lmforge is unpickled; no secret reaches MLflow or Prefect's records; a
served model's name or a request cannot climb out of where it belongs; with an API key every route
but /health needs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from serve_fixtures import KEY, export_model, free_port, make_workdir, mlflow_server, serving
from train_fixtures import ROOT, child_env

from lm.config import load_config
from lm.errors import ConfigError


class _RunsCode:
    """A pickle that runs a command when loaded (CVE-2024-37052 is this, in an MLflow model)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    from lm.models.folder import build_model
    from lm.models.transformer import model_args
    from lm.training.child import load_weights_into

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, tmp_path / "model.ckpt")
    net = build_model(model_args(load_config("tiny").model, 512))
    with pytest.raises(ConfigError, match="refused: the file holds Python objects beyond tensors"):
        load_weights_into(net, tmp_path / "model.ckpt")
    assert not marker.exists()


@pytest.mark.slow  # the data stages through the session's Prefect server
def test_secrets_in_the_environment_are_not_recorded(prefect_harness, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.pipeline import pipeline

    secret = "p4ssw0rd-7d1e0c"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    monkeypatch.setenv("LMFORGE_TEST_API_KEY", secret)
    db = tmp_path / "mlflow.db"
    cfg = load_config("tiny", [f"workdir={tmp_path / 'w'}", f"tracking.uri=sqlite:///{db}"])
    state = pipeline(config=cfg, targets=["tokenize"], return_state=True)
    assert state.is_completed()
    recorded = [db, *(p for p in tmp_path.rglob("*") if p.is_file() and p != db)]
    for path in recorded:
        assert secret.encode() not in path.read_bytes(), path
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()  # the pipeline's and its stages' subflows (and earlier tests')
        logs = []
        for run in runs:
            logs += client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert len(logs) > 10 and not [log for log in logs if secret in log.message]
    assert not [r for r in runs if secret in str(r.parameters)]


# ---- the server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(export_model(make_workdir(tmp_path_factory), "chat"), api_key=KEY) as s:
        yield s


def test_every_route_but_health_needs_the_api_key(server):
    """Each route the app has (so a route added later is covered too), and paths it does not have:
    no key, a wrong key of the same length, or the key under another scheme is 401 with OpenAI's error
    and a WWW-Authenticate challenge; the key opens them; /health answers anyone."""
    routes = [(m, r.path.replace("{model_id:path}", "chat")) for r in server.app.routes
              for m in sorted(getattr(r, "methods", None) or ())]
    paths = {path for _, path in routes}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/models", "/metrics", "/health"} <= paths
    wrong = "sk-" + "x" * (len(KEY) - 3)
    for method, path in [*routes, ("GET", "/nope"), ("POST", "/v1/../metrics"), ("GET", "/HEALTH")]:
        if path == "/health":
            continue
        for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY}x"}):
            r = httpx.request(method, f"{server.url}{path}", headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        opened = httpx.request(method, f"{server.url}{path}", headers={"Authorization": f"Bearer {KEY}"}, json={})
        assert opened.status_code != 401, (method, path)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_request_cannot_name_its_way_out_of_the_served_model(server):
    """The model a request names is compared with the served one's name, never used as a path."""
    headers = {"Authorization": f"Bearer {KEY}"}
    for name in ("../../etc/passwd", "/etc", "chat/../../etc", "..", "chat\\..\\.."):
        r = httpx.post(f"{server.url}/v1/completions", headers=headers,
                       json={"model": name, "prompt": "def", "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", name
    for path in ("/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/models/../../etc/passwd", "/v1/models/%2e%2e"):
        r = httpx.get(f"{server.url}{path}", headers=headers)
        assert r.status_code == 404 and "root:" not in r.text, path


def test_serve_refuses_a_model_name_or_folder_that_climbs_out(tmp_path):
    """A registered name or alias with '/' or '..' is refused before MLflow is asked (no store is even
    opened); a folder outside the repository reached by climbing out of it (``../..``), that is not
    a model, is one line."""
    from lm.serving.served_model import registered_name

    for spec in ("models:/../etc@champion", "models:/a/../b@champion", "models:/tiny@../x", "models:/tiny/../3",
                 "models:/a%2F..@c", "models:/.hidden@c", "models:/tiny@champion/.."):
        with pytest.raises(ConfigError, match="a registered model is models:/NAME@ALIAS"):
            registered_name(spec)
    store = tmp_path / "mlflow.db"
    outside = tmp_path / "etc"  # exists wherever the checkout is (CI's ../../etc did not)
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0\n")
    climb = os.path.relpath(outside, ROOT)
    assert climb.startswith("..")
    for spec in ("models:/../../etc@champion", climb):
        run = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--model", spec, "--port", "0",
                              "--tracking-uri", f"sqlite:///{store}"], cwd=ROOT, env=child_env(),
                             capture_output=True, text=True, timeout=180)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("lmforge: error:"), run.stderr[-2000:]
        assert "Traceback" not in run.stderr and spec in lines[0]
    assert "not a model folder" in lines[0]
    assert not store.exists()


@pytest.mark.slow  # ~60 s: a real mlflow server, then the data stages through the session's Prefect server
def test_a_password_in_the_tracking_uri_is_not_recorded(prefect_harness, tmp_path, monkeypatch, caplog):
    """MLFLOW_TRACKING_URI=http://user:PASSWORD@127.0.0.1:PORT (basic auth against a real mlflow
    server): the password is in none of the store's files (runs, params, tags, artifacts), the work
    folder, the Prefect logs and flow-run parameters, nor the log records of this process."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.pipeline import pipeline

    password = "s3cret-uri-9f27b1"
    store = tmp_path / "store"
    store.mkdir()
    port = free_port()
    with mlflow_server(store, port, tmp_path / "mlflow.log"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://lmforge:{password}@127.0.0.1:{port}")
        cfg = load_config("tiny", [f"workdir={tmp_path / 'w'}"])
        state = pipeline(config=cfg, targets=["tokenize"], return_state=True)
        from mlflow import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("lmforge")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
    recorded = [p for p in [*store.rglob("*"), *(tmp_path / "w").rglob("*")] if p.is_file()]
    assert any(p.name == "mlflow.db" for p in recorded)
    for path in recorded:
        assert password.encode() not in path.read_bytes(), path
    with get_client(sync_client=True) as prefect:
        flow_runs = prefect.read_flow_runs()
        logs = [log for run in flow_runs
                for log in prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))]
    assert len(logs) > 10 and not [log.message for log in logs if password in log.message]
    assert not [r for r in flow_runs if password in str(r.parameters)]
    assert password not in caplog.text  # what this process logged itself (Prefect's records are above)
    assert state.is_completed() and runs, "nothing was recorded: the test would prove nothing"

