"""The inference-time baselines: model soup and the BTM ensemble, as scorers.

Model soup (:func:`soup`, :func:`soup_scorer`)
  A soup is the uniform parameter average of models fine-tuned from one initialization
  (Wortsman et al. 2022); FlexOlmo's soup baseline averages its dense experts. Our owners do not
  train dense models, so each pool member is viewed as one: the anchor as itself (the public
  domain's model), an owner's 2-expert model as its shared tensors plus its slot-1 FFN, which is
  exactly what its training moved away from the anchor's FFN. The soup averages every tensor of
  these dense views: the FFNs, and the shared tensors too (all identical to the anchor in FlexOlmo,
  so averaging them changes nothing, but a pool whose shared tensors moved gets the true soup).
  Routers and biases have no dense counterpart and are dropped. By default the pool is the public
  model plus every owner, the same n + 1 "domain models" the merged FlexOlmo holds as experts
  (and every owner's model itself always mixes the public FFN with its own: top-2 of 2);
  ``include_public=False`` averages the owners' FFNs only.

BTM (:class:`BTMScorer`, :func:`btm_scorer`)
  Branch-Train-Merge (Li et al. 2022) ensembles the domain models' output *distributions* with
  weights from Bayes' rule on the context: ``w_m(t) ∝ prior_m * p_m(x_<t)``. We use the whole
  preceding part of the token's own segment (document piece) as the context, so a token's weights
  use only tokens before it, never itself or anything after (causal, no peeking), and the first
  token of a segment uses the prior. Mixing is ``log sum_m w_m(t) p_m(x_t | x_<t)`` with
  logsumexp in log space. With the full prefix this is exactly the Bayesian model average: a
  segment's summed log-likelihood equals ``log sum_m prior_m p_m(segment)`` (tested).
  ``top_k`` keeps only each token's k heaviest members (FlexOlmo's "BTM top-2" baseline; ties at
  the k-th weight are kept, so the first token, with equal prior weights, uses every member).
  Members are, by default, the public anchor plus each owner's 2-expert model.

  Which tokens enter the weights (``context``): ``"segment"`` (above) recomputes them at every token
  from the whole segment so far; on a long in-domain document that converges to perfect routing
  over the members. ``"input"`` is the paper's form: the weights come from the *input* once, as a
  prompt would give them: a multiple-choice row's question (the batch's ``decoder_prompt_mask``),
  else the first ``context_tokens`` tokens of each segment; tokens inside that prefix use the
  prefix before them (causal), every later token the whole prefix.

Density routing (:func:`density_scorer`)
  Routing that publishes nothing but the weights: the merged model restricted to {public, d} is
  owner d's own 2-expert model (opt-out is exact), so each expert pair is its own density model of
  its owner's text. Each token goes to the member (public alone, or {public, d}) whose likelihood of
  the segment so far is highest: BTM's top-1 over the merged model's sub-models. It costs one forward
  pass per member (the public model and every owner's), as BTM does; docs/routing.md measures it.

"""


import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import model
from flexmoe_jax.config import ModelConfig, arch_diff
from flexmoe_jax.errors import UserError
from flexmoe_jax.evaluation.models import load_model
from flexmoe_jax.evaluation.scorers import Batch, ModelScorer, Scorer


def dense_view(config: ModelConfig, params: model.Params) -> tuple[ModelConfig, model.Params]:
    """A pool member as a dense model: a dense model is itself; an owner's 2-expert model
    (public, own) is its shared tensors plus its own slot-1 FFN (what its training changed)."""
    if not config.is_moe:
        return config, params
    if config.num_experts != 2 or config.names[0] != "public":
        raise UserError(f"a soup averages dense models and owners' 2-expert models (public, own); got a model "
                        f"with experts {list(config.names)}. Give each owner's own model, not a merged one")
    layers = {k: v for k, v in params["layers"].items() if k != "moe"}
    layers["mlp"] = {k: params["layers"]["moe"][k][:, 1] for k in ("gate", "up", "down")}
    dense = config.replace(num_experts=0, top_k=1, expert_names=(), expert_bias=False)
    return dense, {**params, "layers": layers}




