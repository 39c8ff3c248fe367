"""Retraining that runs itself, on a real Prefect server: ``prefect server start`` on a free loopback
port with its own SQLite database, ``lmforge schedule`` serving the deployments, ``lmforge trigger``
running the retrain, and the new-data check starting one when a file lands in the corpus."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.train_fixtures import STDLIB, free_port, tiny_config_yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CORPUS_MODULES = ["textwrap", "shlex", "glob", "fnmatch", "bisect", "heapq", "colorsys", "queue", "sched", "this",
                  "keyword", "getopt", "numbers", "stat", "genericpath", "posixpath"]


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:  # children it left behind (a flow run's process)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(what: str, until, timeout: float, every: float = 1.0, logs: list[Path] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = until()
        if value:
            return value
        time.sleep(every)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A Prefect server, and ``lmforge schedule`` serving the deployments of a tiny config on it."""
    tmp = tmp_path_factory.mktemp("retrain")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for name in CORPUS_MODULES:
        shutil.copy(STDLIB / f"{name}.py", corpus / f"{name}.py")
    rows = []
    for name in ["textwrap", "shlex", "glob"]:
        lines = [ln.strip() for ln in (STDLIB / f"{name}.py").read_text().splitlines() if len(ln.strip()) > 20]
        rows += [{"text": ln, "label": name} for ln in lines[:60]]
    labelled = tmp / "labelled.jsonl"
    labelled.write_text("\n".join(json.dumps(r) for r in rows))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = tiny_config_yaml(
        tmp / "retrain.yaml",
        data={"sources": [str(corpus)], "val_fraction": 0.1, "clean": {"preset": "code"}},
        tokenizer={"kind": "bpe", "vocab_size": 300},
        pretrain={"max_steps": 4, "val_every": 4, "ckpt_every": 4},
        finetune={"data": str(labelled), "max_steps": 4, "val_every": 4, "ckpt_every": 4},
        evaluate={"max_batches": 2},
        deploy={"model_name": "retrain-test"},
        retrain={"check_every_s": 10},
    )
    import yaml

    tree = yaml.safe_load(config.read_text())
    tree.update(name="retrain-test", workdir=str(tmp / "runs"), tracking={"uri": uri})
    config.write_text(yaml.safe_dump(tree))

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    server_env = {
        **base,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    }
    client_env = {
        **base,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PYTHONPATH": str(ROOT),
    }
    server_log, schedule_log = tmp / "server.log", tmp / "schedule.log"
    procs = []
    try:
        with open(server_log, "wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=server_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
            ))
        _wait("the Prefect server's /api/health", lambda: _healthy(api), 180, logs=[server_log])
        with open(schedule_log, "wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "schedule", "--config", str(config), "--cron", "0 3 * * *"],
                env=client_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
            ))
        yield {"api": api, "env": client_env, "config": config, "corpus": corpus, "uri": uri,
               "logs": [schedule_log, server_log]}
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        return get_client(sync_client=True)


def lmforge(served, *args: str, timeout: float = 480) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=served["env"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_scheduled_triggered_and_new_data_retrains_on_a_real_prefect_server(served):
    from mlflow.tracking import MlflowClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from lm.config import load_config
    from lm.pipeline.retrain import config_digest, data_digest, source_digests
    from lm.pipeline.stage import wanted
    from lm.stages import STAGES
    from lm.tracking.runs import pipeline_runs, run_tree

    api, logs = served["api"], served["logs"]
    with _client(api) as client:
        # Every deployment is registered: the retrain, one per stage, the new-data check.
        names = _wait("the deployments", lambda: (lambda d: d if len(d) >= len(STAGES) + 2 else None)(
            {d.name: d for d in client.read_deployments()}), 120, logs=logs)
        assert {"retrain", "watch", *(s.command for s in STAGES)} <= set(names)
        retrain = names["retrain"]
        assert retrain.global_concurrency_limit is not None and retrain.global_concurrency_limit.limit == 1
        # The cron schedule produced scheduled runs, at 03:00, made by the scheduler.
        runs = _wait("scheduled runs of the cron", lambda: client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[retrain.id]))), 60, logs=logs)
        assert all(r.state_type.value == "SCHEDULED" and r.auto_scheduled for r in runs)
        assert {r.expected_start_time.hour for r in runs} == {3}

    # A deployment that does not exist: one line naming it and the ones there are.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deployments import trigger
    from lm.errors import LmforgeError

    with temporary_settings({PREFECT_API_URL: api}), pytest.raises(LmforgeError) as e:
        trigger("no-such-deployment", [])
    assert "'no-such-deployment' does not exist" in str(e.value) and "lmforge-pipeline/retrain" in str(e.value)

    # lmforge trigger runs the retrain to the end, following it.
    proc = lmforge(served, "trigger", "retrain")
    assert proc.returncode == 0, proc.stdout + proc.stderr + "".join(p.read_text()[-3000:] for p in logs)
    out = proc.stdout
    assert "Running" in out and "Completed" in out, out
    assert f"Prefect UI: {api[: -len('/api')]}/runs/flow-run/" in out, out
    parent_id = out.split("MLflow parent run: ")[1].split()[0]

    cfg = load_config(served["config"])
    uri = served["uri"]
    tree = run_tree(uri, parent_id)
    tags = tree["parent"].data.tags
    assert tree["parent"].info.status == "FINISHED"
    assert set(tree["children"]) == {s.name for s in wanted(STAGES, cfg)}  # align's rows only with align.task
    assert tags["lmforge.trigger"] == "manual"
    assert tags["lmforge.config_hash"] == config_digest(cfg)
    assert tags["lmforge.data_digest"] == data_digest(source_digests(cfg.data), cfg.data)
    assert tags["lmforge.prefect_ui"] == f"{api[: -len('/api')]}/runs/flow-run/{tags['lmforge.prefect_flow_run_id']}"
    assert tags.get("mlflow.source.git.commit")
    version = MlflowClient(uri).get_model_version_by_alias("retrain-test", "champion")
    assert version.tags["lmforge.decision"] == "promoted"

    # New data lands: the check starts a retrain on its own, tagged new-data; its ingest saw the new file.
    # (The run is not waited for: the first one showed the whole tree; the teardown stops it.)
    shutil.copy(STDLIB / "calendar.py", served["corpus"] / "calendar.py")

    def new_data_ingest():
        runs = [r for r in pipeline_runs(uri, cfg.tracking.experiment, 50, config=cfg.name, targets="all")
                if r["tags"].get("lmforge.trigger") == "new-data"]
        ingest = runs and run_tree(uri, runs[0]["run_id"])["children"].get("ingest")
        return (runs, ingest) if ingest and ingest.info.status == "FINISHED" else None

    runs, ingest = _wait("a new-data retrain's ingest", new_data_ingest, 300, every=3, logs=logs)
    assert len(runs) == 1, [r["run_id"] for r in runs]  # the check started one run, not one per check
    assert runs[0]["tags"]["lmforge.data_digest"] == data_digest(source_digests(cfg.data), cfg.data)
    assert runs[0]["tags"]["lmforge.data_digest"] != tags["lmforge.data_digest"]
    metrics = ingest.data.metrics
    assert metrics["ingest/files"] == len(CORPUS_MODULES) + 1
    assert metrics["ingest/files_read"] == 1 and metrics["ingest/files_reused"] == len(CORPUS_MODULES), metrics
