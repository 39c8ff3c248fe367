"""Prefect tasks that train: each launches ``python -m lm.train`` as its own process.

Training never runs inside the orchestrator's process: Lightning's DDP launcher re-executes
``sys.argv`` once per extra rank (Lightning-AI/pytorch-lightning#7699), which would relaunch the
whole pipeline; a subprocess is also what ``torchrun``/SLURM launch on other nodes, and the one
thing a timeout can kill (PrefectHQ/prefect#15760). The output folder is stable for the same
inputs, so a rerun after a crash finds the checkpoints and resumes (``pretrain.resume: auto``).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

from lm import tracking
from lm.checkpoint import CKPT_DIR, latest_valid_checkpoint
from lm.config import Config
from lm.errors import TrainingError
from lm.stage import StageResult
from tasks.common import stage_task, stream_subprocess

DIGEST_LINE = re.compile(r"lmforge: rank (\d+) weights sha256 ([0-9a-f]+)")


def _train(kind: str, cfg: Config, out_dir: str, run_id: str | None, args: list[str]) -> dict[str, str]:
    """Launch the training process; returns each rank's final weight digest (DDP: all equal)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "config.yaml"
    resolved.write_text(cfg.to_yaml())
    cmd = [sys.executable, "-m", "lm.train", kind, "--config", str(resolved), "--out", str(out),
           "--print-weight-digest", *args]
    if run_id:
        cmd += ["--run-id", run_id, "--tracking-uri", cfg.tracking_uri()]
    monitor = tracking.system_metrics(cfg.tracking_uri(), run_id) if run_id else contextlib.nullcontext()
    with monitor:
        lines = stream_subprocess(cmd)
    digests = {f"rank{m[1]}": m[2] for m in map(DIGEST_LINE.search, lines) if m}
    if len(set(digests.values())) > 1:  # replicas that drifted apart would export one arbitrary rank
        raise TrainingError(f"{kind}: ranks finished with different weights: {digests}")
    return digests


def _result_from_training(kind: str, out: Path, extra_artifacts: list[str], digests: dict[str, str]) -> None:
    """The stage manifest from the training process's ``metrics.json`` (under MLflow's metric names)."""
    raw = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    names = {"tokens_per_s": "throughput/tokens_per_s"}
    metrics = {names.get(k, k if "/" in k else f"{kind}/{k}"): float(v) for k, v in raw.items()
               if isinstance(v, int | float)}
    artifacts = [a for a in ["config.yaml", "metrics.json", "model.json", *extra_artifacts] if (out / a).exists()]
    final_ckpt = latest_valid_checkpoint(out / CKPT_DIR, log=lambda *_: None)
    if final_ckpt is not None:  # logged once, at the end (large uploads mid-run can time out, mlflow#7564)
        artifacts.append(str(final_ckpt.relative_to(out)))
    StageResult(
        metrics=metrics,
        params={f"weights_sha256/{rank}": d for rank, d in sorted(digests.items())},
        artifacts=artifacts,
        outputs={"model": "model.safetensors", "checkpoints": "checkpoints"},
    ).save(out)


@stage_task
def pretrain(config: dict, out_dir: str, tokens_dir: str, run_id: str | None = None) -> str:
    cfg = Config.model_validate(config)
    digests = _train("pretrain", cfg, out_dir, run_id, ["--data", tokens_dir])
    _result_from_training("pretrain", Path(out_dir), ["samples.txt", "model.safetensors"], digests)
    return out_dir


@stage_task
def finetune(config: dict, out_dir: str, ft_data_dir: str, tokens_dir: str, pretrain_dir: str,
             run_id: str | None = None) -> str:
    cfg = Config.model_validate(config)
    digests = _train("finetune", cfg, out_dir, run_id,
                     ["--data", ft_data_dir, "--tokens", tokens_dir, "--init", pretrain_dir])
    _result_from_training("finetune", Path(out_dir), [], digests)
    return out_dir
