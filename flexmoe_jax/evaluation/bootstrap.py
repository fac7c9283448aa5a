"""Bootstrap intervals over documents, for bits per byte and for paired differences between models.

A replicate resamples a domain's sampled documents with replacement (within each source, so a
mixture keeps its proportions) and recomputes bpb = summed NLL / ln 2 / summed bytes. The same
resampled documents are used for every model (:func:`indices` depends only on the sample and a
seed), so a difference between two models is bootstrapped paired: text that is hard for both
cancels. An average over domains averages the domains' replicates (domains resampled independently).
Intervals are percentile intervals (``LEVEL`` = 95%) from ``N_BOOT`` replicates.
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping, Sequence

import numpy as np

from flexmoe_jax.errors import UserError

N_BOOT = 1000
LEVEL = 0.95


def indices(strata: np.ndarray, n_boot: int = N_BOOT, seed: int | str = 0) -> np.ndarray:
    """``[n_boot, D]`` document indices: each replicate redraws every stratum's documents with replacement."""
    strata = np.asarray(strata)
    key = zlib.crc32(seed.encode()) if isinstance(seed, str) else int(seed)
    rng = np.random.default_rng([key, len(strata)])
    out = np.empty((n_boot, len(strata)), np.int64)
    col = 0
    for s in np.unique(strata):
        members = np.nonzero(strata == s)[0]
        out[:, col: col + len(members)] = members[rng.integers(0, len(members), (n_boot, len(members)))]
        col += len(members)
    return out


def bpb_replicates(doc_nll: Sequence[float], doc_bytes: Sequence[int], idx: np.ndarray) -> np.ndarray:
    """``[n_boot]`` bits per byte of each resample (``idx`` from :func:`indices`)."""
    nll, nbytes = np.asarray(doc_nll, np.float64), np.asarray(doc_bytes, np.float64)
    return nll[idx].sum(axis=1) / nbytes[idx].sum(axis=1) / math.log(2)


def interval(replicates: np.ndarray, level: float = LEVEL) -> list[float]:
    """The central ``level`` percentile interval ``[lo, hi]`` of bootstrap replicates."""
    lo, hi = np.percentile(np.asarray(replicates, np.float64), [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


class Paired:
    """Paired replicates over several domains: ``bpb(nll_by_domain)`` gives each domain's replicates
    (and ``average`` over the given domains) on the same resampled documents for every model.

    ``docs``: ``{domain: (doc_bytes, strata)}`` of each domain's sample."""

    def __init__(self, docs: Mapping[str, tuple[Sequence[int], Sequence[int]]], n_boot: int = N_BOOT):
        self.bytes = {d: np.asarray(b, np.float64) for d, (b, _) in docs.items()}
        self.idx = {d: indices(s, n_boot, seed=d) for d, (_, s) in docs.items()}

    def bpb(self, doc_nll: Mapping[str, Sequence[float]], average_of: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """``{domain: [n_boot] replicates}`` plus ``"average"`` over ``average_of`` if given."""
        out = {}
        for d, nll in doc_nll.items():
            if d in self.idx:
                if len(nll) != len(self.bytes[d]):
                    raise UserError(f"{d}: {len(nll)} per-document scores for a sample of {len(self.bytes[d])} "
                                    "documents; score every model on the same sample")
                out[d] = bpb_replicates(nll, self.bytes[d], self.idx[d])
        if average_of:
            out["average"] = np.mean([out[d] for d in average_of], axis=0)
        return out


def relative_difference(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> dict:
    """``(a - b) / b`` of two models' paired replicates: its interval, and whether it excludes 0."""
    rel = (np.asarray(a) - np.asarray(b)) / np.asarray(b)
    lo, hi = interval(rel, level)
    return {"ci": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)}
