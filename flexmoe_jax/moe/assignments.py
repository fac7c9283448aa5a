"""Assignments sorted by expert and results gathered back: what the sparse dispatch paths share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexmoe_jax.moe.router import Routing


def sort_by_expert(index: jax.Array, num_experts: int):
    """(flat expert index [T*K], the order that sorts assignments by expert (stable), each expert's count)."""
    flat = index.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return flat, order, sizes


def combine(y_rows: jax.Array, row_of_assignment: jax.Array, r: Routing) -> jax.Array:
    """Gather each (token, k) result back and mix with its routing weight."""
    t, k = r.index.shape
    y = y_rows[row_of_assignment].reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y, r.weights.astype(y.dtype))
