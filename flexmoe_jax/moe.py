"""FlexOlmo routing and dropless expert dispatch, as pure functions.

Routing follows the reference exactly: router logits on the raw residual
stream, softmax over *all* experts in fp32, then top-k, with no
renormalization unless asked. An optional per-expert bias is clamped to <= 0
so a new expert can only be down-weighted relative to the public one.

Three dispatch paths compute the same function (equal to fp32 tolerance):

- ``dense``: every expert runs on every token and the outputs are mixed by the
  (mostly zero) gate matrix, as a scan over experts of plain SwiGLUs. Right
  when top_k == num_experts, as in expert training (2 of 2) or a router-tuned
  model (7 of 7); there it costs about what one FFN of hidden E*h does.
- ``ragged``: tokens sorted by expert, one grouped matmul per projection
  (``jax.lax.ragged_dot``). The real ragged kernel on TPU/GPU; on CPU it lowers
  to a masked dense product and is ~8-12x slower than a dense FFN.
- ``blocks``: the CPU design. Assignments are laid out expert by expert in a
  row space padded to a 16-row granule (no sort: ranks come from a cumsum);
  per expert, a loop of dense SwiGLU matmuls over blocks of ``block_size`` rows
  plus a shrinking tail (block_size/2, /4, ... 16) computes only rows that hold
  tokens. A custom VJP runs the backward pass as the same block loop, and
  activations move only by gathers in both directions (no scatter-adds, which
  are slow on XLA:CPU; the layout itself scatters T*K int32 row indices
  once). Forward ~1.0-1.3x a dense FFN of the same active FLOPs (routing
  included) at T=2048, d=256, h=688; bench/bench_moe.py measures.

All paths are dropless: no capacity factor, no token is ever dropped.

Expert parallelism (:func:`dispatch_sharded`) wraps any of the three in a
``shard_map``: each device gathers the tokens of its expert group, runs only
the experts it holds, and reduce-scatters the mixed outputs back. Every path
treats an expert index equal to its number of experts as "held elsewhere":
that assignment costs nothing and contributes zero.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from flexmoe_jax.errors import UserError


class Routing(NamedTuple):
    logits: jax.Array   # [T, E] fp32 router logits (after the clamped bias)
    weights: jax.Array  # [T, K] fp32 mixing weights of the chosen experts
    index: jax.Array    # [T, K] int32 chosen expert ids


class Experts(NamedTuple):
    gate: jax.Array  # [E, d, h]
    up: jax.Array    # [E, d, h]
    down: jax.Array  # [E, h, d]


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


def _swiglu(x, gate, up, down):
    return jnp.dot(jax.nn.silu(jnp.dot(x, gate)) * jnp.dot(x, up), down)


_DENSE_UNROLL_MAX = 16


def dispatch_dense(x: jax.Array, r: Routing, w: Experts | tuple[Experts, ...]) -> jax.Array:
    """Every expert on every token; mix with the gate matrix.

    One plain [T, d] SwiGLU per expert scaled by its gate column, unrolled for
    up to 16 experts (a scan beyond, to bound compile time). On XLA:CPU this is
    as fast as one wide [T, d] x [d, E*h] FFN forward, and its backward is ~2x
    faster than the batched-einsum form's and ~20% faster than a scan's.

    ``w`` may come as groups of consecutive slots (see :func:`dispatch`): each
    expert then reads its weights from its own group's arrays, so a group that
    is not differentiated (expert training's frozen public slot) gets no
    weight-gradient matmuls at all.
    """
    groups = (w,) if isinstance(w, Experts) else tuple(w)
    slots = [(g, i) for g in groups for i in range(g.gate.shape[0])]
    gates = gate_matrix(r, len(slots)).astype(jnp.float32)

    def one_expert(wg, wu, wd, g):
        return _swiglu(x, wg, wu, wd).astype(jnp.float32) * g[:, None]

    if len(slots) <= _DENSE_UNROLL_MAX:
        y = sum(one_expert(g.gate[i], g.up[i], g.down[i], gates[:, e]) for e, (g, i) in enumerate(slots))
    else:
        s = stack_experts(groups)
        y0 = _varying_like(jnp.zeros(x.shape, jnp.float32), x, s.gate, s.up, s.down, gates)
        y, _ = jax.lax.scan(lambda y, a: (y + one_expert(*a), None), y0,
                            (s.gate, s.up, s.down, gates.T))
    return y.astype(x.dtype)


def stack_experts(groups: tuple[Experts, ...]) -> Experts:
    """Groups of consecutive expert slots -> one stacked :class:`Experts`."""
    if len(groups) == 1:
        return groups[0]
    return Experts(*(jnp.concatenate(parts, axis=0) for parts in zip(*groups)))


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


# ----------------------------------------------------------------------------
# Block-sparse CPU dispatch
# ----------------------------------------------------------------------------
#
# Layout. The T*K (token, choice) assignments are placed in a padded row space
# where expert e owns rows [start[e], start[e] + rows[e]), rows[e] being its
# assignment count rounded up to a multiple of the granule (16 rows). Inside an
# expert's range the order is token order. ``slot[t, k]`` is the row of an
# assignment and ``source[row]`` the assignment feeding a row (T*K, "none",
# for padding rows, which read a zero input row and carry zero weight).
#
# Kernel. A loop over experts slices that expert's weights once, then walks its
# rows with big blocks of ``block_size`` rows and finishes the remainder with a
# binary chain of smaller blocks (block_size/2, /4, ..., granule), so an expert
# wastes < 1 granule of padding while most rows go through large matmuls. Only
# rows that hold assignments are ever computed; nothing depends on a capacity.
#
# Gradients. A custom VJP whose backward pass is the same loop of block
# matmuls, accumulating each expert's weight gradient in a [d, h] carry, and
# whose token moves are all gathers (XLA:CPU scatters are slow; the layout is a
# permutation, so every scatter has an equivalent gather).

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


def _varying_like(tree, *refs):
    """Mark fresh loop carries (zeros) as varying over the mesh axes the inputs vary over.

    Inside ``shard_map`` a loop carry must keep its type, and a block's output
    varies over whatever axes its inputs do; outside ``shard_map`` a no-op.
    """
    def varying(a):
        aval = jax.typeof(a)
        mat = getattr(aval, "manual_axis_type", None)  # jax 0.10; older releases called it .vma
        return set(mat.varying if mat is not None else getattr(aval, "vma", None) or ())

    axes = set().union(*map(varying, refs))

    def cast(z):
        missing = tuple(sorted(axes - varying(z)))
        return jax.lax.pcast(z, missing, to="varying") if missing else z

    return jax.tree.map(cast, tree) if axes else tree


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

    carry = _varying_like(carry, x, wg, wu, wd, source)
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
        return carry + _varying_like(acc, x_ext, dy, wg, wu, wd, source, gs), (wg[i], wu[i], wd[i])

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
    carry = _varying_like(carry, x_ext, dy, wg, wu, wd, source, gs)
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
    args = _varying_like((x, r.weights, w.gate, w.up, w.down), x, r.weights, w.gate, w.up, w.down)
    return _moe_blocks(*args, layout, sizes)


def choose_impl(impl: str, top_k: int, num_experts: int, backend: str | None = None) -> str:
    """Resolve "auto": dense when every expert is chosen, else the backend's sparse path."""
    if impl != "auto":
        return impl
    if top_k >= num_experts:
        return "dense"
    backend = backend or jax.default_backend()
    return "blocks" if backend == "cpu" else "ragged"


def dispatch(x: jax.Array, r: Routing, w: Experts | tuple[Experts, ...], impl: str = "auto",
             block_size: int = 512) -> jax.Array:
    """Dropless mixture of SwiGLU experts: x [T, d] -> [T, d].

    ``w`` is the stacked experts, or a tuple of groups of consecutive slots
    (expert training keeps the frozen and the trained slot apart so that only
    the trained one gets weight gradients; the dense path honours the groups,
    the sparse paths stack them).
    """
    groups = (w,) if isinstance(w, Experts) else tuple(w)
    impl = choose_impl(impl, r.index.shape[1], sum(g.gate.shape[0] for g in groups))
    return _dispatch_one(x, r, groups, impl, block_size)


def _dispatch_one(x, r, w, impl, block_size):
    groups = (w,) if isinstance(w, Experts) else tuple(w)
    if impl == "dense":
        return dispatch_dense(x, r, groups)
    if impl == "ragged":
        return dispatch_ragged(x, r, stack_experts(groups))
    if impl == "blocks":
        return dispatch_blocks(x, r, stack_experts(groups), block_size)
    raise UserError(f"unknown MoE dispatch {impl!r}; choose auto, dense, ragged or blocks")


# ----------------------------------------------------------------------------
# Expert parallelism
# ----------------------------------------------------------------------------

def local_routing(r: Routing, first: jax.Array, num_local: int) -> Routing:
    """Routing restricted to experts [first, first + num_local), renumbered from 0.

    Assignments to any other expert get index ``num_local`` ("held elsewhere")
    and weight 0, which every dispatch path skips.
    """
    local = r.index - first
    mine = (local >= 0) & (local < num_local)
    return Routing(r.logits, jnp.where(mine, r.weights, jnp.zeros_like(r.weights)),
                   jnp.where(mine, local, num_local).astype(jnp.int32))


def _entry(names: tuple[str, ...]):
    return None if not names else names if len(names) > 1 else names[0]


def dispatch_sharded(x: jax.Array, r: Routing, w: Experts | tuple[Experts, ...], mesh: Mesh,
                     impl: str = "auto", block_size: int = 512) -> jax.Array:
    """Expert-parallel dropless dispatch on ``mesh``: x [T, d] -> [T, d], same result as :func:`dispatch`.

    Shardings come from the one rules table: tokens split over the batch axes
    (data, fsdp, expert), expert tensors [E, d, h] over (expert, fsdp, tensor).
    Per device, inside a ``shard_map``:

    1. all-gather the tokens (and their routing) of its expert group, i.e.
       over the mesh axes that split both tokens and experts;
    2. all-gather its experts' ``embed`` dim over fsdp (ZeRO-3, as GSPMD would);
    3. run *only its own* E/expert experts on those tokens, with any dispatch
       path (assignments to other experts cost nothing);
    4. reduce-scatter the partial outputs back over the expert group, and sum
       over tensor (each tensor shard held a slice of the hidden dim).

    So expert compute is split, never repeated, across the expert axis, and
    the only traffic is tokens in and partial outputs out (the all-gather /
    reduce-scatter scheme of Megatron's allgather token dispatcher; an
    all-to-all would move less at large expert counts, but
    ``ragged_all_to_all`` has no CPU lowering to test it with). Axes whose
    size does not divide a dim leave it whole (see ``sharding._drop_indivisible``),
    and the function then simply has less to split.
    """
    from flexmoe_jax.sharding import split_axes  # (sharding imports flax; keep moe importable alone)

    w = stack_experts((w,) if isinstance(w, Experts) else tuple(w))
    e, d, h = w.gate.shape
    t, k = r.index.shape
    impl = choose_impl(impl, k, e)
    (tok,) = split_axes(mesh, ("batch",), (t,))
    ex, emb, mlp = split_axes(mesh, ("expert", "embed", "mlp"), (e, d, h))
    (_, mlp_down, emb_down) = split_axes(mesh, ("expert", "mlp", "embed"), (e, h, d))
    assert (mlp_down, emb_down) == (mlp, emb), "gate/up and down must split hidden and embed alike"
    # Tokens are gathered over the axes that split the experts too; those must
    # be the minor end of the token split for the gathered rows to be contiguous.
    group = tuple(a for a in tok if a in ex)
    if group != tok[len(tok) - len(group):]:
        tok, group = (), ()
    rest = tuple(a for a in ex if a not in group)  # split experts, replicated tokens: a plain sum

    def body(x, weights, index, wg, wu, wd):
        if group:
            x, weights, index = (jax.lax.all_gather(a, group, axis=0, tiled=True) for a in (x, weights, index))
        if emb:
            wg, wu = (jax.lax.all_gather(a, emb, axis=1, tiled=True) for a in (wg, wu))
            wd = jax.lax.all_gather(wd, emb, axis=2, tiled=True)
        n_local = wg.shape[0]
        first = jax.lax.axis_index(ex) * n_local if ex else 0
        mine = local_routing(Routing(None, weights, index), first, n_local)
        y = _dispatch_one(x, mine, Experts(wg, wu, wd), impl, block_size)
        if group:
            y = jax.lax.psum_scatter(y, group, scatter_dimension=0, tiled=True)
        if rest or mlp:
            y = jax.lax.psum(y, rest + mlp)
        return y

    tok_spec = P(_entry(tok))
    w_spec = P(_entry(ex), _entry(emb), _entry(mlp))
    wd_spec = P(_entry(ex), _entry(mlp), _entry(emb))
    f = jax.shard_map(body, mesh=mesh, in_specs=(tok_spec, tok_spec, tok_spec, w_spec, w_spec, wd_spec),
                      out_specs=tok_spec)
    return f(x, r.weights, r.index, w.gate, w.up, w.down)
