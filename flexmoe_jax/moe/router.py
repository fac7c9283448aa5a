"""Router: logits on the residual stream, softmax over all experts, top-k.

Follows the reference: fp32 softmax over *all* experts, then top-k, no
renormalization unless asked; an optional per-expert bias is clamped to <= 0.
See docs/model.md (Routing).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    logits: jax.Array   # [T, E] fp32 router logits (after the clamped bias)
    weights: jax.Array  # [T, K] fp32 mixing weights of the chosen experts
    index: jax.Array    # [T, K] int32 chosen expert ids



def router_logits(x: jax.Array, router: jax.Array, bias: jax.Array | None, score: str = "dot",
                  temperature: float = 1.0) -> jax.Array:
    """x [T, d], router [E, d] -> [T, E] fp32 logits, plus the clamped (<= 0) bias. ``score="cosine"``:
    unit-normalized residual and rows (a zero row scores 0), divided by ``temperature``."""
    x, router = x.astype(jnp.float32), router.astype(jnp.float32)
    if score == "cosine":
        unit = lambda v: v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-12))  # noqa: E731
        x, router = unit(x) / temperature, unit(router)
    logits = jnp.dot(x, router.T, precision=jax.lax.Precision.HIGHEST)
    if bias is not None:
        logits = logits + jnp.minimum(bias.astype(jnp.float32), 0.0)
    return logits


def route(x: jax.Array, router: jax.Array, bias: jax.Array | None, top_k: int,
          norm_topk_prob: bool = False, token_bias: jax.Array | None = None,
          always: int | None = None, logits: jax.Array | None = None) -> Routing:
    """x [T, d], router [E, d] -> softmax over all experts, then top-k.

    ``token_bias`` [T, E] (fp32) is added to every token's logits: a routing mode's per-token decision
    (:mod:`flexmoe_jax.routing`), e.g. -inf on experts a token may not use. ``always``: an expert
    chosen for every token (``public_plus``) with its softmax weight, plus the top-(k-1) others.
    ``logits``: precomputed [T, E] logits (document-averaged ones) instead of ``x @ router.T + bias``.
    """
    if logits is None:
        logits = router_logits(x, router, bias)
    if token_bias is not None:
        logits = logits + token_bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if always is None:
        weights, index = jax.lax.top_k(probs, top_k)
    else:  # probabilities are <= 1, so +2 puts `always` first without changing the others' order
        _, index = jax.lax.top_k(probs + 2.0 * (jnp.arange(probs.shape[-1]) == always), top_k)
        weights = jnp.take_along_axis(probs, index, axis=-1)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(logits, weights, index.astype(jnp.int32))


def segment_cumsum(v: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, S, ...] -> the sum of ``v`` over each token's segment up to and including it (packed rows:
    ``positions`` restart at 0 with each segment; segment 0, padding, contributes nothing)."""
    valid = (segment_ids > 0).reshape(segment_ids.shape + (1,) * (v.ndim - 2))
    cum = jnp.cumsum(jnp.where(valid, v, 0), axis=1)
    start = jnp.arange(v.shape[1])[None, :] - positions  # first slot of each token's segment
    idx = jnp.maximum(start - 1, 0).reshape(start.shape + (1,) * (v.ndim - 2))
    before = jnp.take_along_axis(cum, jnp.broadcast_to(idx, start.shape + v.shape[2:]), axis=1)
    return cum - jnp.where((start > 0).reshape(idx.shape), before, 0)


def gate_matrix(r: Routing, num_experts: int) -> jax.Array:
    """[T, E] mixing weight of every expert (zero where not chosen)."""
    return jnp.einsum("tk,tke->te", r.weights, jax.nn.one_hot(r.index, num_experts, dtype=r.weights.dtype))


def router_z_loss(r: Routing) -> jax.Array:
    """Per-token logsumexp(router logits)^2 (the reference's router z-loss)."""
    return jnp.square(jax.nn.logsumexp(r.logits, axis=-1))

