"""The token data format: ``index.json`` (:class:`TokenIndex`) and the shards it lists, read through
``numpy.memmap``: windows of any position without loading a shard.

The shards of a split (see ``lm.text.tokenize_stage``) form one long token stream; a window may start in
one file and end in the next. Pages are read by the OS on demand, so memory use does not depend
on the corpus size, and worker processes of a DataLoader share the page cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lm.errors import DataError
from lm.fileio import atomic_write

INDEX = "index.json"


@dataclass(frozen=True)
class TokenIndex:
    """``index.json``: what a token data folder holds. Its one reader and writer.

    ``splits`` maps a split name to ``{"files": [...], "tokens": n, "documents": n}``; the special
    token ids are what a model trained on these tokens needs to read and write text again."""

    dtype: str  # uint16 | uint32
    vocab_size: int
    eot_id: int
    pad_id: int
    mask_id: int
    splits: dict[str, dict] = field(default_factory=dict)
    tokenizer: str = "tokenizer.json"  # relative to the folder
    kind: str = "bpe"

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TokenIndex:
        path = Path(folder) / INDEX
        if not path.is_file():
            raise DataError(f"{path} does not exist: give the tokenize stage's output folder")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise DataError(f"{path} is not a token index written by the tokenize stage ({e})") from None

    def save(self, folder: str | os.PathLike) -> None:
        atomic_write(Path(folder) / INDEX, json.dumps(asdict(self), indent=2))

    def special_ids(self) -> dict[str, int]:
        """The ids a saved model keeps in its model.json."""
        return {"eot_id": self.eot_id, "pad_id": self.pad_id, "mask_id": self.mask_id}


class TokenShards:
    """One split (``train`` or ``val``) of the shards described by ``index_dir/index.json``."""

    def __init__(self, index_dir: Path, split: str):
        self.index_dir = Path(index_dir)
        index = TokenIndex.load(self.index_dir)
        if split not in index.splits:
            raise DataError(f"{self.index_dir / INDEX} has no split {split!r}; it has {', '.join(index.splits)}")
        self.index = index
        self.split = split
        self.dtype = np.dtype(index.dtype)
        self.vocab_size: int = index.vocab_size
        self.eot_id, self.pad_id, self.mask_id = index.eot_id, index.pad_id, index.mask_id
        self.tokenizer_path = self.index_dir / index.tokenizer
        self._maps: list[np.memmap] = []
        sizes = []
        for name in index.splits[split]["files"]:
            path = self.index_dir / name
            n = path.stat().st_size // self.dtype.itemsize
            sizes.append(n)
            # np.memmap refuses empty files; an empty shard contributes nothing.
            self._maps.append(
                np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
            )
        self._starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)  # (files + 1,)
        self.num_tokens: int = int(self._starts[-1])
        expected = int(index.splits[split]["tokens"])
        if self.num_tokens != expected:
            raise DataError(
                f"{self.index_dir / INDEX}: split {split!r} should hold {expected} tokens but its "
                f"files hold {self.num_tokens}; the shards are incomplete, rerun the tokenize stage"
            )

    def __len__(self) -> int:
        return self.num_tokens

    def window(self, start: int, length: int, dtype: np.dtype | type = np.int64) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split as ``dtype`` (length,), across shard files."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"window [{start}, {start + length}) outside the {self.num_tokens} tokens of {self.split}"
            )
        out = np.empty(length, dtype=dtype)
        f = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self._starts[f])
            take = min(length - done, int(self._starts[f + 1]) - (start + done))
            out[done : done + take] = self._maps[f][offset : offset + take]
            done += take
            f += 1
        return out

    def num_windows(self, seq_len: int) -> int:
        """Non-overlapping windows of ``seq_len + 1`` tokens (inputs and their next-token targets)."""
        return self.num_tokens // (seq_len + 1)
