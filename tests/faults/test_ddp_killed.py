"""2-process DDP (CPU, gloo) killed with SIGKILL right after a checkpoint: its other rank goes with
it, and the rerun of the same command resumes from that checkpoint and ends with the weights and
loss of an uninterrupted 2-process run with the same seed."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from train_fixtures import (
    ROOT,
    child_env,
    kill_at_checkpoint,
    make_token_dir,
    pretrain_args,
    tiny_config_yaml,
)

DIGEST = re.compile(r"lmforge: rank (\d+) weights sha256 ([0-9a-f]{64})")


def _env() -> dict[str, str]:
    # As the pipeline's task launches training (tasks/common.py): the ranks die with the launcher.
    return {**child_env(), "LMFORGE_DIE_WITH_PARENT": "1"}


def _kill_after_checkpoint(args: list[str], step: int) -> None:
    """Start ``python <args>`` (rank 0, which launches rank 1), SIGKILL it as soon as it reports the
    checkpoint of ``step``, and check that rank 1 ends with it."""
    ranks = kill_at_checkpoint(args, step, env=_env())
    assert len(ranks) == 1, [p.cmdline() for p in ranks]
    ended = _ended_within(ranks[0], seconds=1.0)
    if not ended:  # only when the assertion below fails: the suite leaves nothing running
        with contextlib.suppress(psutil.NoSuchProcess):
            ranks[0].kill()
    # At once: the kernel killed it with its parent (PR_SET_PDEATHSIG, lm/training/child.py). Left to itself it
    # would have gone on until a collective noticed the lost peer (about 1.5 s later here, when it
    # was waiting in one; longer if it was not).
    assert ended, f"rank 1 outlived the killed launcher: {ranks[0].cmdline()}"


def _ended_within(proc: psutil.Process, seconds: float) -> bool:
    """True once ``proc`` is gone or a zombie (dead, not yet reaped by its new parent)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return False


def _ddp_run(args: list[str]) -> tuple[str, dict[str, str], dict]:
    """``python <args>`` to the end; its output, each rank's weight digest, and result.json."""
    proc = subprocess.run(
        [sys.executable, *args, "--print-weight-digest"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    digests = dict(DIGEST.findall(proc.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], proc.stdout[-2000:]
    out = Path(args[args.index("--out") + 1])
    return proc.stdout, digests, json.loads((out / "result.json").read_text())


def _check_resumed(tmp_path: Path, args_for, kill_step: int, max_steps: int) -> None:
    """The uninterrupted run in ref/, the killed one in crashed/, then its rerun; compare."""
    _, ref_digests, ref = _ddp_run(args_for(tmp_path / "ref"))
    crashed = tmp_path / "crashed"
    _kill_after_checkpoint(args_for(crashed), kill_step)
    assert not (crashed / "result.json").exists()
    assert len(list((crashed / "checkpoints").glob("step-*.ckpt"))) >= 2

    text, digests, got = _ddp_run(args_for(crashed))
    assert f"resuming from {crashed / 'checkpoints' / f'step-{kill_step:08d}.ckpt'}" in text
    assert "world 2" in text and "not resumable" not in text
    assert got["metrics"]["steps"] == ref["metrics"]["steps"] == max_steps
    assert got["metrics"]["world_size"] == 2
    # Same seed, one thread, the same gloo reductions: the resumed run is the uninterrupted one,
    # bit for bit, on both ranks.
    assert digests == ref_digests
    assert got["weights_sha256"] == ref["weights_sha256"]
    assert got["metrics"]["train/loss"] == ref["metrics"]["train/loss"]
    assert {k: v for k, v in got["metrics"].items() if k.startswith("val/")} == {
        k: v for k, v in ref["metrics"].items() if k.startswith("val/")
    }


@pytest.mark.slow  # ~45 s (up to ~55 s on a busy 2-core box): three 2-process DDP runs
def test_ddp_pretraining_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run(tmp_path):
    tokens = make_token_dir(tmp_path / "tokens")
    cfg = tiny_config_yaml(
        tmp_path / "cfg.yaml",
        # dropout: every rank's random draws must come back too, not only the weights and data position.
        model={"preset": "tiny", "seq_len": 32, "dropout": 0.1},
        pretrain={"max_steps": 12, "ckpt_every": 4, "keep_last": 3, "val_every": 6},
        trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp", "log_every": 2},
    )
    _check_resumed(tmp_path, lambda out: pretrain_args(cfg, tokens, out), kill_step=8, max_steps=12)
