"""Logical axis names and the one table that maps them onto the device mesh.

Every parameter and activation in the model carries logical axis names
("embed", "mlp", "expert", ...). This module holds the single rules table that
maps those names to the four mesh axes:

- ``data``: pure data parallelism (batch split, parameters replicated);
- ``fsdp``: batch split *and* parameters sharded along their ``embed`` dim
  (ZeRO-3 style; XLA all-gathers them per layer);
- ``expert``: expert parallelism: stacked expert tensors split on their expert
  axis, and the batch split too outside the MoE layers (so attention does no
  redundant work); inside them each device gathers its expert group's tokens,
  runs only its own experts and reduce-scatters the result
  (:func:`flexmoe_jax.moe.dispatch_sharded`);
- ``tensor``: Megatron-style tensor parallelism (heads, FFN hidden, vocab).

Changing the parallelism layout means changing this table, never the model.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flexmoe_jax.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Mesh axes that split the batch, major to minor. ``expert`` is the minor one so
# that an expert group's tokens are one contiguous slice of each data shard.
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis name -> mesh axis (or axes, or None = replicated).
# The first rule whose mesh axes are still unused in a given array wins, so an
# axis name may appear twice with a fallback.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", None),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_width", "tensor"),
    ("kv_width", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("router_expert", None),
    ("norm", None),
)


def batch_spec() -> P:
    """The PartitionSpec of a [batch, ...] input array (its leading dim split over BATCH_AXES)."""
    return P(BATCH_AXES)


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over ``devices`` (default: all).

    Axis types are Auto so XLA's sharding propagation (GSPMD) fills in what the
    rules table leaves open.
    """
    shape = (data, fsdp, expert, tensor)
    devices = list(devices if devices is not None else jax.devices())
    need = int(np.prod(shape))
    if need != len(devices):
        raise UserError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {need} devices but {len(devices)} are available; "
            "make data*fsdp*expert*tensor equal the device count (on CPU, set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                         devices=devices)


def logical_to_spec(axes: Sequence[str | None] | None,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> P:
    """Logical axis names of one array -> a mesh PartitionSpec."""
    if axes is None:
        return P()
    return nn.logical_to_mesh_axes(tuple(axes), rules)


def _drop_indivisible(spec: P, shape: Sequence[int], mesh: Mesh, axes: Sequence[str | None] | None = None) -> P:
    """Replicate any dim that the mesh axes assigned to it do not divide, with a warning (once each).

    A tiny test model (4 heads) on a tensor axis of 8 would otherwise fail to
    lower; a real model is always divisible and keeps its sharding.
    """
    out = []
    logical = tuple(axes or ()) + (None,) * len(shape)
    for i, (dim, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        divides = bool(size) and dim % size == 0
        if not divides:
            _warn_replicated(logical[i], dim, tuple(names), size)
        out.append(entry if divides else None)
    return P(*out)


@functools.cache
def _warn_replicated(logical: str | None, dim: int, names: tuple[str, ...], size: int) -> None:
    log.warning("mesh axes %s (%d devices) do not divide dimension %s of size %d: it is replicated on them "
                "instead of split (more memory per device); pick a mesh whose axes divide it",
                "x".join(names), size, repr(logical) if logical else "", dim)


def named_sharding(mesh: Mesh, axes: Sequence[str | None] | None, shape: Sequence[int],
                   rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> NamedSharding:
    return NamedSharding(mesh, _drop_indivisible(logical_to_spec(axes, rules), shape, mesh, axes))


def split_axes(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int],
               rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> tuple[tuple[str, ...], ...]:
    """Per dim of an array, the mesh axes (of size > 1) that really split it under the rules."""
    spec = tuple(named_sharding(mesh, axes, shape, rules).spec)
    spec += (None,) * (len(shape) - len(spec))
    out = []
    for entry in spec:
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        out.append(tuple(n for n in names if mesh.shape[n] > 1))
    return tuple(out)


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None,
              rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> jax.Array:
    """Pin an activation's sharding by its logical axes (a no-op with no mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape, rules))


def tree_shardings(logical_axes: Any, shapes: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """Map a tree of logical-axis tuples (and a tree of shapes) to NamedShardings."""
    return jax.tree.map(lambda axes, s: named_sharding(mesh, axes, s.shape, rules),
                        logical_axes, shapes, is_leaf=lambda t: isinstance(t, tuple))


def shard(tree: Any, shardings: Any) -> Any:
    """Place a host or device tree onto the given shardings."""
    return jax.tree.map(jax.device_put, tree, shardings)
