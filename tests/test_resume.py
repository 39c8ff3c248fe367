"""Resume after a crash: SIGKILL mid-run, damage the newest checkpoint, rerun, get the same final loss."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import child_env, make_finetune_dir, make_token_dir, pretrain_args, tiny_config_yaml

ROOT = Path(__file__).resolve().parent.parent


def _cmd(cfg: Path, tokens: Path, out: Path) -> list[str]:
    return [sys.executable, *pretrain_args(cfg, tokens, out)]


@pytest.mark.slow  # ~20 s: three training processes
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    tokens = make_token_dir(tmp_path / "tokens")
    cfg = tiny_config_yaml(
        tmp_path / "cfg.yaml",
        pretrain={
            "max_steps": 40,
            "ckpt_every": 4,
            "keep_last": 2,
            "val_every": 10,
            "resume": "auto",
            "tokens_per_step": 256,  # 2 micro-batches per step: the data position must count both
        },
    )

    reference = subprocess.run(
        _cmd(cfg, tokens, tmp_path / "ref"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads((tmp_path / "ref" / "result.json").read_text())["metrics"]

    out = tmp_path / "crashed"
    proc = subprocess.Popen(
        _cmd(cfg, tokens, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=child_env(),
    )
    for line in proc.stdout:
        if "saved checkpoint" in line and "step-00000016.ckpt" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "result.json").exists()
    ckpts = sorted((out / "checkpoints").glob("step-*.ckpt"))
    assert len(ckpts) >= 2
    # The newest checkpoint is damaged as a torn copy would be: the previous valid one must be used.
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    resumed = subprocess.run(
        _cmd(cfg, tokens, out), capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{newest} (step" in resumed.stdout and "truncated or corrupt" in resumed.stdout
    assert f"resuming from {ckpts[-2]}" in resumed.stdout
    assert "not resumable" not in resumed.stderr  # the loader's position is in the checkpoint
    got = json.loads((out / "result.json").read_text())["metrics"]
    assert got["steps"] == expected["steps"] == 40
    assert got["train/loss"] == pytest.approx(expected["train/loss"], abs=1e-5)
    assert got["val/loss"] == pytest.approx(expected["val/loss"], abs=1e-5)


@pytest.mark.slow  # ~20 s: three fine-tuning processes
def test_finetuning_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    tokens = make_token_dir(tmp_path / "tokens")
    ft = make_finetune_dir(tmp_path / "ft")
    cfg_path = tiny_config_yaml(
        tmp_path / "cfg.yaml",
        pretrain={"max_steps": 8},
        finetune={"max_steps": 36, "ckpt_every": 4, "val_every": 12},
    )
    pre = subprocess.run(
        _cmd(cfg_path, tokens, tmp_path / "pre"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        timeout=300,
    )
    assert pre.returncode == 0, pre.stderr[-3000:]

    def finetune(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "lm.train",
            "finetune",
            "--config",
            str(cfg_path),
            "--data",
            str(ft),
            "--tokens",
            str(tokens),
            "--init",
            str(tmp_path / "pre"),
            "--out",
            str(out),
        ]

    reference = subprocess.run(
        finetune(tmp_path / "ref"), capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=300
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads((tmp_path / "ref" / "result.json").read_text())["metrics"]
    # 128 examples in batches of 8: 16 steps an epoch, so step 20 is mid-way through the second.
    proc = subprocess.Popen(
        finetune(tmp_path / "crashed"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=child_env(),
    )
    for line in proc.stdout:
        if "saved checkpoint" in line and "step-00000020.ckpt" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        finetune(tmp_path / "crashed"), capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "not resumable" not in resumed.stderr
    got = json.loads((tmp_path / "crashed" / "result.json").read_text())["metrics"]
    assert got["steps"] == expected["steps"] == 36
    assert got["train/loss"] == pytest.approx(expected["train/loss"], abs=1e-6)
    assert got["val/accuracy"] == expected["val/accuracy"]
