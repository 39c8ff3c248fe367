"""Pictures a reviewer would rather look at than read, drawn from the files the stages leave.

matplotlib's object API (``Figure``), never pyplot: pyplot's global state is not safe in the
threads Prefect runs tasks in. Each figure is written by the stage that owns its data and logged as
that stage's artifact.
"""

from __future__ import annotations

import csv
from pathlib import Path

LOSS_CURVES = "loss_curves.png"


def read_loss_history(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``loss_history.csv`` (lm.training.modules.LossHistory) -> metric -> [(step, value)], sorted by step. A step
    logged twice (a killed run's steps after its last checkpoint, then the resumed run's) keeps the
    later value; a missing file is an empty history."""
    if not Path(path).is_file():
        return {}
    by_metric: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            by_metric.setdefault(row["metric"], {})[int(row["step"])] = float(row["value"])
    return {k: sorted(v.items()) for k, v in by_metric.items()}


def plot_loss_curves(pretrain_dir: Path, finetune_dir: Path, path: Path) -> None:
    """Pretraining and fine-tuning losses in one figure, a panel each (their losses measure different
    things: next-token loss, then the fine-tuning task's), training and validation loss by step."""
    from matplotlib.figure import Figure

    from lm.training.launch import LOSS_HISTORY

    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (title, folder) in zip(axes, (("Pretraining", pretrain_dir), ("Fine-tuning", finetune_dir)), strict=True):
        history = read_loss_history(Path(folder) / LOSS_HISTORY)
        for key, style in (("train/loss", {"lw": 1.2}), ("val/loss", {"lw": 1.8, "marker": "o", "ms": 4})):
            if history.get(key):
                steps, values = zip(*history[key], strict=True)
                ax.plot(steps, values, label=key, **style)
        if history:
            ax.legend()
        else:  # a base model used as it is, or a folder trained before histories were written
            ax.text(0.5, 0.5, "no training in this stage's folder", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.suptitle("Loss curves")
    fig.savefig(path, dpi=100)
