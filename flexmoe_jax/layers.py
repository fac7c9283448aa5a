"""Stateless transformer math: RMSNorm, rotary embedding, GQA softmax attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32, as the reference does, then cast back."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, S, 1, hd] for HF's "rotate_half" RoPE; computed once, shared by all layers."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding of x [B, S, N, hd] with precomputed (cos, sin)."""
    cos, sin = tables
    hd = x.shape[-1]
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., hd // 2:], x32[..., : hd // 2]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str | None) -> jax.Array:
    """Softmax attention, q [B, S, Hq, hd], k/v [B, M, Hk, hd], GQA by grouping query heads.

    ``mask`` [B, 1, S, M] (True = attend). A row with every key masked gets uniform
    weights. ``impl=None`` is the XLA form (head-major, normalized after the weighted
    sum; why: docs/model.md, Attention); ``impl="cudnn"`` etc. goes through
    ``jax.nn.dot_product_attention``.
    """
    if impl is not None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    b, s, hq, hd = q.shape
    hk = k.shape[2]
    qt = q.reshape(b, s, hk, hq // hk, hd).transpose(0, 2, 3, 1, 4)  # [B, Hk, G, S, hd]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)        # [B, Hk, M, hd]
    scores = jnp.einsum("bkgqd,bksd->bkgqs", qt, kt, preferred_element_type=jnp.float32) * (hd ** -0.5)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    unnorm = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.einsum("bkgqs,bksd->bkgqd", unnorm.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    out = out / jnp.sum(unnorm, axis=-1, keepdims=True)
    return out.astype(v.dtype).transpose(0, 3, 1, 2, 4).reshape(b, s, hq, hd)
