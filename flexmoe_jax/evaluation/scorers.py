"""Scorers: every model kind behind one interface, for packed rows of tokens.

A :class:`Scorer` gives ``log p(target_t | the tokens before t in its segment)`` for packed rows, so
one evaluation loop runs a single (config, params) model (:class:`ModelScorer`: dense, MoE, an
owner's 2-expert model, or a merged FlexOlmo with experts opted out), an ensemble
(:mod:`.ensembles`) or cached scores (:class:`CachedScorer`). Scores are computed jitted on whole
batches; only per-token log probabilities ``[B, S]`` leave the device, never logits.
"""


import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import model, routing as routing_lib, selection
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.evaluation.models import default_name, default_routing, load_model

Batch = dict[str, Any]


class Scorer:
    """Log-probabilities of next tokens for packed rows; every model kind evaluates through this.

    ``logprobs(batch)`` takes the seqio decoder features (``decoder_input_tokens``,
    ``decoder_target_tokens``, ``decoder_positions``, ``decoder_segment_ids``, int32 [B, S]) and
    returns float32 [B, S]: ``log p(target_t | inputs of t's segment up to t)``, 0 where
    ``decoder_segment_ids == 0`` (padding). Rows are independent; segments of a row never see
    each other. Subclasses set ``name``, ``vocab_size`` and ``max_seq_len``.
    """

    name: str = "model"
    vocab_size: int = 0
    max_seq_len: int = 0

    def logprobs(self, batch: Batch) -> jax.Array:
        raise NotImplementedError

    def token_logprobs(self, batch: Batch) -> np.ndarray:
        """:meth:`logprobs` as a host numpy array."""
        return np.asarray(jax.device_get(self.logprobs(batch)), np.float32)


@functools.partial(jax.jit, static_argnames=("config", "selection"))
def _model_logprobs(config: ModelConfig, params, inputs, targets, positions, segment_ids, route_bias=None,
                    selection: bool = False):
    """[B, S] log-probs of the targets; with ``selection`` also [L, B, S, E] bool: which experts each
    token reached in each layer (nonzero gate), from the same forward pass."""
    logits, aux = model.apply(config, params, inputs, positions, segment_ids, route_bias=route_bias)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    lp = jnp.where(segment_ids > 0, target_logit - lse, 0.0)
    return (lp, aux["gates"] > 0) if selection else lp


def _device_batch(batch: Batch) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(batch[k], jnp.int32) for k in
                 ("decoder_input_tokens", "decoder_target_tokens", "decoder_positions", "decoder_segment_ids"))


class ModelScorer(Scorer):
    """One (config, params) model: dense, MoE, optionally with only ``active_experts`` kept.

    Opt-out slices the expert axis once here (:mod:`flexmoe_jax.selection`: routing then softmaxes
    over the kept experts only, top-k capped), so every batch runs the smaller model.
    ``routing`` (:data:`flexmoe_jax.routing.MODES`; default the config's own) picks the routing
    mode; ``domain`` needs ``routing_stats`` ({expert name: :class:`flexmoe_jax.routing.Stats`}) for
    the active experts (given alone, they mean ``domain``).
    """

    def __init__(self, config: ModelConfig, params: model.Params, *,
                 active_experts: Sequence[str | int] | None = None, top_k: int | None = None,
                 name: str = "model", routing: str | None = None, routing_stats: Mapping | None = None,
                 score: Mapping | None = None):
        model.check_params(config, params)
        config, params = selection.select(config, params, include=active_experts, top_k=top_k)
        config, self.router = routing_lib.resolve(config, routing, routing_stats, name, score)
        self.config, self.params, self.name = config, params, name
        self.vocab_size, self.max_seq_len = config.vocab_size, config.max_seq_len

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, include: Sequence[str | int] | None = None,
                        exclude: Sequence[str | int] | None = None, top_k: int | None = None,
                        name: str | None = None, routing: str | None = None,
                        routing_stats: Mapping | None = None, score: Mapping | None = None) -> "ModelScorer":
        """Load any model checkpoint (plain, merged, or a run directory's ``model/``) with
        ``loading.load``, which never reads an excluded expert's arrays of a merged model. ``routing``
        None is :func:`default_routing`; domain routing without ``routing_stats`` uses the ones a
        merged model carries (its kept experts')."""
        config, params = load_model(path, include=include, exclude=exclude, top_k=top_k)
        if routing_stats is None:
            routing, routing_stats = default_routing(path, config, routing)
        return cls(config, params, name=name or default_name(path, include, exclude), routing=routing,
                   routing_stats=routing_stats, score=score)

    def logprobs(self, batch: Batch) -> jax.Array:
        return self._forward(batch, selection=False)

    def logprobs_and_selection(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """:meth:`logprobs` and, from the same forward pass, [L, B, S, E] bool: the experts each token
        reached in each layer (an MoE's routing statistics cost no second pass)."""
        if not self.config.is_moe:
            raise UserError(f"{self.name} is a dense model: it has no experts to route to")
        return self._forward(batch, selection=True)

    def _forward(self, batch: Batch, selection: bool):
        inputs, targets, positions, segs = _device_batch(batch)
        if inputs.shape[1] > self.max_seq_len:
            raise UserError(f"rows of {inputs.shape[1]} tokens exceed {self.name}'s max_seq_len="
                            f"{self.max_seq_len}; evaluate with a smaller seq_len")
        bias = None if self.router is None else self.router.bias(inputs, positions, segs)
        return _model_logprobs(self.config, self.params, inputs, targets, positions, segs, bias, selection)


def _batch_key(batch: Batch) -> bytes:
    """A digest of the four decoder features: equal batches (same tokens, positions, segments) collide."""
    import hashlib

    h = hashlib.blake2b(digest_size=20)
    for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_positions", "decoder_segment_ids"):
        a = np.ascontiguousarray(np.asarray(batch[k], np.int32))
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.digest()


class CachedScorer(Scorer):
    """A scorer that remembers its per-token log-probs of every batch it has scored, keyed by the
    batch's contents. Why: the BTM row ensembles the public model and every owner's model, which
    the evaluation has just scored on exactly the same batches as rows of their own; sharing one
    cached scorer per model turns BTM into the (cheap) mixing step alone. The cache holds [B, S]
    float32 arrays (8 KB for a 16 x 128 batch), never logits."""

    def __init__(self, inner: Scorer, name: str | None = None):
        self.inner, self.name = inner, name or inner.name
        self.vocab_size, self.max_seq_len = inner.vocab_size, inner.max_seq_len
        self._cache: dict[bytes, jax.Array] = {}
        self.hits = 0

    def logprobs(self, batch: Batch) -> jax.Array:
        key = _batch_key(batch)
        if key in self._cache:
            self.hits += 1
        else:
            self._cache[key] = self.inner.logprobs(batch)
        return self._cache[key]


# -- model soup ---------------------------------------------------------------
