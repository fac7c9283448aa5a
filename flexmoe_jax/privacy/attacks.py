"""Attacks on what an owner publishes, as functions of scores and tables (no model code here).

- Membership: an attack gives each candidate a score (higher: "it was in the data"); :func:`membership`
  reports AUC and the true-positive rate at a fixed false-positive rate, members against non-members.
- :class:`PairModel`: a routing-stats file (exact counts or a private release) read as the bigram model
  domain routing uses; :meth:`PairModel.ratio` is the likelihood-ratio score against a reference model
  and :meth:`PairModel.min_pair` the "are all its pairs in the table" score.
- Reconstruction: :func:`complete` walks a table's most frequent successors to finish a string from its
  first token; :func:`chain_spans` builds long greedy chains and counts how many of their n-grams occur
  in a text (trained-on against held-out).
- Canaries: :func:`exposure`, the rank of the planted string among random candidates of its format.

Definitions and why: docs/privacy.md ("The audit").
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

from flexmoe_jax import routing

FPR = 0.1  # the false-positive rate the true-positive rate is read at


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(score of a random member > that of a random non-member), ties half (Mann-Whitney)."""
    a, b = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    if a.size == 0 or b.size == 0:
        return float("nan")
    both = np.concatenate([a, b])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(both.size)
    sorted_v = both[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_v)) + 1]
    ends = np.r_[starts[1:], both.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e - 1) / 2 + 1
    return float((ranks[: a.size].sum() - a.size * (a.size + 1) / 2) / (a.size * b.size))


def tpr_at(members: Sequence[float], nonmembers: Sequence[float], fpr: float = FPR) -> float:
    """Fraction of members scoring above the non-members' (1 - ``fpr``) quantile (strictly)."""
    a, b = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    if a.size == 0 or b.size == 0:
        return float("nan")
    return float(np.mean(a > np.quantile(b, 1 - fpr)))


def auc_se(a: float, m: int, n: int) -> float:
    """Hanley & McNeil's standard error of an AUC ``a`` from ``m`` members and ``n`` non-members."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return math.sqrt(max(a * (1 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a), 0.0) / (m * n))


def membership(members: Sequence[float], nonmembers: Sequence[float]) -> dict:
    """``{"members", "nonmembers", "auc", "auc_se", "tpr_at_fpr", "fpr"}`` of one attack's scores."""
    a = auc(members, nonmembers)
    return {"members": len(members), "nonmembers": len(nonmembers), "auc": round(a, 4),
            "auc_se": round(auc_se(a, len(members), len(nonmembers)), 4),
            "tpr_at_fpr": round(tpr_at(members, nonmembers), 4), "fpr": FPR}


