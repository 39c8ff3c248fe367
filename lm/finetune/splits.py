"""What the fine-tuning methods' DataModules share: a finite train and val split of examples, each
split encoded once by the method (:meth:`SplitDataModule.encode`), then batched the same way for
every method."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Subset

from lm.training.pretrain_data import EpochSampler, ResumableDataModule, ResumableLoader


class SplitDataModule(ResumableDataModule):
    """Training examples come in a new seeded order each epoch, split over ranks, resumable mid-epoch
    (:class:`EpochSampler`); validation gives every example once over all ranks (the method's module
    sums over ranks). A method subclasses it with its ``encode`` and, if the default stacking does
    not fit its examples, its ``collate_fn``."""

    collate_fn: Callable[[list[Any]], Any] | None = None  # None: the DataLoader's default (stack)

    def __init__(self, data_dir: Path, batch_size: int, seed: int):
        super().__init__()
        self.data_dir, self.batch_size, self.seed = Path(data_dir), batch_size, seed
        self._sets: dict[str, Sequence] = {}

    def encode(self, name: str) -> Sequence:
        """The examples of split ``name`` (train, val), as the method's batches hold them."""
        raise NotImplementedError

    def split(self, name: str) -> Sequence:
        if name not in self._sets:
            self._sets[name] = self.encode(name)
        return self._sets[name]

    def setup(self, stage: str | None = None) -> None:
        self.split("train")
        self.split("val")

    def train_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        self.train_sampler = EpochSampler(len(self.split("train")), self.seed, rank, world)
        return ResumableLoader(
            self.split("train"), batch_size=self.batch_size, sampler=self.train_sampler, collate_fn=self.collate_fn
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        val = self.split("val")
        return DataLoader(
            Subset(val, range(rank, len(val), world)), batch_size=self.batch_size, collate_fn=self.collate_fn
        )
