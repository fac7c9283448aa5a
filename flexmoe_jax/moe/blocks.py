"""Block-sparse CPU dispatch: per expert, dense SwiGLU matmuls over blocks of rows that hold tokens.

Assignments are laid out expert by expert in a row space padded to a 16-row
granule; a custom VJP runs the backward pass as the same block loop, moving
activations only by gathers. Layout, kernel and gradient design: docs/model.md
(Block-sparse dispatch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flexmoe_jax.moe.experts import Experts
from flexmoe_jax.moe.router import Routing
from flexmoe_jax.moe.varying import varying_like

_GRANULE = 16


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _block_layout(index: jax.Array, num_experts: int, granule: int):
    """(slot [T, K], source [P], start [E], rows [E]) with P a static bound.

    Computed without a sort: an assignment's rank inside its expert is a
    running count of that expert's one-hot column (cumsum over T*K x E ints),
    and the row -> assignment map is the one scatter (of T*K int32s).

    An index equal to ``num_experts`` means "held elsewhere" (expert
    parallelism): such an assignment gets slot P, one past the row space,
    which the kernels never write (so it reads back as zero) and ``source``
    drops. A token's K choices are distinct experts (``top_k`` guarantees it),
    so at most T * min(K, E) assignments are local, which bounds P: with one
    expert per device and top-2 the row space is half of T*K.
    """
    t, k = index.shape
    n = t * k
    flat = index.reshape(-1).astype(jnp.int32)
    onehot = (flat[:, None] == jnp.arange(num_experts, dtype=jnp.int32)).astype(jnp.int32)
    running = jnp.cumsum(onehot, axis=0)
    counts = running[-1]
    rank = jnp.sum(running * onehot, axis=1) - 1
    rows = (counts + granule - 1) // granule * granule
    start = jnp.cumsum(rows) - rows
    total = _round_up(t * min(k, num_experts) + num_experts * (granule - 1), granule)
    here = flat < num_experts
    slot = jnp.where(here, start[jnp.minimum(flat, num_experts - 1)] + rank, total)
    source = jnp.full((total,), n, jnp.int32).at[slot].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop")
    return slot.reshape(t, k), source, start, rows


def _block_sizes(block_size: int, granule: int, total: int) -> tuple[int, ...]:
    """block_size (rounded down to a granule multiple), /2, /4, ... down to the granule; all <= total."""
    sizes = [max(granule, block_size // granule * granule)]
    while sizes[-1] // 2 >= granule and (sizes[-1] // 2) % granule == 0:
        sizes.append(sizes[-1] // 2)
    if sizes[-1] != granule:
        sizes.append(granule)
    return tuple(b for b in sizes if b <= total) or (granule,)


def _over_blocks(num_experts, start, rows, sizes, enter, block, leave, carry):
    """for e: ctx = enter(e); for each block (row, size) of e: carry = block(ctx, row, size, carry); leave."""
    big, granule = sizes[0], sizes[-1]
    exact = all(a == 2 * b for a, b in zip(sizes, sizes[1:]))

    def one_expert(e, carry):
        carry, ctx = enter(e, carry)
        row, count = start[e], rows[e]
        n_big = count // big
        carry = jax.lax.fori_loop(0, n_big, lambda i, c: block(ctx, row + i * big, big, c), carry)
        row, left = row + n_big * big, count - n_big * big
        for b in sizes[1:]:  # binary chain for the remainder (< big)
            take = left >= b
            carry = jax.lax.cond(take, lambda c, row=row, b=b: block(ctx, row, b, c), lambda c: c, carry)
            row, left = row + jnp.where(take, b, 0), left - jnp.where(take, b, 0)
        if not exact:  # what the chain cannot express (block_size / granule not a power of 2)
            carry = jax.lax.fori_loop(0, left // granule, lambda i, c: block(ctx, row + i * granule, granule, c), carry)
        return leave(e, ctx, carry)

    return jax.lax.fori_loop(0, num_experts, one_expert, carry)


def _blocks_forward(x, weights, wg, wu, wd, layout, sizes, save):
    """y [T, d]; with ``save`` also the residuals for the backward pass."""
    slot, source, start, rows = layout
    t, d = x.shape
    k = weights.shape[1]
    e, _, h = wg.shape
    total = source.shape[0]
    # Padding rows (source == T*K) read token T, an appended zero row.
    x_ext = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])

    def enter(i, carry):
        return carry, (wg[i], wu[i], wd[i])

    def block(ctx, row, b, carry):
        eg, eu, ed = ctx
        xb = x_ext[jax.lax.dynamic_slice_in_dim(source, row, b) // k]
        g, u = jnp.dot(xb, eg), jnp.dot(xb, eu)
        yb = jnp.dot(jax.nn.silu(g) * u, ed)
        out = (jax.lax.dynamic_update_slice_in_dim(carry[0], yb.astype(x.dtype), row, 0),)
        if save:
            out += (jax.lax.dynamic_update_slice_in_dim(carry[1], g, row, 0),
                    jax.lax.dynamic_update_slice_in_dim(carry[2], u, row, 0))
        return out

    carry = (jnp.zeros((total + 1, d), x.dtype),)  # + the always-zero row of "held elsewhere" slots
    if save:
        act = jnp.result_type(x, wg)
        carry += (jnp.zeros((total, h), act), jnp.zeros((total, h), act))

    carry = varying_like(carry, x, wg, wu, wd, source)
    outs = _over_blocks(e, start, rows, sizes, enter, block, lambda i, ctx, c: c, carry)
    yp = outs[0]
    y = jnp.einsum("tkd,tk->td", yp[slot], weights.astype(yp.dtype))
    return y, (x_ext, yp) + outs[1:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _moe_blocks(x, weights, wg, wu, wd, layout, sizes):
    return _blocks_forward(x, weights, wg, wu, wd, layout, sizes, save=False)[0]


def _moe_blocks_fwd(x, weights, wg, wu, wd, layout, sizes):
    y, saved = _blocks_forward(x, weights, wg, wu, wd, layout, sizes, save=True)
    return y, (weights, wg, wu, wd, layout) + saved


def _moe_blocks_bwd(sizes, res, dy):
    weights, wg, wu, wd, layout, x_ext, yp, gs, us = res
    slot, source, start, rows = layout
    t, k = weights.shape
    e, d, h = wg.shape
    f32 = jnp.float32
    dweights = jnp.einsum("td,tkd->tk", dy.astype(f32), yp[slot].astype(f32)).astype(weights.dtype)
    # d(loss)/d(row output) = routing weight * dy of the row's token: a gather.
    w_ext = jnp.concatenate([weights.reshape(-1), jnp.zeros((1,), weights.dtype)])
    dy_ext = jnp.concatenate([dy, jnp.zeros((1, d), dy.dtype)])

    def enter(i, carry):
        acc = (jnp.zeros((d, h), f32), jnp.zeros((d, h), f32), jnp.zeros((h, d), f32))
        return carry + varying_like(acc, x_ext, dy, wg, wu, wd, source, gs), (wg[i], wu[i], wd[i])

    def block(ctx, row, b, carry):
        dxp, dwg, dwu, dwd, ag, au, ad = carry
        eg, eu, ed = ctx
        src = jax.lax.dynamic_slice_in_dim(source, row, b)
        xb = x_ext[src // k]
        g = jax.lax.dynamic_slice_in_dim(gs, row, b)
        u = jax.lax.dynamic_slice_in_dim(us, row, b)
        dyb = (dy_ext[src // k] * w_ext[src][:, None].astype(dy.dtype)).astype(g.dtype)
        sg = jax.nn.sigmoid(g)
        a = g * sg
        ad = ad + jnp.dot((a * u).T, dyb, preferred_element_type=f32)
        dh = jnp.dot(dyb, ed.T)
        du = dh * a
        dg = dh * u * (sg * (1 + g * (1 - sg)))
        ag = ag + jnp.dot(xb.T, dg, preferred_element_type=f32)
        au = au + jnp.dot(xb.T, du, preferred_element_type=f32)
        dxb = jnp.dot(dg, eg.T) + jnp.dot(du, eu.T)
        dxp = jax.lax.dynamic_update_slice_in_dim(dxp, dxb.astype(dxp.dtype), row, 0)
        return dxp, dwg, dwu, dwd, ag, au, ad

    def leave(i, ctx, carry):
        dxp, dwg, dwu, dwd, ag, au, ad = carry
        put = lambda full, part: jax.lax.dynamic_update_index_in_dim(full, part.astype(full.dtype), i, 0)  # noqa: E731
        return dxp, put(dwg, ag), put(dwu, au), put(dwd, ad)

    carry = (jnp.zeros((source.shape[0] + 1, d), x_ext.dtype), jnp.zeros_like(wg), jnp.zeros_like(wu),
             jnp.zeros_like(wd))
    carry = varying_like(carry, x_ext, dy, wg, wu, wd, source, gs)
    dxp, dwg, dwu, dwd = _over_blocks(e, start, rows, sizes, enter, block, leave, carry)
    dx = jnp.sum(dxp[slot].astype(f32), axis=1).astype(x_ext.dtype)  # each token's K rows: a gather
    return dx, dweights, dwg, dwu, dwd, None


_moe_blocks.defvjp(_moe_blocks_fwd, _moe_blocks_bwd)


def dispatch_blocks(x: jax.Array, r: Routing, w: Experts, block_size: int = 512) -> jax.Array:
    """Block-sparse dispatch: per expert, large dense SwiGLU blocks plus a shrinking tail.

    ``block_size`` is the largest block (rows per matmul); remainders go down
    to a 16-row granule, so padding is < 16 rows per expert whatever the size.
    An index equal to the number of experts means "not here": no compute, zero output.
    """
    e = w.gate.shape[0]
    granule = max(1, min(_GRANULE, block_size))
    layout = _block_layout(r.index, e, granule)
    sizes = _block_sizes(block_size, granule, layout[1].shape[0])
    # Under shard_map: give every input the same varying axes, so the custom
    # VJP's cotangents type-check (autodiff then sums x's over the expert group).
    args = varying_like((x, r.weights, w.gate, w.up, w.down), x, r.weights, w.gate, w.up, w.down)
    return _moe_blocks(*args, layout, sizes)

