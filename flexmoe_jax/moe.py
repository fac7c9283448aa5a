"""FlexOlmo routing and dropless expert dispatch, as pure functions.

Routing follows the reference exactly: router logits on the raw residual
stream, softmax over *all* experts in fp32, then top-k, with no
renormalization unless asked. An optional per-expert bias is clamped to <= 0
so a new expert can only be down-weighted relative to the public one.

Three dispatch paths compute the same function (equal to fp32 tolerance):

- ``dense``: every expert runs on every token and the outputs are mixed by the
  (mostly zero) gate matrix. Right when top_k == num_experts, as in expert
  training (2 of 2) or a router-tuned model (7 of 7); also the reference.
- ``ragged``: tokens sorted by expert, one grouped matmul per projection
  (``jax.lax.ragged_dot``). The real ragged kernel on TPU/GPU; on CPU it lowers
  to a masked dense product and is ~10x slower than a dense FFN.
- ``blocks``: the CPU design. Tokens sorted by expert and laid out so each
  expert's group starts on a block boundary; a scan over fixed-size blocks
  runs one small dense SwiGLU per block with that block's expert weights, and
  blocks past the last used one are skipped with ``lax.cond``. Only gathers
  (no scatter-adds, which are slow on CPU) move tokens in and out.

All paths are dropless: no capacity factor, no token is ever dropped.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    logits: jax.Array   # [T, E] fp32 router logits (after the clamped bias)
    weights: jax.Array  # [T, K] fp32 mixing weights of the chosen experts
    index: jax.Array    # [T, K] int32 chosen expert ids


class Experts(NamedTuple):
    gate: jax.Array  # [E, d, h]
    up: jax.Array    # [E, d, h]
    down: jax.Array  # [E, h, d]


def route(x: jax.Array, router: jax.Array, bias: jax.Array | None, top_k: int,
          norm_topk_prob: bool = False) -> Routing:
    """x [T, d], router [E, d] -> softmax over all experts, then top-k."""
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32).T,
                     precision=jax.lax.Precision.HIGHEST)
    if bias is not None:
        logits = logits + jnp.minimum(bias.astype(jnp.float32), 0.0)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, index = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(logits, weights, index.astype(jnp.int32))


def gate_matrix(r: Routing, num_experts: int) -> jax.Array:
    """[T, E] mixing weight of every expert (zero where not chosen)."""
    return jnp.einsum("tk,tke->te", r.weights, jax.nn.one_hot(r.index, num_experts, dtype=r.weights.dtype))


def router_z_loss(r: Routing) -> jax.Array:
    """Per-token logsumexp(router logits)^2 (the reference's router z-loss)."""
    return jnp.square(jax.nn.logsumexp(r.logits, axis=-1))


def _swiglu(x, gate, up, down):
    return jnp.dot(jax.nn.silu(jnp.dot(x, gate)) * jnp.dot(x, up), down)


def dispatch_dense(x: jax.Array, r: Routing, w: Experts) -> jax.Array:
    """Every expert on every token; mix with the gate matrix."""
    gates = gate_matrix(r, w.gate.shape[0]).astype(x.dtype)
    h = jax.nn.silu(jnp.einsum("td,edh->teh", x, w.gate)) * jnp.einsum("td,edh->teh", x, w.up)
    return jnp.einsum("teh,ehd->td", h * gates[:, :, None], w.down)


def _sort_by_expert(index: jax.Array, num_experts: int):
    flat = index.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return flat, order, sizes


def _combine(y_rows: jax.Array, row_of_assignment: jax.Array, r: Routing) -> jax.Array:
    """Gather each (token, k) result back and mix with its routing weight."""
    t, k = r.index.shape
    y = y_rows[row_of_assignment].reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y, r.weights.astype(y.dtype))


def dispatch_ragged(x: jax.Array, r: Routing, w: Experts) -> jax.Array:
    """Sort assignments by expert, one ``ragged_dot`` per projection."""
    t, k = r.index.shape
    _, order, sizes = _sort_by_expert(r.index, w.gate.shape[0])
    xs = x[order // k]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w.gate, sizes)) * jax.lax.ragged_dot(xs, w.up, sizes)
    ys = jax.lax.ragged_dot(h, w.down, sizes)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))
    return _combine(ys, inverse, r)


def dispatch_blocks(x: jax.Array, r: Routing, w: Experts, block_size: int = 128) -> jax.Array:
    """Block-sparse dispatch: a scan of small dense SwiGLUs over expert-aligned blocks."""
    t, d = x.shape
    k = r.index.shape[1]
    e = w.gate.shape[0]
    n = t * k
    b = max(1, min(block_size, n))
    num_blocks = -(-n // b) + e  # static upper bound: each expert wastes < 1 block
    flat, order, sizes = _sort_by_expert(r.index, e)
    padded = (sizes + b - 1) // b * b
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    start = jnp.cumsum(sizes) - sizes
    sorted_expert = flat[order]
    slot_sorted = padded_start[sorted_expert] + jnp.arange(n, dtype=jnp.int32) - start[sorted_expert]
    slot = jnp.zeros((n,), jnp.int32).at[order].set(slot_sorted.astype(jnp.int32))
    # Token feeding each padded slot; slot rows past a group's end read a zero row.
    source = jnp.full((num_blocks * b,), t, jnp.int32).at[slot].set(
        jnp.arange(n, dtype=jnp.int32) // k)
    x_padded = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[source].reshape(num_blocks, b, d)
    block_expert = jnp.minimum(
        jnp.searchsorted(padded_end, jnp.arange(num_blocks) * b, side="right"), e - 1)
    blocks_used = padded_end[-1] // b

    def body(_, inputs):
        xb, ex, i = inputs
        yb = jax.lax.cond(i < blocks_used,
                          lambda xb: _swiglu(xb, w.gate[ex], w.up[ex], w.down[ex]),
                          jnp.zeros_like, xb)
        return None, yb

    _, y_blocks = jax.lax.scan(body, None, (x_padded, block_expert, jnp.arange(num_blocks)))
    return _combine(y_blocks.reshape(num_blocks * b, d), slot, r)


def choose_impl(impl: str, top_k: int, num_experts: int, backend: str | None = None) -> str:
    """Resolve "auto": dense when every expert is chosen, else the backend's sparse path."""
    if impl != "auto":
        return impl
    if top_k >= num_experts:
        return "dense"
    backend = backend or jax.default_backend()
    return "blocks" if backend == "cpu" else "ragged"


def dispatch(x: jax.Array, r: Routing, w: Experts, impl: str = "auto",
             block_size: int = 128) -> jax.Array:
    """Dropless mixture of SwiGLU experts: x [T, d] -> [T, d]."""
    impl = choose_impl(impl, r.index.shape[1], w.gate.shape[0])
    if impl == "dense":
        return dispatch_dense(x, r, w)
    if impl == "ragged":
        return dispatch_ragged(x, r, w)
    if impl == "blocks":
        return dispatch_blocks(x, r, w, block_size)
    raise ValueError(f"unknown MoE dispatch {impl!r}; choose auto, dense, ragged or blocks")