def soup(models: Sequence[tuple[ModelConfig, model.Params]],
         weights: Sequence[float] | None = None) -> tuple[ModelConfig, model.Params]:
    """The parameter average (uniform unless ``weights``) of the dense views of ``models``.

    Returns a dense (config, params) with the first model's dense config. Averaging is in float32,
    cast back to each parameter's dtype. See the module docstring for what is averaged and why.
    """
    if not models:
        raise UserError("a soup needs at least one model")
    views = [dense_view(c, p) for c, p in models]
    base = views[0][0]
    for i, (c, _) in enumerate(views[1:], 1):
        diff = [f"{k}={x} vs {y}" for k, (x, y) in arch_diff(c, base).items()]
        if diff:
            raise UserError(f"soup member {i} has another architecture than member 0 ({', '.join(diff)}); "
                            "only models fine-tuned from the same anchor can be averaged")
    w = np.full(len(views), 1.0 / len(views)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(views),) or not np.all(w >= 0) or not np.isclose(w.sum(), 1.0):
        raise UserError(f"soup weights must be {len(views)} non-negative numbers summing to 1, got {weights}")
    for i, (c, p) in enumerate(views):
        model.check_params(c, p, f"soup member {i}")

    def avg(*xs):
        acc = sum(float(wi) * jnp.asarray(x, jnp.float32) for wi, x in zip(w, xs))
        return acc.astype(jnp.asarray(xs[0]).dtype)

    params = jax.tree.map(avg, *[p for _, p in views])
    return base, params


