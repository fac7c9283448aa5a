"""Grouped dispatch for TPU: assignments sorted by expert, each projection one megablox grouped matmul.

The forward pass is ``gmm`` (the Pallas grouped-matmul kernel that ships with JAX,
``jax.experimental.pallas.ops.tpu.megablox``) and its custom VJP computes the
weight gradients with ``tgmm``: each expert's rows only, never all rows against
all experts. Pallas kernels are not partitioned by GSPMD: on a sharded mesh this
path must run per device inside ``shard_map``, as
:func:`flexmoe_jax.moe.parallel.dispatch_sharded` does (with ``check_vma=False``: the
kernels declare no varying mesh axes on their outputs). Off TPU the kernels run in
interpret mode (slow: for tests). Design: docs/model.md (Dispatch paths).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import megablox

from flexmoe_jax.moe.assignments import combine, sort_by_expert
from flexmoe_jax.moe.experts import Experts
from flexmoe_jax.moe.router import Routing

# Largest (rows, contracting, output) tile: MaxText's defaults for the same kernels.
MAX_TILE = (512, 1024, 1024)
_LANE = 128  # a TPU tile's minor dims are multiples of 128 lanes, or the whole dim
_SUBLANE = 16  # row tiles: a multiple of the bf16 sublane packing


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _dim_tile(size: int, cap: int) -> int:
    """The largest multiple of 128 that divides ``size`` and is <= ``cap``; ``size`` itself if none."""
    best = max((t for t in range(_LANE, min(size, cap) + 1, _LANE) if size % t == 0), default=None)
    return best or size


def row_tile(rows: int, cap: int = MAX_TILE[0]) -> int:
    """Rows per tile for ``rows`` sorted assignments: ``cap``, or fewer (a multiple of 16) when there are few."""
    return min(cap, _round_up(max(rows, 1), _SUBLANE))


def tiling(rows: int, k: int, n: int, max_tile: tuple[int, int, int] = MAX_TILE) -> tuple[int, int, int]:
    """(tm, tk, tn) for an [rows, k] x [E, k, n] grouped matmul; ``rows`` must be a multiple of tm."""
    return row_tile(rows, max_tile[0]), _dim_tile(k, max_tile[1]), _dim_tile(n, max_tile[2])


def _gmm(lhs, rhs, group_sizes, interpret, max_tile):
    """Grouped ``lhs @ rhs[e]`` over the row groups; rows past the last of ``rhs``'s groups come out zero.

    ``group_sizes`` has one more entry than ``rhs`` has experts (the "held elsewhere"
    and padding rows): megablox then computes only the first E groups and zeroes
    the rest, forward and backward (its ``group_offset`` sharding mode, offset 0).
    """
    m, k = lhs.shape
    n = rhs.shape[2]
    return megablox.gmm(lhs, rhs, group_sizes, jnp.result_type(lhs, rhs), tiling(m, k, n, max_tile),
                        jnp.int32(0), None, False, interpret)


def dispatch_gmm(x: jax.Array, r: Routing, w: Experts, interpret: bool = False,
                 max_tile: tuple[int, int, int] = MAX_TILE) -> jax.Array:
    """Sort assignments by expert, one megablox ``gmm`` per projection (``tgmm`` weight gradients).

    Same function as :func:`flexmoe_jax.moe.dispatcher.dispatch_ragged`: x [T, d] -> [T, d],
    dropless, an expert index equal to the number of experts "held elsewhere" (no compute,
    zero output). The T*K sorted rows are padded to a multiple of the row tile, the
    padding joining the held-elsewhere rows in one trailing group that is never computed.
    ``interpret``: run the Pallas kernels in interpret mode (any backend; slow).
    """
    t, k = r.index.shape
    e = w.gate.shape[0]
    n = t * k
    _, order, sizes = sort_by_expert(r.index, e)
    m = _round_up(n, row_tile(n, max_tile[0]))
    group_sizes = jnp.concatenate([sizes, (m - jnp.sum(sizes))[None].astype(jnp.int32)])
    xs = jnp.pad(x[order // k], ((0, m - n), (0, 0)))
    gmm = lambda a, b: _gmm(a, b, group_sizes, interpret, max_tile)  # noqa: E731
    h = jax.nn.silu(gmm(xs, w.gate)) * gmm(xs, w.up)
    ys = gmm(h, w.down)[:n]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))
    return combine(ys, inverse, r)
