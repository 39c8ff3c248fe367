"""The pretraining DataModule: random token windows, resumable, DDP-aware (fine-tuning methods
bring their own, ``lm/finetune/``).

Pretraining data is a pure function of (seed, sample slot): slot ``g`` always maps to the same
window (and, for the encoder, the same masking). A run's position in the data is therefore one
integer per rank, the number of samples its training steps consumed, which the sampler carries
and :class:`ResumableLoader` hands to Lightning for every checkpoint. Resuming restarts the stream
exactly where the checkpointed step left it, whatever the loader had prefetched. Under DDP rank
``r`` of ``w`` takes slots ``r, r+w, r+2w, ...``. Fine-tuning methods use the same pieces
(:class:`EpochSampler` for a finite set of examples).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lm.errors import DataError
from lm.hashing import GOLDEN_GAMMA, splitmix64
from lm.text.shards import TokenIndex, TokenShards


def window_starts(slots: np.ndarray, seed: int, num_starts: int) -> np.ndarray:
    """Sample slots -> pseudo-random window starts in [0, num_starts): slot g of seed s reads the
    window at splitmix64 of the generator state for (s, g). The same slot always gives the same window."""
    state = (np.uint64(seed << 40) ^ slots.astype(np.uint64)) + GOLDEN_GAMMA
    return splitmix64(state) % np.uint64(num_starts)


def mask_tokens(
    tokens: np.ndarray, rng: np.random.Generator, probability: float, mask_id: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking (Devlin et al. 2019): pick ``probability`` of positions; of those 80% -> mask_id,
    10% -> a random token, 10% unchanged. Returns (inputs, targets) with targets -100 elsewhere."""
    tokens = tokens.astype(np.int64)
    chosen = rng.random(tokens.shape) < probability
    if not chosen.any():  # an all-ignored batch would give a NaN loss
        chosen[rng.integers(len(tokens))] = True
    targets = np.where(chosen, tokens, -100)
    roll = rng.random(tokens.shape)
    inputs = tokens.copy()
    inputs[chosen & (roll < 0.8)] = mask_id
    randomise = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[randomise] = rng.integers(0, vocab_size, size=int(randomise.sum()))
    return inputs, targets


