"""The pipeline process killed (kill -9) while it trains: its training process and its temporary
Prefect server go with it, and the rerun resumes from the checkpoints, ends the killed run's MLflow
runs, and says it took over."""

from __future__ import annotations

import json
import signal

import psutil
import pytest
from train_fixtures import start_lmforge


@pytest.mark.slow  # ~90 s: two pipeline processes, each starting Prefect's temporary server
def test_killed_pipeline_leaves_no_training_behind_and_the_rerun_takes_over(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = (
        "pretrain",
        "--config",
        "tiny",
        f"workdir={tmp_path / 'w'}",
        f"tracking.uri={uri}",
        "pretrain.max_steps=60",
        "pretrain.ckpt_every=10",
    )
    first = start_lmforge(*args)
    trainer, orphans = None, []
    try:
        for line in first.stdout:
            if trainer is None and "lmforge: pretrain decoder" in line:
                children = psutil.Process(first.pid).children(recursive=True)
                trainer = [p for p in children if "lm.training.child" in " ".join(p.cmdline())]
                # The run's temporary Prefect server (flows/ephemeral.py).
                orphans = [p for p in children if "prefect.server" in " ".join(p.cmdline())]
            if "saved checkpoint" in line and "step-00000020.ckpt" in line:
                first.send_signal(signal.SIGKILL)
                break
        first.wait(timeout=60)
        assert orphans, "no temporary Prefect server was seen among the run's processes"
        gone, alive = psutil.wait_procs(orphans, timeout=15)
        assert not alive, f"the temporary Prefect server outlived the killed run: {[p.cmdline() for p in alive]}"
        _check_the_rerun_takes_over(tmp_path, uri, args, first, trainer)
    finally:
        for p in orphans:  # only if the assertion above failed: the suite leaves nothing running
            if p.is_running():
                p.kill()


def _check_the_rerun_takes_over(tmp_path, uri, args, first, trainer) -> None:
    assert first.returncode == -signal.SIGKILL and trainer
    # The training process does not run on alone (writing into the folder the rerun resumes in).
    gone, alive = psutil.wait_procs(trainer, timeout=5)
    assert not alive, [p.cmdline() for p in alive]
    pretrain = next((tmp_path / "w" / "pretrain").iterdir())
    assert not (pretrain / "result.json").exists()

    second = start_lmforge(*args)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    assert "resuming from" in out and "step-00000020.ckpt" in out, out[-6000:]
    assert json.loads((pretrain / "result.json").read_text())["metrics"]["steps"] == 60
    leftovers = [p for p in (tmp_path / "w").rglob("*") if ".tmp-" in p.name]
    assert not leftovers, leftovers

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    killed = [r for r in runs if r.info.status == "FAILED"]
    assert {r.info.run_name for r in killed} >= {"pretrain"} and all(
        "lmforge.abandoned" in r.data.tags for r in killed
    )
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (old_parent,) = [r for r in killed if "mlflow.parentRunId" not in r.data.tags]
    (new_parent,) = [
        r for r in runs if r.info.status == "FINISHED" and "mlflow.parentRunId" not in r.data.tags
    ]
    assert new_parent.data.tags["lmforge.takes_over"] == old_parent.info.run_id
    assert new_parent.info.run_id in old_parent.data.tags["lmforge.abandoned"]
