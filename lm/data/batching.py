"""Cutting a list of texts into consecutive batches bounded in characters: what bounds the memory of
MinHash hashing (clean) and of the tokenizer's encoder (tokenize), whose cost grows with the
characters handled at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def char_bounded(items: list[T], max_chars: int, size: Callable[[T], int] = len) -> Iterator[list[T]]:
    """Consecutive sub-lists of at most ``max_chars`` characters (``size`` of each item; a longer
    item goes alone)."""
    start, total = 0, 0
    for i, item in enumerate(items):
        n = size(item)
        if i > start and total + n > max_chars:
            yield items[start:i]
            start, total = i, 0
        total += n
    if start < len(items):
        yield items[start:]