class PairModel:
    """A routing-stats file as domain routing reads it (routing.token_ll, in numpy): smoothed unigram
    log-probs and pair-bucket counts (exact pairs hashed into 2^HASH_BITS buckets, or the sketch)."""

    def __init__(self, stats: routing.Stats, vocab_size: int | None = None):
        V = vocab_size or stats.counts.shape[0]
        self.vocab_size = V
        self.uni = routing.log_probs({stats.name: stats}, [stats.name], V)[0].astype(np.float64)
        uni_counts, sketch = routing.denoised(stats)
        self.counts = np.zeros(V)
        self.counts[: stats.counts.shape[0]] = uni_counts
        if sketch is not None:
            self.table = np.asarray(sketch, np.float64)
        elif stats.pairs is not None:
            self.table = np.zeros(1 << routing.HASH_BITS)
            prev, cur = np.divmod(stats.pairs, V)
            np.add.at(self.table, routing._pair_hash(prev, cur, V, np), stats.pair_counts)
        else:
            self.table = None
        self.bits = 0 if self.table is None else self.table.size.bit_length() - 1
        self.mu = routing.smoothing(stats)[1]

    def pair_counts(self, prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
        """The table's count of each pair (prev, cur)."""
        return self.table[routing._pair_hash(np.asarray(prev), np.asarray(cur), self.vocab_size, np, self.bits)]

    def log_prob(self, prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
        """log p(cur | prev) of the routing model (prev 0: the unigram model)."""
        prev, cur = np.asarray(prev), np.asarray(cur)
        uni = self.uni[cur]
        if self.table is None:
            return uni
        bi = np.log(self.pair_counts(prev, cur) + self.mu * np.exp(uni)) - np.log(self.counts[prev] + self.mu)
        return np.where(prev > 0, bi, uni)

    def sequence_ll(self, seq: Sequence[int]) -> float:
        """log-likelihood of a token sequence (its first token under the unigram model)."""
        s = np.asarray(seq, np.int64)
        return float(self.log_prob(np.r_[0, s[:-1]], s).sum())

    def ratio(self, seq: Sequence[int], reference: "PairModel") -> float:
        """Likelihood-ratio membership score: this model's log-likelihood minus the reference's."""
        return self.sequence_ll(seq) - reference.sequence_ll(seq)

    def min_pair(self, seq: Sequence[int]) -> float:
        """Smallest table count over the sequence's consecutive pairs ("every pair is in the table")."""
        s = np.asarray(seq, np.int64)
        if self.table is None or s.size < 2:
            return 0.0
        return float(self.pair_counts(s[:-1], s[1:]).min())

    def successor(self, prev: int, exclude: Iterable[int] = (0,)) -> int:
        """The token with the largest table count after ``prev`` (ties: the smaller id)."""
        cand = np.arange(self.vocab_size)
        c = self.pair_counts(np.full(self.vocab_size, prev), cand)
        c[list(exclude)] = -np.inf
        return int(np.argmax(c))


def complete(model: PairModel, seqs: Sequence[Sequence[int]], given: int = 1) -> float:
    """Fraction of ``seqs`` (>= given + 1 tokens) the greedy walk rebuilds exactly from their first
    ``given`` tokens."""
    seqs = [s for s in seqs if len(s) > given]
    if not seqs:
        return float("nan")
    hit = 0
    for s in seqs:
        out = list(s[:given])
        while len(out) < len(s):
            out.append(model.successor(out[-1]))
            if out[-1] != s[len(out) - 1]:
                break
        hit += out == list(s)
    return hit / len(seqs)


def ngrams(docs: Iterable[Sequence[int]], n: int) -> set:
    """Every n-gram (tuple of token ids) of the documents."""
    out = set()
    for d in docs:
        out.update(tuple(d[i: i + n]) for i in range(len(d) - n + 1))
    return out


def chain_spans(model: PairModel, starts: Sequence[int], length: int, n: int,
                texts: dict[str, set]) -> dict:
    """Greedy chains of ``length`` tokens from each start token (the walk never reuses a pair, as a
    count table runs out); for each named text (its n-gram set, :func:`ngrams`) the fraction of the
    chains' n-grams found in it. Trained-on far above held-out = the table gives spans back."""
    grams: list[tuple] = []
    for t in starts:
        out, used = [int(t)], set()
        while len(out) < length:
            nxt = model.successor(out[-1])
            if (out[-1], nxt) in used:
                break
            used.add((out[-1], nxt))
            out.append(nxt)
        grams.extend(tuple(out[i: i + n]) for i in range(len(out) - n + 1))
    return {"chains": len(starts), "ngrams": len(grams), "n": n,
            **{f"in_{k}": round(sum(g in s for g in grams) / max(len(grams), 1), 4) for k, s in texts.items()}}


def exposure(true_score: float, candidate_scores: Sequence[float]) -> float:
    """Canary exposure in bits: log2(candidates + 1) - log2(rank of the true canary among them and
    itself), rank 1 = it scores highest (ties count against the canary)."""
    c = np.asarray(candidate_scores, np.float64)
    rank = 1 + int(np.sum(c >= true_score))
    return math.log2(c.size + 1) - math.log2(rank)


def score_all(score: Callable[[Sequence[int]], float], seqs: Sequence[Sequence[int]]) -> list[float]:
    return [float(score(s)) for s in seqs]