# -- BTM ensemble -------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("top_k", "mean"))
def _member_logweights(member_logprobs: jax.Array, segment_ids: jax.Array, log_prior: jax.Array,
                       top_k: int | None, temperature: float, mean: bool,
                       context_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(unnormalized log-weights [M, B, S], -inf for members outside a token's top-k; the masked
    log-probs) of :func:`btm_combine`."""
    valid = segment_ids > 0
    lp = jnp.where(valid[None], member_logprobs.astype(jnp.float32), 0.0)
    use = valid if context_mask is None else valid & context_mask.astype(bool)
    lp_use = jnp.where(use[None], lp, 0.0)
    before = jnp.cumsum(lp_use, axis=-1) - lp_use  # sum over context positions < t of the row
    n_before = jnp.cumsum(use, axis=-1, dtype=jnp.int32) - use  # how many there are
    s = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    seg_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)  # first position of t's segment
    at_start = jnp.take_along_axis(before, jnp.broadcast_to(seg_start[None], before.shape), axis=-1)
    context = before - at_start  # [M, B, S] log-likelihood of the segment's context tokens before t
    if mean:
        n = n_before - jnp.take_along_axis(n_before, seg_start, axis=-1)
        context = context / jnp.maximum(n, 1)[None].astype(jnp.float32)
    logw = log_prior[:, None, None] + context / temperature
    m = logw.shape[0]
    if top_k is not None and top_k < m:
        kth = jax.lax.top_k(jnp.moveaxis(logw, 0, -1), top_k)[0][..., -1]
        logw = jnp.where(logw >= kth[None], logw, -jnp.inf)
    return logw, lp


@functools.partial(jax.jit, static_argnames=("top_k", "mean"))
def btm_combine(member_logprobs: jax.Array, segment_ids: jax.Array, log_prior: jax.Array,
                top_k: int | None = None, temperature: float = 1.0, mean: bool = False,
                context_mask: jax.Array | None = None) -> jax.Array:
    """Mix M members' per-token log-probs [M, B, S] into the BTM ensemble's [B, S].

    Member m's weight at token t is ``softmax_m(log_prior_m + sum of m's log-probs of the tokens
    before t in t's segment)``: the posterior over members given the segment so far. Only earlier
    tokens of the same segment (a run of equal non-zero ``segment_ids``) enter a token's weights,
    and of those only the ones ``context_mask`` [B, S] marks (default all: the paper's form marks
    the input's prompt). ``mean=True, temperature=T`` is the paper's weighting: ``softmax_m(-NLL_m / T)``
    with NLL the mean negative log-likelihood of the context (uniform before any context);
    ``top_k`` keeps the k heaviest members, renormalized.
    """
    logw, lp = _member_logweights(member_logprobs, segment_ids, log_prior, top_k, temperature, mean, context_mask)
    return _mix(logw, lp, segment_ids)


CONTEXTS = ("segment", "input")  # which tokens enter BTM's weights (module docstring)
PROMPT_MASK = "decoder_prompt_mask"  # batch feature: 1 on a row's prompt (a multiple-choice question)


def input_context_mask(batch: Batch, context_tokens: int) -> jax.Array:
    """[B, S] bool: the tokens the paper-form BTM weights come from: the batch's
    :data:`PROMPT_MASK` when it has one, else each segment's first ``context_tokens`` tokens."""
    if PROMPT_MASK in batch:
        return jnp.asarray(batch[PROMPT_MASK]) > 0
    return jnp.asarray(batch["decoder_positions"]) < context_tokens


@jax.jit
def _mix(logw: jax.Array, lp: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The ensemble's [B, S] log-probs from :func:`_member_logweights`' weights and masked log-probs."""
    mixed = jax.nn.logsumexp(jax.nn.log_softmax(logw, axis=0) + lp, axis=0)
    return jnp.where(segment_ids > 0, mixed, 0.0)


class BTMScorer(Scorer):
    """Branch-Train-Merge ensemble of member scorers (see the module docstring and :func:`btm_combine`)."""

    def __init__(self, members: Sequence[Scorer], prior: Sequence[float] | None = None,
                 top_k: int | None = None, name: str = "btm", temperature: float = 1.0, mean: bool = False,
                 context: str = "segment", context_tokens: int = 32):
        members = list(members)
        if not members:
            raise UserError("a BTM ensemble needs at least one member")
        if len({m.vocab_size for m in members}) != 1:
            raise UserError(f"BTM members must share one vocabulary, got sizes {[m.vocab_size for m in members]}")
        p = np.full(len(members), 1.0 / len(members)) if prior is None else np.asarray(prior, np.float64)
        if p.shape != (len(members),) or not np.all(p > 0):
            raise UserError(f"the BTM prior needs {len(members)} positive numbers, got {prior}")
        if top_k is not None and not 1 <= top_k <= len(members):
            raise UserError(f"BTM top_k={top_k} must be between 1 and the {len(members)} members")
        if not temperature > 0:
            raise UserError(f"BTM temperature must be positive, got {temperature}")
        if context not in CONTEXTS:
            raise UserError(f"BTM context must be one of {CONTEXTS}, got {context!r}")
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 1:
            raise UserError(f"BTM context_tokens must be a positive integer, got {context_tokens!r}")
        self.members, self.top_k, self.name = members, top_k, name
        self.context, self.context_tokens = context, context_tokens
        self.temperature, self.mean = float(temperature), bool(mean)
        self.log_prior = jnp.asarray(np.log(p / p.sum()), jnp.float32)
        self.vocab_size = members[0].vocab_size
        self.max_seq_len = min(m.max_seq_len for m in members)

    def context_mask(self, batch: Batch) -> jax.Array | None:
        """The tokens this ensemble's weights come from (None: every earlier token of the segment)."""
        return None if self.context == "segment" else input_context_mask(batch, self.context_tokens)

    def logprobs(self, batch: Batch) -> jax.Array:
        lps = jnp.stack([m.logprobs(batch) for m in self.members])
        segs = jnp.asarray(batch["decoder_segment_ids"], jnp.int32)
        return btm_combine(lps, segs, self.log_prior, self.top_k, self.temperature, self.mean,
                           self.context_mask(batch))

def _as_model(m: Any) -> tuple[ModelConfig, model.Params]:
    if isinstance(m, ModelScorer):
        return m.config, m.params
    if isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], ModelConfig):
        return m
    return load_model(m)


def soup_scorer(anchor: Any, experts: Sequence[Any], *, include_public: bool = True,
                weights: Sequence[float] | None = None, name: str = "soup") -> ModelScorer:
    """The soup baseline as a scorer. ``anchor`` and each expert: a checkpoint path, a run
    directory, a (config, params) tuple or a :class:`ModelScorer`; experts are owners' 2-expert models."""
    pool = ([_as_model(anchor)] if include_public else []) + [_as_model(e) for e in experts]
    config, params = soup(pool, weights)
    return ModelScorer(config, params, name=name)


class DensityScorer(BTMScorer):
    """:class:`BTMScorer` top-1 over a merged model's sub-models, which also reports, like a
    :class:`ModelScorer` of the merged model, the experts each token reached (the experts of its
    chosen member; of every tied member at a segment's first token), so evaluations count its routing."""

    def __init__(self, config: ModelConfig, members: Sequence[Scorer], pools: Sequence[Sequence[str]], name: str):
        super().__init__(members, top_k=1, name=name)
        self.config = config
        self.member_experts = jnp.asarray([[n in p for n in config.names] for p in pools])  # [M, E]

    def logprobs_and_selection(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """(:meth:`logprobs`, [1, B, S, E] bool: the experts of each token's kept members)."""
        lps = jnp.stack([m.logprobs(batch) for m in self.members])
        segs = jnp.asarray(batch["decoder_segment_ids"], jnp.int32)
        logw, lp = _member_logweights(lps, segs, self.log_prior, 1, self.temperature, self.mean)
        kept = jnp.isfinite(logw)  # [M, B, S]
        sel = jnp.any(kept[..., None] & self.member_experts[:, None, None, :], axis=0)
        return _mix(logw, lp, segs), sel[None]


def density_scorer(config: ModelConfig, params: model.Params, name: str = "density") -> DensityScorer:
    """Density routing of a merged model (module docstring): BTM top-1 over {public} and each
    {public, d}, all sliced from this one model."""
    from flexmoe_jax import selection

    if not config.is_moe or "public" not in config.names or len(config.names) < 2:
        raise UserError(f"density routing needs a merged model with the 'public' expert and at least one owner; "
                        f"{name} has experts {list(config.names) if config.is_moe else 'none (dense)'}")
    pools = [["public"]] + [["public", n] for n in config.names if n != "public"]
    members = [ModelScorer(*selection.select(config, params, include=p), name=f"{name}[{'+'.join(p)}]", routing="top_k")
               for p in pools]
    return DensityScorer(config, members, pools, name)


def btm_scorer(anchor: Any, experts: Sequence[Any], *, include_public: bool = True,
               prior: Sequence[float] | None = None, top_k: int | None = None, name: str = "btm",
               temperature: float = 1.0, mean: bool = False, context: str = "segment",
               context_tokens: int = 32) -> BTMScorer:
    """The BTM baseline as a scorer: the public anchor (unless ``include_public=False``) and each
    expert (an owner's 2-expert model, or the paper's dense expert) as members; ``top_k`` /
    ``temperature`` / ``mean`` as in :func:`btm_combine`, ``context`` / ``context_tokens`` as in the
    module docstring. Arguments as in :func:`soup_scorer`."""
    pool = ([anchor] if include_public else []) + list(experts)
    members = [m if isinstance(m, Scorer) else ModelScorer(*_as_model(m), name=f"btm_member_{i}")
               for i, m in enumerate(pool)]
    return BTMScorer(members, prior=prior, top_k=top_k, name=name, temperature=temperature, mean=mean,
                     context=context, context_tokens=context_tokens)
