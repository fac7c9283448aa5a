"""Router rows for a new expert, from what its domain looks like to the model.

The reference embeds ~1000 domain documents with an outside embedder (GritLM),
L2-normalizes each, averages them (no renormalization), and copies that vector
into the router row of every layer. That vector lives in another model's space
while the router reads our residual stream. The default here, ``hidden``,
uses the public model's *own* residual stream at each layer's router input:
each token's hidden state is L2-normalized, then averaged over the domain's
tokens (padding excluded), one row per layer. ``random`` (normal, init_std)
and ``zeros`` (equal weights) are the baselines.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from flexmoe_jax import model
from flexmoe_jax.config import ModelConfig

METHODS = ("hidden", "random", "zeros")


def mean_direction(config: ModelConfig, params: model.Params, batches: Iterable[dict], num_batches: int) -> np.ndarray:
    """[L, d]: mean over real tokens of the unit-normalized FFN input, per layer."""
    total, count = None, 0.0
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        h = model.ffn_inputs(config, params, jnp.asarray(batch["decoder_input_tokens"]),
                             jnp.asarray(batch["decoder_positions"]), jnp.asarray(batch["decoder_segment_ids"]))
        h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-6)
        w = jnp.asarray(batch["decoder_loss_weights"], jnp.float32)[None, :, :, None]
        part = np.asarray(jnp.sum(h * w, axis=(1, 2)))
        total = part if total is None else total + part
        count += float(np.sum(batch["decoder_loss_weights"]))
    if total is None or count == 0:
        raise ValueError("no tokens to average: the domain's batches are empty")
    return (total / count).astype(np.float32)


def rows(method: str, config: ModelConfig, params: model.Params, public_batches=None, domain_batches=None,
         num_batches: int = 8, seed: int = 0) -> np.ndarray:
    """[L, 2, d] router rows (row 0 public, row 1 the domain) for :func:`expert.upcycle`."""
    L, d = config.n_layers, config.d_model
    if method == "zeros":
        return np.zeros((L, 2, d), np.float32)
    if method == "random":
        return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (L, 2, d)) * config.init_std, np.float32)
    if method == "hidden":
        if public_batches is None or domain_batches is None:
            raise ValueError("router_init='hidden' needs batches of public and of the domain's data")
        return np.stack([mean_direction(config, params, public_batches, num_batches),
                         mean_direction(config, params, domain_batches, num_batches)], axis=1)
    raise ValueError(f"router_init must be one of {METHODS}, got {method!r}")
