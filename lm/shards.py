"""Read token shards through ``numpy.memmap``: windows of any position without loading a shard.

The shards of a split (see ``lm.tokenizer``) form one long token stream; a window may start in
one file and end in the next. Pages are read by the OS on demand, so memory use does not depend
on the corpus size, and worker processes of a DataLoader share the page cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lm.errors import DataError


class TokenShards:
    """One split (``train`` or ``val``) of the shards described by ``index_dir/index.json``."""

    def __init__(self, index_dir: Path, split: str):
        self.index_dir = Path(index_dir)
        index_path = self.index_dir / "index.json"
        if not index_path.is_file():
            raise DataError(f"{index_path} does not exist: run the tokenize stage first")
        index = json.loads(index_path.read_text())
        if split not in index["splits"]:
            raise DataError(f"{index_path} has no split {split!r}; it has {', '.join(index['splits'])}")
        self.split = split
        self.dtype = np.dtype(index["dtype"])
        self.vocab_size: int = int(index["vocab_size"])
        self.eot_id: int = int(index["eot_id"])
        self.pad_id: int = int(index["pad_id"])
        self.mask_id: int = int(index["mask_id"])
        self.tokenizer_path = self.index_dir / index.get("tokenizer", "tokenizer.json")
        self._maps: list[np.memmap] = []
        sizes = []
        for name in index["splits"][split]["files"]:
            path = self.index_dir / name
            n = path.stat().st_size // self.dtype.itemsize
            sizes.append(n)
            # np.memmap refuses empty files; an empty shard contributes nothing.
            self._maps.append(
                np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
            )
        self._starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)  # (files + 1,)
        self.num_tokens: int = int(self._starts[-1])
        if self.num_tokens != int(index["splits"][split]["tokens"]):
            raise DataError(
                f"{index_path}: split {split!r} should hold {index['splits'][split]['tokens']} tokens but its "
                f"files hold {self.num_tokens}; the shards are incomplete, rerun the tokenize stage"
            )

    def __len__(self) -> int:
        return self.num_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split as int64 (length,), across shard files."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"window [{start}, {start + length}) outside the {self.num_tokens} tokens of {self.split}"
            )
        out = np.empty(length, dtype=np.int64)
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
