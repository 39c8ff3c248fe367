"""Exact and near-duplicate detection: normalised-text hashes, MinHash signatures, LSH banding.

MinHash (Broder 1997) estimates the Jaccard similarity of two documents' sets of word
``shingle_size``-grams as the fraction of ``num_perm`` hash functions whose minimum over the
shingles agrees. LSH (Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3) splits
the signature into ``bands`` of ``rows`` values; documents that agree on a whole band become
candidates, and a candidate pair is kept when its estimated Jaccard reaches the threshold.

Signatures are computed for a whole batch of documents at once with numpy: the text becomes an
array of code points, words a polynomial hash over them (prefix sums, wrap-around uint64
arithmetic), shingles a mix of consecutive word hashes, and the minimum per document a segmented
``np.minimum.reduceat``. Python touches each document a handful of times, never each word.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from lm.data.writing_systems import SEPARATOR_RANGES, UNSPACED_RANGES
from lm.hashing import splitmix64

_B = np.uint64(0x100000001B3)  # odd multiplier of the polynomial word hash (FNV prime)
_B_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_MASK32 = np.uint64(0xFFFFFFFF)

def _char_classes() -> np.ndarray:
    """uint8 per code point: 0 separates words, 1 is part of a word, 2 is a word by itself."""
    table = np.ones(0x110000, dtype=np.uint8)
    table[:128] = 0
    for c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
        table[c] = 1
    for lo, hi in SEPARATOR_RANGES:
        table[lo : hi + 1] = 0
    for lo, hi in UNSPACED_RANGES:
        table[lo : hi + 1] = 2
    table[0xD800:0xE000] = 0  # lone surrogates
    return table


_CLASSES = _char_classes()
_POW_CACHE: dict[str, np.ndarray] = {}
_POW_CACHE_MAX = 1 << 22  # 32 MB per base: a longer batch computes its powers without keeping them


def _powers(base: np.uint64, n: int, key: str) -> np.ndarray:
    """base**0 .. base**(n-1) mod 2^64, cached and grown on demand (the same for every batch)."""
    cached = _POW_CACHE.get(key)
    if cached is not None and cached.size >= n:
        return cached[:n]
    size = max(n, 1 << 20, 0 if cached is None else 2 * cached.size)
    keep = size <= _POW_CACHE_MAX
    powers = np.full(size if keep else n, base, dtype=np.uint64)
    powers[0] = 1
    np.cumprod(powers, out=powers)
    if keep:
        _POW_CACHE[key] = powers
    return powers[:n]


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the lower-cased words of every text, and the index of the text each belongs to.

    Returns ``(hashes uint64 (W,), doc uint32 (W,))`` with the words of text 0 first.
    """
    if not texts:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint32)
    joined = "\n".join(texts).lower()
    cp = np.frombuffer(joined.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    n = cp.size
    cls = _CLASSES[cp]
    tok = cls > 0
    unspaced = cls == 2
    prev_tok = np.concatenate(([False], tok[:-1]))
    starts_mask = tok & ~prev_tok
    ends_mask = tok & ~np.concatenate((tok[1:], [False]))
    if unspaced.any():
        # A character of an unspaced script is a word by itself, and ends/starts its neighbours.
        starts_mask |= unspaced | (tok & np.concatenate(([False], unspaced[:-1])))
        ends_mask |= unspaced | (tok & np.concatenate((unspaced[1:], [False])))
    starts = np.flatnonzero(starts_mask)
    ends = np.flatnonzero(ends_mask) + 1
    # Polynomial hash of cp[s:e] = sum_j cp[j] * B^-(j-s) = (Q[e] - Q[s]) * B^s with
    # Q = prefix sums of cp[j] * B^-j; all mod 2^64 (numpy's uint64 wraps around).
    q = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(cp.astype(np.uint64) * _powers(_B_INV, n, "inv"), out=q[1:])
    h = splitmix64((q[ends] - q[starts]) * _powers(_B, n, "pow")[starts] + (ends - starts).astype(np.uint64))
    # Text i starts at offset sum(len(texts[:i]) + 1) in the joined string.
    offsets = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    doc = (np.searchsorted(offsets, starts, side="right") - 1).astype(np.uint32)
    return h, doc


def shingle_hashes(texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of word k-grams per text; a text shorter than k words is one shingle."""
    w, doc = word_hashes(texts)
    if w.size == 0:
        return w, doc
    mult = splitmix64(np.arange(1, k + 1, dtype=np.uint64))  # a distinct odd-ish weight per position
    mult |= np.uint64(1)
    m = w.size - k + 1
    if m > 0:
        acc = np.zeros(m, dtype=np.uint64)
        for i in range(k):
            acc += w[i : i + m] * mult[i]
        valid = doc[:m] == doc[k - 1 :]
        sh, sh_doc = splitmix64(acc[valid]), doc[:m][valid]
    else:
        sh, sh_doc = np.zeros(0, np.uint64), np.zeros(0, np.uint32)
    # Texts with 1..k-1 words: one shingle of all their words.
    counts = np.bincount(doc, minlength=len(texts))
    short = np.flatnonzero((counts > 0) & (counts < k))
    if short.size:
        first = np.concatenate(([0], np.cumsum(counts)[:-1]))
        pos = np.arange(w.size) - first[doc]
        sel = np.isin(doc, short)
        weighted = w[sel] * mult[np.minimum(pos[sel], k - 1)]
        seg = np.concatenate(([0], np.flatnonzero(np.diff(doc[sel])) + 1))
        short_h = splitmix64(np.add.reduceat(weighted, seg))
        sh = np.concatenate((sh, short_h))
        sh_doc = np.concatenate((sh_doc, doc[sel][seg]))
        order = np.argsort(sh_doc, kind="stable")
        sh, sh_doc = sh[order], sh_doc[order]
    return sh, sh_doc


@dataclass(frozen=True)
class MinHasher:
    """``num_perm`` hash functions h_i(x) = (a_i * x + b_i) >> 32 (multiply-shift, Dietzfelbinger
    et al. 1997) over 64-bit shingle hashes; signatures are uint32."""

    num_perm: int = 128
    shingle_size: int = 5
    seed: int = 0

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed + 0x5EED)
        a = rng.integers(1, 2**63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)
        return a, b

    def signatures(self, texts: list[str], block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """``(signatures uint32 (N, num_perm), has_shingles bool (N,))`` for N texts."""
        sig = np.full((len(texts), self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        sh, doc = shingle_hashes(texts, self.shingle_size)
        a, b = self.params()
        for lo in range(0, sh.size, block):
            x = sh[lo : lo + block]
            d = doc[lo : lo + block]
            # (P, block): permutations along rows so that the per-document minimum is a
            # reduction along contiguous memory.
            vals = a[:, None] * x[None, :]
            vals += b[:, None]
            vals >>= np.uint64(32)
            seg = np.concatenate(([0], np.flatnonzero(np.diff(d)) + 1))
            docs = d[seg]
            mins = np.minimum.reduceat(vals, seg, axis=1).T.astype(np.uint32)  # (segments, P)
            sig[docs] = np.minimum(sig[docs], mins)
        has = np.zeros(len(texts), dtype=bool)
        has[np.unique(doc)] = True
        return sig, has


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the area of false positives below the
    threshold plus false negatives above it, for P(candidate) = 1 - (1 - s^rows)^bands."""
    s = np.linspace(0.0, 1.0, 1001)
    best, best_cost = (1, num_perm), float("inf")
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        p = 1 - (1 - s**rows) ** bands
        cost = np.trapezoid(np.where(s < threshold, p, 0.0), s) + np.trapezoid(
            np.where(s >= threshold, 1 - p, 0.0), s
        )
        if cost < best_cost:
            best, best_cost = (bands, rows), cost
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64 keys: one hash of each band's ``rows`` signature values."""
    n = sig.shape[0]
    keys = np.zeros((n, bands), dtype=np.uint64)
    mult = splitmix64(np.arange(1, rows + 1, dtype=np.uint64)) | np.uint64(1)
    for band in range(bands):
        block = sig[:, band * rows : (band + 1) * rows].astype(np.uint64)
        keys[:, band] = splitmix64((block * mult[None, :]).sum(axis=1, dtype=np.uint64) + np.uint64(band))
    return keys


def exact_key(text: str) -> int:
    """Hash of the text with case and whitespace normalised: copies that differ only there collide."""
    norm = " ".join(text.lower().split()).encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "little")


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            # The smaller index (earlier document) is the root: it is the copy that is kept.
            lo, hi = min(rx, ry), max(rx, ry)
            self.parent[hi] = lo


def near_duplicates(
    keys: np.ndarray, candidates: np.ndarray, signature_of, threshold: float
) -> tuple[np.ndarray, int]:
    """For each document the index of the copy that is kept instead of it (-1: it is kept), and
    the number of clusters (of size >= 2) found.

    ``keys`` (N, bands) band keys; ``candidates`` bool (N,) which documents take part;
    ``signature_of(i)`` the uint32 signature of document i (may read from disk). In every
    cluster the earliest document is kept.
    """
    n = keys.shape[0]
    idx = np.flatnonzero(candidates)
    uf = UnionFind()
    checked: set[tuple[int, int]] = set()
    for band in range(keys.shape[1]):
        k = keys[idx, band]
        order = np.argsort(k, kind="stable")
        sk = k[order]
        same = np.flatnonzero(sk[1:] == sk[:-1]) + 1  # positions equal to their predecessor
        if same.size == 0:
            continue
        # Run heads: for each position in a run, the first position of that run.
        run_start = np.ones(sk.size, dtype=bool)
        run_start[same] = False
        head = np.maximum.accumulate(np.where(run_start, np.arange(sk.size), 0))
        for pos in same:
            a, b = int(idx[order[head[pos]]]), int(idx[order[pos]])
            pair = (a, b) if a < b else (b, a)
            if pair in checked or uf.find(a) == uf.find(b):
                continue
            checked.add(pair)
            if np.mean(signature_of(a) == signature_of(b)) >= threshold:
                uf.union(a, b)
    keeper = np.full(n, -1, dtype=np.int64)
    roots: set[int] = set()
    for x in list(uf.parent):
        r = uf.find(x)
        if r != x:
            keeper[x] = r
            roots.add(r)
    return keeper, len(roots)
