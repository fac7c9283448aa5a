"""The experts' weights: stacked SwiGLU tensors [E, ...], or a tuple of groups of consecutive slots."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Experts(NamedTuple):
    gate: jax.Array  # [E, d, h]
    up: jax.Array    # [E, d, h]
    down: jax.Array  # [E, h, d]


def swiglu(x, gate, up, down):
    """One expert's FFN: down(silu(x @ gate) * (x @ up))."""
    return jnp.dot(jax.nn.silu(jnp.dot(x, gate)) * jnp.dot(x, up), down)


def stack_experts(groups: tuple[Experts, ...]) -> Experts:
    """Groups of consecutive expert slots -> one stacked :class:`Experts`."""
    if len(groups) == 1:
        return groups[0]
    return Experts(*(jnp.concatenate(parts, axis=0) for parts in zip(*groups)))