class TokenWindows(Dataset):
    """Sample slot -> (inputs (T,), targets (T,)) int64.

    ``random=True``: slot g reads the window at a pseudo-random offset derived from (seed, g) (train).
    ``random=False``: slot g reads the g-th consecutive window (validation, fixed).
    Decoder: a window of T+1 tokens, targets = inputs shifted by one. Encoder: T tokens, BERT-masked.
    """

    def __init__(
        self,
        shards,
        seq_len: int,
        seed: int,
        random: bool,
        kind: str = "decoder",
        mlm_probability: float = 0.15,
    ):
        self.shards, self.seq_len, self.seed, self.random, self.kind = shards, seq_len, seed, random, kind
        self.mlm_probability = mlm_probability
        self.span = seq_len + 1 if kind == "decoder" else seq_len
        if shards.num_tokens < self.span:
            raise DataError(
                f"{shards.num_tokens} tokens cannot fill one window of {self.span}: "
                f"lower model.seq_len or add data"
            )
        self.num_starts = shards.num_tokens - self.span + 1
        self.num_fixed = shards.num_tokens // self.span

    def __len__(self) -> int:
        return self.num_fixed

    def __getitem__(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([g])[0]

    def __getitems__(self, slots: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A batch of samples (the DataLoader asks for a batch at once: the starts in one numpy call)."""
        g = np.asarray(slots, dtype=np.int64)
        starts = window_starts(g, self.seed, self.num_starts) if self.random else g * self.span
        return [self._sample(int(slot), int(start)) for slot, start in zip(g, starts, strict=True)]

    def _sample(self, g: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.shards.window(start, self.span)  # int64
        if self.kind == "decoder":
            return torch.from_numpy(w[:-1].copy()), torch.from_numpy(w[1:].copy())
        rng = np.random.default_rng([self.seed, g, 0x6D6C6D])
        x, y = mask_tokens(w, rng, self.mlm_probability, self.shards.mask_id, self.shards.vocab_size)
        return torch.from_numpy(x), torch.from_numpy(y)


class ResumableLoader(DataLoader):
    """A training DataLoader whose position Lightning saves in every checkpoint and restores before
    it iterates again: Lightning then resumes mid-epoch exactly, and knows it can (without this it
    warns that the loader is not resumable on every resume, Lightning-AI/pytorch-lightning#19361).
    The position is the sampler's count of samples handed to training steps."""

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


class ResumableDataModule(pl.LightningDataModule):
    """A DataModule whose training sampler counts what training consumed, not what was prefetched."""

    train_sampler: Sampler | None = None

    def rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for the batch a training step is about to consume, never for prefetched ones.
        if self.trainer is not None and self.trainer.training and self.train_sampler is not None:
            self.train_sampler.consumed += int(batch[0].shape[0])
        return batch


class EpochSampler(Sampler[int]):
    """Examples in a new seeded order each epoch (epoch e: permutation e of seed), split over ranks
    (rank r takes positions r, r+w, ...; the last n mod w are left out of that epoch). Resumable."""

    def __init__(self, num_examples: int, seed: int, rank: int = 0, world_size: int = 1, consumed: int = 0):
        self.num_examples, self.seed, self.rank, self.world_size = num_examples, seed, rank, world_size
        self.per_rank = num_examples // world_size
        if self.per_rank == 0:
            raise DataError(f"{num_examples} training examples cannot give each of {world_size} ranks one")
        self.consumed = consumed  # examples handed to training steps, over all epochs

    def __iter__(self):
        epoch, offset = divmod(self.consumed, self.per_rank)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        mine = order[self.rank :: self.world_size][: self.per_rank]
        yield from (int(i) for i in mine[offset:])

    def __len__(self) -> int:
        return self.per_rank

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])


class WindowSampler(Sampler[int]):
    """This rank's slots ``rank + world * i`` for i = consumed, consumed+1, ..., num_samples-1. Resumable."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, consumed: int = 0):
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.consumed = consumed  # samples handed to training steps (not merely prefetched)

    def __iter__(self):
        for i in range(self.consumed, self.num_samples):
            yield self.rank + self.world_size * i

    def __len__(self) -> int:
        # The full length, also after a resume: Lightning keeps counting batches from where the
        # checkpoint left off, so the epoch must look as long as it did to the original run.
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])


class TokenDataModule(ResumableDataModule):
    """Random train windows (a resumable stream), fixed validation windows; DDP-aware."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        seq_len: int,
        batch_size: int,
        seed: int,
        *,
        kind: str = "decoder",
        mlm_probability: float = 0.15,
        train_samples: int | None = None,  # per rank; None: what the trainer's steps consume
        val_batches: int = 20,
        num_workers: int = 0,
    ):
        super().__init__()
        self.data_dir, self.seq_len, self.batch_size, self.seed = Path(data_dir), seq_len, batch_size, seed
        self.kind, self.mlm_probability = kind, mlm_probability
        self.train_samples = train_samples
        self.val_batches, self.num_workers = val_batches, num_workers
        self.index = TokenIndex.load(self.data_dir)
        self.vocab_size = self.index.vocab_size

    def setup(self, stage: str | None = None) -> None:
        if not hasattr(self, "train_set"):
            self.train_set = TokenWindows(
                TokenShards(self.data_dir, "train"),
                self.seq_len,
                self.seed,
                True,
                self.kind,
                self.mlm_probability,
            )
            self.val_set = TokenWindows(
                TokenShards(self.data_dir, "val"),
                self.seq_len,
                self.seed,
                False,
                self.kind,
                self.mlm_probability,
            )

    def train_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        samples = self.train_samples
        if samples is None:
            t = self.trainer
            samples = t.max_steps * t.accumulate_grad_batches * self.batch_size if t is not None else 2**40
        self.train_sampler = WindowSampler(samples, rank, world)
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self.train_sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        # The same windows for every validation, split evenly over ranks (the mean of equal-sized
        # per-rank means is the global mean).
        per_rank = min(self.val_batches * self.batch_size, len(self.val_set) // world)
        if per_rank == 0:
            raise DataError(f"{self.data_dir}: the val split is too small for one window per rank")
        indices = list(range(rank, per_rank * world, world))
        return DataLoader(torch.utils.data.Subset(self.val_set, indices), batch_size=self.batch_size)
