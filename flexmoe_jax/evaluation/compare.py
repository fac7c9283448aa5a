"""Paired comparisons of models scored on the same evaluation sample, with bootstrap intervals.

Input: the per-document scores :func:`flexmoe_jax.eval.main_eval` writes beside its results
(``{model: {domain: {"doc_nll", "doc_bytes", "doc_source"}}}``, :func:`flexmoe_jax.eval.docs_path`).
Every comparison resamples the same documents for both models (:class:`.bootstrap.Paired`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from flexmoe_jax.errors import UnknownName, UserError
from flexmoe_jax.evaluation import bootstrap


class Comparison:
    """Bootstrap replicates of every model's bpb per domain and averaged over ``closed`` domains."""

    def __init__(self, docs: Mapping[str, Mapping[str, dict]], closed: Sequence[str], n_boot: int = bootstrap.N_BOOT):
        if not docs:
            raise UserError("no per-document scores to compare: evaluate models with main_eval(json_out=...) first")
        first = next(iter(docs.values()))
        self.domains = list(first)
        self.closed = [d for d in closed if d in first]
        self.paired = bootstrap.Paired({d: (r["doc_bytes"], r["doc_source"]) for d, r in first.items()}, n_boot)
        self._docs = docs
        self._reps: dict[str, dict] = {}

    def replicates(self, model: str) -> dict:
        if model not in self._docs:
            raise UnknownName(f"no per-document scores for {model!r}")
        if model not in self._reps:
            nll = {d: r["doc_nll"] for d, r in self._docs[model].items()}
            self._reps[model] = self.paired.bpb(nll, self.closed if all(d in nll for d in self.closed) else ())
        return self._reps[model]

    def interval(self, model: str, domain: str = "average") -> list[float]:
        """The 95% interval of one model's bpb on a domain (or the closed-domain average)."""
        return bootstrap.interval(self.replicates(model)[domain])

    def difference(self, model: str, reference: str, domain: str = "average") -> dict:
        """``(bpb_model - bpb_reference) / bpb_reference`` on a domain: its paired 95% interval."""
        return bootstrap.relative_difference(self.replicates(model)[domain], self.replicates(reference)[domain])

    def change(self, model: str, reference: str, domain: str) -> list[float]:
        """The paired 95% interval of the absolute bpb change ``model - reference`` on a domain."""
        a, b = self.replicates(model)[domain], self.replicates(reference)[domain]
        return bootstrap.interval(a - b)
