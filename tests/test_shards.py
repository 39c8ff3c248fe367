"""TokenShards: memmap windows across shard boundaries, equal to the concatenated stream."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lm.errors import DataError
from lm.text.shards import TokenIndex, TokenShards


def write_shards(tmp_path, sizes: list[int], dtype: str = "uint16") -> np.ndarray:
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 60_000 if dtype == "uint16" else 100_000, size=sum(sizes)).astype(dtype)
    files, at = [], 0
    for i, n in enumerate(sizes):
        name = f"train_{i:05d}.bin"
        stream[at : at + n].tofile(tmp_path / name)
        files.append(name)
        at += n
    TokenIndex(
        dtype=dtype,
        vocab_size=65_536 if dtype == "uint16" else 100_000,
        eot_id=0,
        pad_id=1,
        mask_id=2,
        splits={"train": {"files": files, "tokens": int(sum(sizes)), "documents": 1}},
    ).save(tmp_path)
    return stream


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_windows_across_shard_boundaries(tmp_path, dtype):
    stream = write_shards(tmp_path, [100, 1, 0, 257, 50], dtype)
    shards = TokenShards(tmp_path, "train")
    assert shards.num_tokens == len(shards) == 408
    assert (shards.eot_id, shards.pad_id, shards.mask_id) == (0, 1, 2)
    rng = np.random.default_rng(1)
    for _ in range(200):
        length = int(rng.integers(0, 300))
        start = int(rng.integers(0, 408 - length + 1))
        w = shards.window(start, length)
        assert w.dtype == np.int64 and np.array_equal(w, stream[start : start + length].astype(np.int64))
    assert np.array_equal(shards.window(0, 408), stream.astype(np.int64))
    assert shards.num_windows(seq_len=100) == 408 // 101
    with pytest.raises(IndexError):
        shards.window(400, 9)


def test_reader_does_not_load_shards(tmp_path):
    """Opening 40 MB of shards reads none of them: the shard files' mapped pages are what a window reads.

    Measured on the shard files' own mappings (``/proc/self/smaps``), not the process's resident size:
    in a long test process the allocator hands back pages it already holds, so the total moves by
    less than a window's copy, or by more when anything else allocates.
    """

    def mapped(name: str) -> int:
        """Resident bytes of this process's mappings of files called ``name``."""
        total, inside = 0, False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
                    inside = head[-1].endswith("/" + name)
                elif inside and head[0] == "Rss:":
                    total += int(head[1]) * 1024
        return total

    write_shards(tmp_path, [10_000_000, 10_000_000])  # uint16: 20 MB each
    shards = TokenShards(tmp_path, "train")
    assert len(shards) == 20_000_000
    first, second = "train_00000.bin", "train_00001.bin"
    assert mapped(first) + mapped(second) < 1_000_000  # opened, not read
    shards.window(0, 5_000_000)  # 10 MB of the first file
    assert 10_000_000 <= mapped(first) < 14_000_000  # and what the kernel maps around a fault
    assert mapped(second) < 1_000_000
    shards.window(19_000_000, 1_000_000)  # the last 2 MB of the second
    assert 2_000_000 <= mapped(second) < 6_000_000


def test_incomplete_shards_and_missing_split_are_reported(tmp_path):
    write_shards(tmp_path, [100, 100])
    (tmp_path / "train_00001.bin").write_bytes(b"\x00\x00" * 10)
    with pytest.raises(DataError, match="incomplete"):
        TokenShards(tmp_path, "train")
    with pytest.raises(DataError, match="no split 'val'"):
        TokenShards(tmp_path, "val")


def test_a_damaged_index_is_a_data_error_naming_the_file(tmp_path):
    write_shards(tmp_path, [10])
    (tmp_path / "index.json").write_text('{"dtype": "uint16"}')
    with pytest.raises(DataError, match="index.json is not a token index"):
        TokenShards(tmp_path, "train")
