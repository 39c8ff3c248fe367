"""The pipeline's side of training: the pretrain and finetune stages start the training child
(``python -m lm.training.child``, a process of its own: Lightning's DDP launcher re-executes it per rank) and
read what it leaves (``result.json``). The names of those files are the contract between the two."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lm.errors import StageError
from lm.fileio import atomic_write
from lm.pipeline.stage import StageContext, StageResult

RESULT = "result.json"  # the child's final metrics and weight digest
LOSS_HISTORY = "loss_history.csv"  # train/val loss by step: the loss-curve figure reads it (lm.tracking.figures)
CONFIG = "config.yaml"  # the stage's config, the child's only input besides its folders


def launch(kind: str, ctx: StageContext, args: list[str]) -> StageResult:
    """Write the stage's config.yaml, run ``python -m lm.training.child KIND`` (through ``ctx.launch``, which
    streams its output), and turn the result.json it wrote into the stage's result."""
    out = Path(ctx.out_dir)
    atomic_write(out / CONFIG, ctx.cfg.to_yaml())
    cmd = [sys.executable, "-m", "lm.training.child", kind, "--config", str(out / CONFIG), "--out", str(out), *args]
    env = {}
    if ctx.run_id:
        # The URI through the environment, not the command line, which every user of the machine sees.
        cmd += ["--run-id", ctx.run_id]
        env["MLFLOW_TRACKING_URI"] = ctx.cfg.tracking_uri()
    ctx.launch(cmd, env)
    return training_result(kind, out)


def training_result(kind: str, out: Path) -> StageResult:
    """The stage result of a finished training process: its result.json, under MLflow's metric names."""
    from lm.training.checkpoint import CKPT_DIR, latest_valid_checkpoint

    path = Path(out) / RESULT
    if not path.is_file():
        raise StageError(f"the {kind} process ended without writing {path}: it did not finish")
    result = json.loads(path.read_text())
    names = {"tokens_per_s": "throughput/tokens_per_s"}
    metrics = {names.get(k, k if "/" in k else f"{kind}/{k}"): float(v) for k, v in result["metrics"].items()}
    artifacts = [a for a in [CONFIG, RESULT, "model.json", "samples.txt"] if (out / a).exists()]
    final_ckpt = latest_valid_checkpoint(out / CKPT_DIR, log=lambda *_: None)
    if final_ckpt is not None:  # logged once, at the end (large uploads mid-run can time out, mlflow#7564)
        artifacts.append(str(final_ckpt.relative_to(out)))
    return StageResult(
        metrics=metrics,
        params={"weights_sha256": result["weights_sha256"]},
        artifacts=artifacts,
        # Checkpoints only where training ran (a base model used as it is has none).
        outputs={"model": "model.safetensors", **({"checkpoints": CKPT_DIR} if (out / CKPT_DIR).is_dir() else {})},
    )
