"""Dropless dispatch of tokens to SwiGLU experts: the dense and ragged paths, and :func:`dispatch`.

``dense`` runs every expert on every token (right when top_k == num_experts),
``ragged`` sorts assignments by expert for ``jax.lax.ragged_dot`` (GPU),
``gmm`` (:mod:`flexmoe_jax.moe.grouped`) does the same with the megablox Pallas
kernels (TPU), ``blocks`` (:mod:`flexmoe_jax.moe.blocks`) is the CPU path. All compute the same
function, drop no token, and treat an expert index equal to the number of
experts as "held elsewhere" (no compute, zero output). See docs/model.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexmoe_jax.errors import UserError
from flexmoe_jax.moe.assignments import combine, sort_by_expert
from flexmoe_jax.moe.blocks import dispatch_blocks
from flexmoe_jax.moe.experts import Experts, stack_experts, swiglu
from flexmoe_jax.moe.router import Routing, gate_matrix
from flexmoe_jax.moe.varying import varying_like

_DENSE_UNROLL_MAX = 16


def dispatch_dense(x: jax.Array, r: Routing, w: Experts | tuple[Experts, ...]) -> jax.Array:
    """Every expert on every token; mix with the gate matrix.

    One plain [T, d] SwiGLU per expert scaled by its gate column, unrolled for
    up to 16 experts (a scan beyond, to bound compile time). ``w`` may come as
    groups of consecutive slots (see :func:`dispatch`): each expert then reads
    its own group's arrays, so an undifferentiated group gets no weight-gradient
    matmuls. Why this form: docs/model.md (Dispatch paths).
    """
    groups = (w,) if isinstance(w, Experts) else tuple(w)
    slots = [(g, i) for g in groups for i in range(g.gate.shape[0])]
    gates = gate_matrix(r, len(slots)).astype(jnp.float32)

    def one_expert(wg, wu, wd, g):
        return swiglu(x, wg, wu, wd).astype(jnp.float32) * g[:, None]

    if len(slots) <= _DENSE_UNROLL_MAX:
        y = sum(one_expert(g.gate[i], g.up[i], g.down[i], gates[:, e]) for e, (g, i) in enumerate(slots))
    else:
        s = stack_experts(groups)
        y0 = varying_like(jnp.zeros(x.shape, jnp.float32), x, s.gate, s.up, s.down, gates)
        y, _ = jax.lax.scan(lambda y, a: (y + one_expert(*a), None), y0,
                            (s.gate, s.up, s.down, gates.T))
    return y.astype(x.dtype)


def dispatch_ragged(x: jax.Array, r: Routing, w: Experts) -> jax.Array:
    """Sort assignments by expert, one ``ragged_dot`` per projection."""
    t, k = r.index.shape
    _, order, sizes = sort_by_expert(r.index, w.gate.shape[0])
    xs = x[order // k]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w.gate, sizes)) * jax.lax.ragged_dot(xs, w.up, sizes)
    ys = jax.lax.ragged_dot(h, w.down, sizes)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))
    return combine(ys, inverse, r)


_SPARSE = {"cpu": "blocks", "tpu": "gmm"}  # any other backend (GPU): ragged


_GMM_LANE = 128  # gmm's feature tiles are multiples of the TPU's 128 lanes


def choose_impl(impl: str, top_k: int, num_experts: int, backend: str | None = None,
                dims: tuple[int, ...] | None = None) -> str:
    """Resolve "auto": dense when every expert is chosen, else the backend's sparse path
    (``backend`` defaults to JAX's default backend): blocks on CPU, gmm on TPU, ragged elsewhere.
    ``dims``: the experts' (d_model, hidden) as each device holds them; gmm tiles them by 128 lanes,
    so on TPU a dim that is not a multiple of 128 falls back to ragged."""
    if impl != "auto":
        return impl
    if top_k >= num_experts:
        return "dense"
    choice = _SPARSE.get(backend or jax.default_backend(), "ragged")
    if choice == "gmm" and dims is not None and any(x % _GMM_LANE for x in dims):
        return "ragged"
    return choice


def dispatch(x: jax.Array, r: Routing, w: Experts | tuple[Experts, ...], impl: str = "auto",
             block_size: int = 512, backend: str | None = None) -> jax.Array:
    """Dropless mixture of SwiGLU experts: x [T, d] -> [T, d].

    ``w`` is the stacked experts, or a tuple of groups of consecutive slots
    (expert training keeps the frozen and the trained slot apart so that only
    the trained one gets weight gradients; the dense path honours the groups,
    the sparse paths stack them). ``backend``: the platform the program is
    compiled for (default: JAX's default backend); it resolves "auto" and runs
    gmm's kernels natively on "tpu", interpreted elsewhere. gmm is a Pallas kernel,
    which GSPMD cannot partition: on a sharded mesh use :func:`~flexmoe_jax.moe.parallel.dispatch_sharded`.
    """
    groups = (w,) if isinstance(w, Experts) else tuple(w)
    impl = choose_impl(impl, r.index.shape[1], sum(g.gate.shape[0] for g in groups), backend,
                       groups[0].gate.shape[1:])
    return dispatch_one(x, r, groups, impl, block_size, backend)


def dispatch_one(x, r, w, impl, block_size, backend=None):
    """:func:`dispatch` with ``impl`` already resolved (not "auto")."""
    groups = (w,) if isinstance(w, Experts) else tuple(w)
    if impl == "dense":
        return dispatch_dense(x, r, groups)
    if impl == "ragged":
        return dispatch_ragged(x, r, stack_experts(groups))
    if impl == "gmm":
        from flexmoe_jax.moe.grouped import dispatch_gmm  # (imports Pallas; only when asked for)

        return dispatch_gmm(x, r, stack_experts(groups), interpret=(backend or jax.default_backend()) != "tpu")
    if impl == "blocks":
        return dispatch_blocks(x, r, stack_experts(groups), block_size)
    raise UserError(f"unknown MoE dispatch {impl!r}; choose auto, dense, ragged, gmm or blocks")

