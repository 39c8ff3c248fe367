"""The MLflow tracking server going away while a stage trains (a real ``mlflow server``, stopped, and
started again on the same port and store): training goes on without waiting for it; the points it
could not send are sent once the server is back, or kept in the stage's folder (unsent_metrics.jsonl,
said in one line) and sent when the stage's results are logged; the stage's own logging fails in one
line naming the server while it is away, and its output stays complete for the rerun.

The stage's side is driven with the calls ``tasks/stage.py`` makes (``lm.tracking.runs`` and the training
entry point the stage launches), without Prefect, whose temporary server would double the time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from serve_fixtures import free_port, mlflow_server
from train_fixtures import ROOT, child_env, make_token_dir, pretrain_args, tiny_config_yaml

from lm.config import load_config
from lm.errors import TrackingError
from lm.pipeline.stage import stage_by_name
from lm.pipeline.workspace import config_values
from lm.stages import STAGES
from lm.tracking import runs as tracking
from lm.tracking.metric_sender import UNSENT_METRICS
from lm.training.launch import LOSS_HISTORY, training_result


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_token_dir(tmp_path_factory.mktemp("tracking-lost") / "tokens")


class Stage:
    """One pretrain stage against the server at ``uri``: its MLflow runs, its training process."""

    def __init__(self, tmp: Path, uri: str, tokens: Path, steps: int) -> None:
        self.uri, self.out, self.tokens = uri, tmp / "pretrain", tokens
        self.cfg_path = tiny_config_yaml(
            tmp / "cfg.yaml",
            tracking={"uri": uri},
            pretrain={"max_steps": steps, "val_every": 20, "ckpt_every": 20, "keep_last": 1},
        )
        cfg = load_config(self.cfg_path)
        self.params = config_values(cfg, stage_by_name(STAGES, "pretrain"))
        self.parent = tracking.start_pipeline_run(cfg)
        self.run_id = tracking.start_stage_run(uri, self.parent, "pretrain", self.params)
        self.stderr = tmp / "train.stderr"

    def start_training(self) -> subprocess.Popen:
        """``python -m lm.training.child pretrain`` as the stage launches it (lm.training.child.launch)."""
        with self.stderr.open("w") as err:
            return subprocess.Popen(
                [sys.executable, *pretrain_args(self.cfg_path, self.tokens, self.out, "--run-id", self.run_id)],
                cwd=ROOT, env={**child_env(), "MLFLOW_TRACKING_URI": self.uri},
                stdout=subprocess.PIPE, stderr=err, text=True,
            )

    def log_result(self) -> None:
        """What the stage does once training has finished (tasks/stage.py run_in_child_run)."""
        result = training_result("pretrain", self.out)
        tracking.log_stage_result(self.uri, self.run_id, self.out, result, self.params, cached=False,
                                  log_result_metrics=False)
        tracking.end_run(self.uri, self.run_id, True)

    def logged_steps(self, key: str = "train/loss") -> list[int]:
        return sorted(m.step for m in MlflowClient(self.uri).get_metric_history(self.run_id, key))

    def trained_steps(self, key: str = "train/loss") -> list[int]:
        """The steps whose ``key`` the training wrote to its own loss_history.csv."""
        rows = (line.split(",") for line in (self.out / LOSS_HISTORY).read_text().splitlines()[1:])
        return sorted({int(step) for step, k, _ in rows if k == key})


def wait_for_first_point(stage: Stage, proc: subprocess.Popen) -> int:
    """Read the training's lines until the store holds its first train/loss; returns that step."""
    for line in proc.stdout:
        if "train/loss" in line:
            deadline = time.monotonic() + 30
            while not stage.logged_steps():
                assert time.monotonic() < deadline, "no train/loss reached the server"
                time.sleep(0.2)
            return stage.logged_steps()[-1]
    raise AssertionError(f"training ended early:\n{stage.stderr.read_text()[-3000:]}")


