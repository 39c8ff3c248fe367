"""splitmix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators"): the one
64-bit mixer of lmforge. MinHash and LSH band keys spread their polynomial hashes with it, and the
pretraining sampler turns a sample slot into a pseudo-random window with it."""

from __future__ import annotations

import numpy as np

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment: the state of slot i is i * gamma


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The bijective finaliser over uint64 arrays (arithmetic wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
