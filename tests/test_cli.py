"""The command line as a user meets it: bad input stops before any work, with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lmforge(*args: str, cwd: Path, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def test_help_offers_a_command_per_stage_of_the_table(tmp_path):
    from lm.stages import STAGES

    proc = lmforge("--help", cwd=tmp_path)
    assert proc.returncode == 0
    listed = " ".join(proc.stdout.split())  # argparse wraps long help lines
    for stage in STAGES:
        assert f"{stage.command} {stage.help}" in listed, stage.name
    proc = lmforge("finetune-data", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "build the fine-tuning data" in proc.stdout


def test_missing_data_path(tmp_path):
    proc = lmforge(
        "run",
        "--config",
        "tiny",
        f"workdir={tmp_path / 'w'}",
        f"data.sources=[{tmp_path / 'nope'}]",
        f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
        cwd=tmp_path,
    )
    assert_clean_failure(proc, "nope", "does not exist")


def test_wrong_key_and_wrong_type(tmp_path):
    assert_clean_failure(lmforge("run", "--config", "tiny", "model.layers=3", cwd=tmp_path), "model.layers")
    assert_clean_failure(lmforge("run", "--config", "tiny", "pretrain.lr=fast", cwd=tmp_path), "pretrain.lr")


def test_unreachable_tracking_uri(tmp_path):
    proc = lmforge(
        "run",
        "--config",
        "tiny",
        f"workdir={tmp_path / 'w'}",
        "tracking.uri=http://127.0.0.1:9",
        cwd=tmp_path,
    )
    assert_clean_failure(proc, "127.0.0.1:9", "unreachable")
    proc = lmforge("run", "--config", "tiny", "tracking.uri=file:./mlruns", cwd=tmp_path)
    assert_clean_failure(proc, "sqlite")


def test_config_command_prints_resolved_yaml(tmp_path):
    proc = lmforge("config", "--config", "tiny", "pretrain.max_steps=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 3" in proc.stdout


@pytest.mark.slow  # ~30 s: starts Prefect's temporary server on a new database in a fresh process
def test_empty_corpus_stops_before_training(tmp_path):
    """Also lmforge's first run on a new machine: Prefect's temporary server creates its database
    (about 7 s more than a later start here). Under load that went past Prefect's 20 s startup limit
    ("Timed out while attempting to connect to ephemeral Prefect API server": reproduced with four
    busy loops on this 2-core machine, 35 s); the CLI allows 120 s."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_text("")
    (corpus / "blank.md").write_text("\n\n")
    proc = lmforge(
        "run",
        "--config",
        "tiny",
        f"workdir={tmp_path / 'w'}",
        f"data.sources=[{corpus}]",
        f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
        cwd=tmp_path,
        timeout=300,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
    )
    assert proc.returncode != 0
    assert "lmforge: error:" in proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmforge: error:")][-1]
    assert "document" in last.lower() or "empty" in last.lower(), last
    assert not (tmp_path / "w" / "pretrain").exists()


def test_a_failure_inside_prefect_or_mlflow_is_one_line_and_a_bug_keeps_its_traceback():
    from mlflow.exceptions import MlflowException
    from prefect.flows import Flow

    from tasks.common import user_error_message

    try:
        Flow(fn=123)  # raised inside prefect's own code
    except TypeError as e:
        assert user_error_message(e) == "prefect failed: TypeError: 'fn' must be callable"
    assert user_error_message(MlflowException("Changing param values is not allowed\nmore")) == (
        "mlflow failed: MlflowException: Changing param values is not allowed"
    )
    assert user_error_message(ValueError("a bug of ours")) is None


def test_a_tracking_store_that_is_a_folder_stops_the_run_in_one_line(tmp_path):
    (tmp_path / "store.db").mkdir()
    proc = lmforge(
        "data",
        "--config",
        "tiny",
        f"workdir={tmp_path / 'w'}",
        f"tracking.uri=sqlite:///{tmp_path / 'store.db'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert_clean_failure(proc, "store.db is a folder")


def test_a_tracking_file_that_is_not_a_database_is_named(tmp_path):
    (tmp_path / "notes.db").write_text("not a database")
    proc = lmforge(
        "data", "--config", "tiny", f"tracking.uri=sqlite:///{tmp_path / 'notes.db'}", cwd=tmp_path
    )
    assert_clean_failure(proc, "notes.db is not an SQLite database")


def test_a_failed_training_process_is_explained_by_its_error_not_its_progress_bar():
    from tasks.common import _exit_reason, failure_reason

    bar = "Epoch 0:  83%|########  | 25/30 [00:03<00:00,  7.1it/s, loss=4.21]"
    traceback_tail = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                      "OSError: [Errno 28] No space left on device", bar]
    assert failure_reason(traceback_tail) == "OSError: [Errno 28] No space left on device"
    assert failure_reason(["lmforge: error: training diverged: the loss became NaN", bar]) == (
        "training diverged: the loss became NaN"
    )
    assert failure_reason(["lmforge: step 20 train/loss 4.1", bar]) == "lmforge: step 20 train/loss 4.1"
    assert _exit_reason(-9).startswith("killed by SIGKILL") and _exit_reason(1) == "exit code 1"


def test_a_run_ends_when_its_work_does_and_leaves_no_prefect_server(tmp_path):
    """The run's temporary Prefect server (flows/ephemeral.py) gets the run's last logs before it
    stops: they once went out at exit, found it gone, and Prefect started a server of its own to
    fail sending them (a minute after the summary, then "Error logging to API")."""
    import time

    import psutil

    t0 = time.monotonic()
    proc = lmforge("ingest", "--config", "tiny", f"workdir={tmp_path / 'w'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path, timeout=300,
                   PREFECT_HOME=str(tmp_path / "prefect-home"))
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "pipeline finished" in out and "Error logging to API" not in out and "temporary server" not in out, out[-3000:]
    assert took < 120, f"{took:.0f} s for the data stages of the tiny config"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
