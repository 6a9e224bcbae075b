"""Indexing shared by the datasets."""
from __future__ import annotations

import operator


def item_index(i: object, n: int) -> int:
    """`i` as an index in 0..n-1 (negative counts from the end, as for a list); IndexError outside."""
    i = operator.index(i)
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for {n} samples")
    return i % n
