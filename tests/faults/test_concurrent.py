"""Two pipeline runs at once on one work folder and one new MLflow store: both finish, with one
complete output per stage, and two finished runs in MLflow (a new sqlite store used to be created by
both at once: "duplicate column name")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm.config import load_config
from lm.stage import is_complete
from lm.stages import STAGES, stages_for
from lm.workspace import stage_dirs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~40 s: two lmforge processes, each with Prefect's temporary server
def test_two_runs_at_once_on_one_work_folder_both_finish(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["data", "--config", "tiny", f"workdir={tmp_path / 'w'}", f"tracking.uri={uri}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
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
