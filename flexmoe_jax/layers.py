"""Stateless transformer math: RMSNorm, rotary embedding, GQA softmax attention (XLA or the splash kernel)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from flexmoe_jax.errors import UserError


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
    sum; why: docs/model.md, Attention), as is ``"xla"``; ``impl="cudnn"`` etc. goes through
    ``jax.nn.dot_product_attention``.
    """
    if impl not in (None, "xla"):
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


SPLASH_MIN_LEN = 128  # the kernel's key tiles are multiples of the 128 lanes


def attention_kind(impl: str | None, backend: str, seq_len: int, decode: bool) -> str:
    """Which attention a layer runs: "splash", "xla" or a ``jax.nn.dot_product_attention`` implementation.

    ``impl`` is ``ModelConfig.attention_impl``; ``backend`` the platform the program is compiled for.
    None (auto) picks "splash" on TPU for self-attention over a length that is a multiple of 128,
    else "xla". Decoding (queries against a KV cache) always runs "xla". An explicit "splash" over
    another length is a UserError.
    """
    if decode and impl in (None, "xla", "splash"):
        return "xla"
    if impl is None:
        return "splash" if backend == "tpu" and seq_len % SPLASH_MIN_LEN == 0 else "xla"
    if impl == "splash" and seq_len % SPLASH_MIN_LEN:
        raise UserError(f"attention_impl='splash' needs a sequence length that is a multiple of "
                        f"{SPLASH_MIN_LEN}, got {seq_len}; pad the batch or use attention_impl=None")
    return impl


def mesh_backend(mesh: Mesh | None) -> str:
    """The platform a program runs on: the mesh's devices' (so an AOT compile for TPU says "tpu"), else JAX's."""
    return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def _splash():
    """JAX's splash-attention module (imports Pallas: only when a layer runs it)."""
    from jax.experimental.pallas.ops.tpu import splash_attention

    return splash_attention


@functools.lru_cache(maxsize=16)
def _splash_sizes(seq_len: int):
    """Tiles of 512 (MaxText's defaults) or the largest of 256/128 dividing ``seq_len``, fwd and bwd alike."""
    b = next(t for t in (512, 256, SPLASH_MIN_LEN) if seq_len % t == 0)
    return _splash().BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                             block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     interpret: bool = False) -> jax.Array:
    """Causal attention within packed segments by JAX's splash Pallas kernel, on one device's arrays.

    q [B, S, Hq, hd], k/v [B, S, Hk, hd] (GQA: query head h reads key head h // (Hq/Hk)),
    ``segment_ids`` [B, S] int: query i attends key j iff j <= i and both share a segment.
    The same function as :func:`attention` under that mask, forward and backward (the kernel's
    own VJP), without ever materialising [S, S] scores; S a multiple of 128. Not partitionable
    by GSPMD: on a sharded mesh call :func:`sharded_splash_attention`. ``interpret``: Pallas
    interpret mode (any backend; slow, for tests).
    """
    splash = _splash()
    b, s, hq, hd = q.shape
    sizes = _splash_sizes(s)
    mask = splash.MultiHeadMask([splash.CausalMask((s, s))] * hq)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    qt = (q.astype(jnp.float32) * hd ** -0.5).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, Hq, S, hd]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                          # [B, Hk, S, hd]
    seg = segment_ids.astype(jnp.int32)
    out = jax.vmap(kernel)(qt, kt, vt, segment_ids=splash.SegmentIds(seg, seg))
    return out.astype(v.dtype).transpose(0, 2, 1, 3)


def _entry(names: tuple[str, ...]):
    return None if not names else names if len(names) > 1 else names[0]


def sharded_splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                             mesh: Mesh | None) -> jax.Array:
    """:func:`splash_attention` on ``mesh``: per device inside ``shard_map``, interpreted off TPU.

    Shardings come from the rules table: rows over the batch axes, heads over ``tensor`` when
    that splits query and key heads alike (else heads stay whole), length and head dim whole.
    No mesh, or a one-device mesh: a plain call.
    """
    from flexmoe_jax.sharding import split_axes  # (sharding imports flax)

    interpret = mesh_backend(mesh) != "tpu"
    if mesh is None or mesh.size == 1:
        return splash_attention(q, k, v, segment_ids, interpret)
    rows, _, heads, _ = split_axes(mesh, ("batch", "length", "act_heads", "act_head_dim"), q.shape)
    _, _, kv_heads, _ = split_axes(mesh, ("batch", "length", "act_kv_heads", "act_head_dim"), k.shape)
    heads = heads if heads == kv_heads else ()
    spec = P(_entry(rows), None, _entry(heads), None)
    # The kernel's pallas_calls declare no varying mesh axes on their outputs: run unchecked (as gmm).
    f = jax.shard_map(functools.partial(splash_attention, interpret=interpret), mesh=mesh,
                      in_specs=(spec, spec, spec, P(_entry(rows), None)), out_specs=spec, check_vma=False)
    return f(q, k, v, segment_ids)
