"""The disk, not the input: a full disk while a stage writes, and a checkpoint folder that cannot be
written. Both on real size-limited or read-only tmpfs mounts (skipped where mounting is not allowed)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from lm.config import load_config
from lm.errors import StageError, TrainingError
from lm.pipeline.stage import StageContext, execute, is_complete, stage_by_name
from lm.stages import STAGES


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def test_a_full_disk_fails_the_stage_in_one_line_publishes_nothing_and_the_rerun_completes(tmp_path):
    with tmpfs(tmp_path / "fs", "3m") as fs:
        cfg = load_config("tiny", [f"workdir={fs / 'w'}", "data.max_docs=null"])
        ft = fs / "w" / "finetune_data" / "k"
        execute(stage_by_name(STAGES, "finetune_data"), StageContext(cfg, {}, ft))  # an earlier stage, done
        ingest = fs / "w" / "ingest" / "k"
        with pytest.raises(StageError, match=r"stage ingest: No space left on device .*free some space"):
            execute(stage_by_name(STAGES, "ingest"), StageContext(cfg, {}, ingest))
        assert not ingest.exists() and not list(ingest.parent.iterdir())  # nothing half-written, no leftovers
        assert is_complete(ft)
        _remount(fs, "size=64m")  # space freed
        execute(stage_by_name(STAGES, "ingest"), StageContext(cfg, {}, ingest))
        assert is_complete(ingest) and is_complete(ft)


def test_a_checkpoint_folder_that_cannot_be_written_fails_before_training(tmp_path):
    from train_fixtures import make_token_dir, tiny_config_yaml

    from lm.training.child import run_pretrain

    tokens = make_token_dir(tmp_path / "tokens")
    cfg = load_config(tiny_config_yaml(tmp_path / "cfg.yaml", pretrain={"max_steps": 1000}))
    with tmpfs(tmp_path / "fs", "4m") as fs:
        (fs / "out").mkdir()
        _remount(fs, "ro")
        with pytest.raises(
            TrainingError, match="checkpoint folder .* cannot be written .*Read-only file system"
        ):
            run_pretrain(cfg, tokens, fs / "out")
