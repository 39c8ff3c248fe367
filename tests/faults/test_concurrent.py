"""Two pipeline runs at once on one work folder and one new MLflow store: both finish, with one
complete output per stage, and two finished runs in MLflow (a new sqlite store used to be created by
both at once: "duplicate column name")."""

from __future__ import annotations

import pytest
from train_fixtures import start_lmforge

from lm.config import load_config
from lm.stage import is_complete
from lm.stages import STAGES, stages_for
from lm.workspace import stage_dirs


@pytest.mark.slow  # ~40 s: two lmforge processes, each with Prefect's temporary server
def test_two_runs_at_once_on_one_work_folder_both_finish(tmp_path):
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
