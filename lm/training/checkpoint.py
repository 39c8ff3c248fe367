"""Checkpoint files: atomic writes, keep-last-K, and finding the newest valid one to resume from.

Lightning's own writer streams into the final path (Lightning-AI/pytorch-lightning#19970), so a
process killed mid-write leaves a torn file under a trusted name. Here a checkpoint is written to a
temporary name in the same directory, fsync'ed and renamed: readers see the old set of files or the
new one. A file damaged later (disk full, copied half-way) is still caught by :func:`is_valid`,
which checks the zip container torch.save writes, including each member's CRC.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lm.fileio import atomic_write

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)\.ckpt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin whose writes are atomic."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of ``step-*.ckpt`` files, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_valid(path: str | os.PathLike) -> bool:
    """True when ``path`` is a complete torch.save archive whose members all pass their CRC check."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def latest_valid_checkpoint(ckpt_dir: str | os.PathLike, log=print) -> Path | None:
    """The newest checkpoint that :func:`is_valid` accepts; damaged newer ones are reported and skipped."""
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        if is_valid(path):
            return path
        log(f"lmforge: checkpoint {path} (step {step}) is truncated or corrupt; trying the previous one")
    return None


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted paths."""
    found = list_checkpoints(ckpt_dir)
    doomed = [p for _, p in found[: max(0, len(found) - keep_last)]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


class StepCheckpoint(pl.Callback):
    """Save ``checkpoints/step-N.ckpt`` every ``every`` optimizer steps and when training ends; keep the last K.

    ``before_save`` runs on every rank just before a save (the divergence check), so a checkpoint
    never holds weights that a NaN loss has already touched.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, every: int, keep_last: int, before_save=None):
        self.ckpt_dir = Path(ckpt_dir)
        self.every = max(1, int(every))
        self.keep_last = max(1, int(keep_last))
        self.before_save = before_save
        self.last_saved: int | None = None
        self.saved: list[Path] = []

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self.last_saved == step or step == 0:
            return
        if self.before_save is not None:
            self.before_save(trainer, pl_module)
        path = self.ckpt_dir / checkpoint_name(step)
        # Collective: every rank calls, the strategy writes on rank 0.
        trainer.save_checkpoint(path, weights_only=False)
        self.last_saved = step
        self.saved.append(path)
        if trainer.is_global_zero:
            prune_checkpoints(self.ckpt_dir, self.keep_last)
            print(f"lmforge: saved checkpoint {path}", flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_saved = trainer.global_step  # a resumed run does not re-save the step it resumed from

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Fires after every micro-batch; global_step moves only on optimizer steps, so with gradient
        # accumulation the check below is true once per step.
        if trainer.global_step % self.every == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module)

    @property
    def last_path(self) -> Path | None:
        return self.saved[-1] if self.saved else None
