"""Normalized Levenshtein similarity of token-id sequences: how close a sample is to its reference."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (unit insert / delete / substitute) between two id sequences.

    One DP row at a time, vectorized: the substitute/delete part of a row is elementwise, and the
    insert chain ``cur[j] = min(cur[j-1] + 1, ...)`` is a running minimum of ``tmp[k] - k`` plus j.
    """
    a, b = np.asarray(a, np.int64).ravel(), np.asarray(b, np.int64).ravel()
    if len(a) < len(b):
        a, b = b, a
    if len(b) == 0:
        return len(a)
    cols = np.arange(len(b) + 1)
    prev = cols.copy()
    for i, x in enumerate(a, start=1):
        tmp = np.empty_like(prev)
        tmp[0] = i
        tmp[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (b != x))
        prev = np.minimum.accumulate(tmp - cols) + cols
    return int(prev[-1])


def normalized_similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """``1 - edit_distance / max(len)`` in [0, 1]; 1 means identical (two empty sequences too)."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - edit_distance(a, b) / longest
