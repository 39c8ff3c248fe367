"""LightningDataModules: token windows for pretraining, labelled texts for fine-tuning.

Pretraining data is a pure function of (seed, sample slot): slot ``g`` always maps to the same
window (and, for the encoder, the same masking). A run's position in the data is therefore one
integer per rank, the number of samples its training steps consumed, which
:class:`WindowSampler` carries through ``state_dict``/``load_state_dict`` and the DataModule puts
into every checkpoint. Resuming restarts the stream exactly where the checkpointed step left it,
whatever the loader had prefetched. Under DDP rank ``r`` of ``w`` takes slots ``r, r+w, r+2w, ...``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lm.errors import DataError

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """A 64-bit mixing function (Steele et al. 2014): slot number -> well-spread pseudo-random integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def open_token_split(data_dir: str | os.PathLike, split: str):
    """The data stage's reader of one split (raises DataError naming the file when it is unusable)."""
    from lm.shards import TokenShards

    return TokenShards(Path(data_dir), split)


def read_token_index(data_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(data_dir) / "index.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist: --data must be the tokenize stage's output folder")
    return json.loads(path.read_text())


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
        if self.random:
            start = _splitmix64((self.seed << 40) ^ int(g)) % self.num_starts
        else:
            start = int(g) * self.span
        w = np.asarray(self.shards.window(start, self.span), dtype=np.int64)
        if self.kind == "decoder":
            return torch.from_numpy(w[:-1].copy()), torch.from_numpy(w[1:].copy())
        rng = np.random.default_rng([self.seed, int(g), 0x6D6C6D])
        x, y = mask_tokens(w, rng, self.mlm_probability, self.shards.mask_id, self.shards.vocab_size)
        return torch.from_numpy(x), torch.from_numpy(y)


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
        return {"consumed": self.consumed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])


class TokenDataModule(pl.LightningDataModule):
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
        train_samples: int | None = None,  # per rank; max_steps * accumulation * batch_size
        val_batches: int = 20,
        num_workers: int = 0,
    ):
        super().__init__()
        self.data_dir, self.seq_len, self.batch_size, self.seed = Path(data_dir), seq_len, batch_size, seed
        self.kind, self.mlm_probability = kind, mlm_probability
        self.train_samples = train_samples or 2**40
        self.val_batches, self.num_workers = val_batches, num_workers
        self.index = read_token_index(self.data_dir)
        self.vocab_size = int(self.index["vocab_size"])
        self.train_sampler: WindowSampler | None = None
        self._consumed = 0

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        if not hasattr(self, "train_set"):
            self.train_set = TokenWindows(
                open_token_split(self.data_dir, "train"),
                self.seq_len,
                self.seed,
                True,
                self.kind,
                self.mlm_probability,
            )
            self.val_set = TokenWindows(
                open_token_split(self.data_dir, "val"),
                self.seq_len,
                self.seed,
                False,
                self.kind,
                self.mlm_probability,
            )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        self.train_sampler = WindowSampler(self.train_samples, rank, world, consumed=self._consumed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self.train_sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        # The same windows for every validation, split evenly over ranks (the mean of equal-sized
        # per-rank means is the global mean).
        per_rank = min(self.val_batches * self.batch_size, len(self.val_set) // world)
        if per_rank == 0:
            raise DataError(f"{self.data_dir}: the val split is too small for one window per rank")
        indices = list(range(rank, per_rank * world, world))
        return DataLoader(torch.utils.data.Subset(self.val_set, indices), batch_size=self.batch_size)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for the batch a training step is about to consume, never for prefetched ones.
        if self.trainer is not None and self.trainer.training and self.train_sampler is not None:
            self.train_sampler.consumed += int(batch[0].shape[0])
            self._consumed = self.train_sampler.consumed
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"train_sampler": {"consumed": self._consumed}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._consumed = int(state["train_sampler"]["consumed"])
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(state["train_sampler"])


# ---- fine-tuning ------------------------------------------------------------------------------


def _resolve_pad_id(tokenizer_path: Path, tokenizer) -> int:
    index = tokenizer_path.parent / "index.json"
    if index.is_file():
        return int(json.loads(index.read_text())["pad_id"])
    pad = tokenizer.token_to_id("<|pad|>")
    return 0 if pad is None else int(pad)


def encode_texts(tokenizer, texts: list[str], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> ids (N, T) right-padded with pad_id, attention_mask (N, T) bool.

    The one encoding of classifier inputs: training, evaluation and serving all call it, so a
    model never sees text prepared differently from how it was trained."""
    ids = torch.full((len(texts), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), seq_len), dtype=torch.bool)
    for i, enc in enumerate(tokenizer.encode_batch(texts)):
        row = enc.ids[:seq_len] or [pad_id]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


class ClassificationDataModule(pl.LightningDataModule):
    """``train/val/test.parquet`` (text, label) -> (ids (B,T), attention_mask (B,T) bool, labels (B,))."""

    def __init__(
        self,
        ft_dir: str | os.PathLike,
        tokenizer_path: str | os.PathLike,
        seq_len: int,
        batch_size: int,
        seed: int,
        pad_id: int | None = None,
    ):
        super().__init__()
        from tokenizers import Tokenizer

        self.ft_dir, self.tokenizer_path = Path(ft_dir), Path(tokenizer_path)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        if not self.tokenizer_path.is_file():
            raise DataError(f"{self.tokenizer_path} does not exist: --tokens must hold tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        self.pad_id = _resolve_pad_id(self.tokenizer_path, self.tokenizer) if pad_id is None else pad_id
        labels_path = self.ft_dir / "labels.json"
        if not labels_path.is_file():
            raise DataError(f"{labels_path} does not exist: --data must be the fine-tune data folder")
        self.label_names: list[str] = json.loads(labels_path.read_text())
        self.num_classes = len(self.label_names)
        self._sets: dict[str, torch.utils.data.TensorDataset] = {}

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_texts(self.tokenizer, texts, self.seq_len, self.pad_id)

    def _load(self, split: str) -> torch.utils.data.TensorDataset:
        if split not in self._sets:
            import pandas as pd

            path = self.ft_dir / f"{split}.parquet"
            if not path.is_file():
                raise DataError(f"{path} does not exist")
            df = pd.read_parquet(path)
            for col in ("text", "label"):
                if col not in df.columns:
                    raise DataError(f"{path} has no column {col!r} (columns: {list(df.columns)})")
            labels = torch.tensor(df["label"].to_numpy(), dtype=torch.long)
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DataError(f"{path}: labels must lie in [0, {self.num_classes}) (labels.json)")
            ids, mask = self.encode(df["text"].astype(str).tolist())
            self._sets[split] = torch.utils.data.TensorDataset(ids, mask, labels)
        return self._sets[split]

    def setup(self, stage: str | None = None) -> None:
        self._load("train")
        self._load("val")

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self._load("train"), batch_size=self.batch_size, shuffle=True, generator=g, drop_last=False
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._load("val"), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._load("test"), batch_size=self.batch_size)