def read_until_step(proc: subprocess.Popen, step: int) -> int:
    """Read the training's lines until it reports the train/loss of ``step``; returns the last step seen."""
    seen = -1
    for line in proc.stdout:
        if m := re.match(r"lmforge: step (\d+) train/loss", line):
            seen = int(m.group(1))
            if seen >= step:
                break
    return seen


def run_for(proc: subprocess.Popen, seconds: float) -> None:
    """Let a stopped (SIGSTOP) process run for ``seconds``, then stop it again."""
    proc.send_signal(signal.SIGCONT)
    time.sleep(seconds)
    proc.send_signal(signal.SIGSTOP)


def kill_server(proc: subprocess.Popen) -> None:
    """The server goes away at once (kill -9 of it and its workers): no goodbye to its clients."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow  # ~75 s: an MLflow server started twice, one training process
def test_training_outlives_the_tracking_server_and_no_metric_is_lost(tmp_path, tokens, monkeypatch):
    port = free_port()
    uri, store, log = f"http://127.0.0.1:{port}", tmp_path / "store", tmp_path / "mlflow.log"
    store.mkdir()
    with ExitStack() as stack:
        server = stack.enter_context(mlflow_server(store, port, log))
        stage = Stage(tmp_path, uri, tokens, steps=200)
        proc = stage.start_training()
        stack.callback(lambda: proc.poll() is None and proc.kill())
        first = wait_for_first_point(stage, proc)
        kill_server(server)

        # 1. Training goes on while nobody takes its metrics: 40 more steps with the server away.
        assert read_until_step(proc, first + 40) >= first + 40, stage.stderr.read_text()[-3000:]
        # 2. The server back on the same port: what it could not send reaches the run while it trains
        # on. Training is held while the server starts and then let run in short slices, so that the
        # sender's retry timer (wall time) comes round long before training could end: at step 3
        # there must still be steps to log (on a fast machine it once ran to its end meanwhile).
        proc.send_signal(signal.SIGSTOP)
        server = stack.enter_context(mlflow_server(store, port, log))
        deadline = time.monotonic() + 60
        while max(stage.logged_steps()) < first + 40:
            assert proc.poll() is None and time.monotonic() < deadline, "the points kept were not sent"
            run_for(proc, 0.1)
            time.sleep(0.4)
        # 3. The server away again until training has ended: one line says what was not sent, and
        # the stage's folder keeps it.
        assert proc.poll() is None, "training ended before the server went away again"
        kill_server(server)
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, stage.stderr.read_text()[-3000:]
        unsent = stage.out / UNSENT_METRICS
        warned = [line for line in out.splitlines() if "did not take" in line]
        assert len(warned) == 1, out[-3000:]
        assert warned[0].startswith(f"lmforge: warning: MLflow tracking server {uri} ") and str(unsent) in warned[0]
        assert (stage.out / "result.json").is_file() and unsent.is_file()
        kept = unsent.read_text()
        assert '"key": "train/loss"' in kept and stage.run_id in kept

        # 4. The stage's own logging while the server is away: one line naming it, within a bound.
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        t0 = time.monotonic()
        with pytest.raises(TrackingError) as failed:
            stage.log_result()
        assert time.monotonic() - t0 < 30
        message = str(failed.value)
        assert "\n" not in message and f"MLflow tracking server {uri} did not answer" in message, message
        assert f"output {stage.out} is complete and kept" in message
        assert unsent.read_text() == kept

    # 5. The rerun's logging, once the store answers again (here through the server's own database,
    # which saves a third server start): the kept points reach their run; none is missing, none twice.
    stage.uri = f"sqlite:///{store / 'mlflow.db'}"
    stage.log_result()
    assert not unsent.exists()
    trained = stage.trained_steps()
    assert trained == list(range(2, 201, 2))  # trainer.log_every: 2
    assert stage.logged_steps() == trained
    run = MlflowClient(stage.uri).get_run(stage.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["weights_sha256"] == training_result("pretrain", stage.out).params["weights_sha256"]
    assert run.data.tags["lmforge.output"] == str(stage.out)
    assert stage.logged_steps("val/loss") == stage.trained_steps("val/loss") != []
