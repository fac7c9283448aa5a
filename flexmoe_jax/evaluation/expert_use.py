"""Which experts a merged model's router picks for each domain's tokens (routing statistics).

Counted from the gates of the forward pass that scores the text (:meth:`ModelScorer.logprobs_and_selection`),
so :func:`flexmoe_jax.evaluation.perplexity.evaluate` reports them for an MoE at no extra cost, and
:func:`routing` (routing alone) counts them the same way on the same evaluation sample.
"""


from typing import Callable, Mapping, Sequence

import numpy as np

from flexmoe_jax import model
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.data import eval_sample as sample_lib
from flexmoe_jax.errors import UserError
from flexmoe_jax.evaluation.scorers import Batch, ModelScorer, Scorer
from flexmoe_jax.evaluation.tasks import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, resolve_tasks, short_name


class ExpertUse:
    """A running count, over one domain's batches, of the experts each real token reaches (all layers).

    ``result()``: ``{"picked": {expert: share}, "own": share | None, "tokens": tokens counted}``, a share
    being the fraction of (token, layer) pairs for which the expert has a nonzero gate: the shares sum
    to the top-k (domain routing: between 1 and 2, a public token uses the public expert alone).
    ``own`` is the share of the expert named like the domain (None if there is none): with experts
    trained apart, this is what decides how much of each owner's gain the merged model keeps.
    ``group`` (expert names) adds ``"group"``: the share for which any expert of the group is active.
    """

    def __init__(self, names: Sequence[str], domain: str, group: Sequence[str] = ()):
        self.names, self.domain = tuple(names), domain
        self.group = [i for i, n in enumerate(self.names) if n in group]
        self.picked, self.count, self.in_group, self.layers = np.zeros(len(self.names)), 0.0, 0.0, 1

    def add(self, selected, batch: Batch) -> None:
        """Count one batch: ``selected`` [L, B, S, E] (nonzero gates), real tokens from the batch's loss weights."""
        sel = np.asarray(selected)
        real = np.asarray(batch["decoder_loss_weights"]) > 0
        self.layers = sel.shape[0]
        chosen = sel[:, real]  # [L, real tokens, E]
        self.picked += chosen.sum(axis=(0, 1))
        self.count += chosen.shape[0] * chosen.shape[1]
        if self.group:
            self.in_group += chosen[..., self.group].max(axis=-1).sum()

    def scoring(self, scorer: ModelScorer) -> Callable[[Batch], np.ndarray]:
        """``batch -> [B, S] log-probs`` of ``scorer`` that counts each batch's routing on the way."""
        def score(batch: Batch) -> np.ndarray:
            lp, sel = scorer.logprobs_and_selection(batch)
            self.add(sel, batch)
            return np.asarray(lp, np.float32)
        return score

    def result(self) -> dict:
        shares = {n: float(v / max(self.count, 1.0)) for n, v in zip(self.names, self.picked)}
        out = {"picked": shares, "own": shares.get(self.domain), "tokens": int(self.count // self.layers)}
        if self.group:
            out["group"] = float(self.in_group / max(self.count, 1.0))
        return out


def counts_routing(scorer: Scorer) -> bool:
    """Whether ``scorer`` is one MoE whose routing an evaluation can count (not an ensemble or a cache;
    density routing counts: its tokens reach the experts of the sub-model it picks)."""
    if isinstance(scorer, ModelScorer):
        return scorer.config.is_moe
    return callable(getattr(scorer, "logprobs_and_selection", None)) and getattr(scorer, "config", None) is not None


def routing(config: ModelConfig, params: model.Params, data_dir, tasks: Sequence[str] | None = None,
            split: str = "test", seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = DEFAULT_BATCH_SIZE,
            max_tokens: int | None = None, sample_seed: int = 0, max_doc_tokens: int | None = None,
            routing_stats: Mapping | None = None,
            mode: str | None = None, groups: Mapping[str, Sequence[str]] | None = None,
            score: Mapping | None = None) -> dict:
    """Where a merged model sends each domain's tokens: :class:`ExpertUse` of every domain's
    evaluation sample (the documents :func:`perplexity` scores with the same ``max_tokens`` /
    ``sample_seed`` / ``max_doc_tokens``). ``mode``: the routing mode (:func:`flexmoe_jax.routing.resolve`,
    ``routing_stats`` for ``domain``). ``groups`` ({domain: expert names}) adds each domain's ``"group"``
    share. Returns ``{domain: ExpertUse.result()}``.
    """
    if not config.is_moe:
        raise UserError("routing statistics need an MoE model; this one is dense (num_experts=0)")
    scorer = ModelScorer(config, params, routing=mode, routing_stats=routing_stats, score=score)
    out = {}
    for task in resolve_tasks(data_dir, tasks):
        dom = short_name(task)
        s = sample_lib.draw(data_dir, task, split, min(seq_len, config.max_seq_len), max_tokens, sample_seed,
                            max_doc_tokens)
        use = ExpertUse(scorer.config.names, dom, (groups or {}).get(dom, ()))
        for _, batch in s.batches(batch_size):
            use.add(scorer.logprobs_and_selection(batch)[1], batch)
        out[dom] = use.result()
    return out
