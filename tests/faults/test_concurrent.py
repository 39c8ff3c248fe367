"""Two pipeline runs at once on one work folder and one new MLflow store: both finish, with one
complete output per stage, and two finished runs in MLflow (a new sqlite store used to be created by
both at once: "duplicate column name"), and a Prefect home whose database does not exist yet (both
temporary Prefect servers created it at once: one stopped at start, "no such table: block")."""

from __future__ import annotations

import subprocess
import sys

import pytest
from train_fixtures import ROOT, child_env, start_lmforge

from lm.config import load_config
from lm.pipeline.stage import is_complete
from lm.pipeline.workspace import stage_dirs
from lm.stages import STAGES, stages_for


@pytest.mark.slow  # ~40 s: two lmforge processes, each with Prefect's temporary server
def test_two_runs_at_once_on_one_work_folder_both_finish(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # as on a new machine
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["data", "--config", "tiny", f"workdir={tmp_path / 'w'}", f"tracking.uri={uri}"]
    procs = [start_lmforge(*args) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    cfg = load_config("tiny", args[3:])
    for name, folder in stage_dirs(cfg, stages_for(["data"], STAGES)).items():
        assert is_complete(folder), name
        assert [p.name for p in folder.parent.iterdir()] == [folder.name], name  # no leftovers beside it

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in runs)


BARRIER_SCRIPT = """
import sys, time
from pathlib import Path
from flows.ephemeral import temporary_server

folder, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(folder / f"ready-{me}").touch()  # imports done; start together
while len(list(folder.glob("ready-*"))) < n:
    time.sleep(0.01)
with temporary_server(folder / f"server-{me}.log", 120) as url:
    print("up", url)
"""


@pytest.mark.slow  # ~20 s: three Prefect servers, started one after another
def test_temporary_servers_started_at_once_on_a_new_prefect_home_all_answer(tmp_path):
    """Without the start lock, servers migrating one new database at once stopped at start."""
    env = {**child_env(), "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    n = 3
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER_SCRIPT, str(tmp_path), str(i), str(n)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and "up http://127.0.0.1:" in out, out[-3000:]
