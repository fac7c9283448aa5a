"""The splash attention kernel (Pallas interpret mode on CPU) against the XLA form, and how a layer picks one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexmoe_jax import model, sharding
from flexmoe_jax.config import ConfigError, ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.layers import attention, attention_kind, sharded_splash_attention, splash_attention

B, S, HQ, HK, HD = 2, 256, 4, 2, 64  # two 128-row tiles per sequence, GQA groups of 2


def _packed_segments(b: int, s: int) -> jax.Array:
    """Two documents in a row per sequence, the boundary off the kernel's tile edges (row 1, if any: three)."""
    seg = np.ones((b, s), np.int32)
    seg[:, 100:] = 2
    seg[1:, 200:] = 3
    return jnp.asarray(seg)


def _mask(seg: jax.Array) -> jax.Array:
    s = seg.shape[1]
    return jnp.tril(jnp.ones((s, s), bool))[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])


def _qkv(b=B, s=S, hq=HQ, hk=HK, hd=HD):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (b, s, hq, hd)), jax.random.normal(kk, (b, s, hk, hd)),
            jax.random.normal(kv, (b, s, hk, hd)))


def test_attention_kind_auto_picks_splash_on_tpu_only():
    assert attention_kind(None, "tpu", 2048, False) == "splash"
    assert attention_kind(None, "cpu", 2048, False) == "xla"
    assert attention_kind(None, "gpu", 2048, False) == "xla"
    assert attention_kind(None, "tpu", 100, False) == "xla"      # not a multiple of the 128-lane tile
    assert attention_kind(None, "tpu", 2048, True) == "xla"      # decoding attends over a KV cache
    assert attention_kind("splash", "tpu", 2048, True) == "xla"
    assert attention_kind("xla", "tpu", 2048, False) == "xla"
    assert attention_kind("splash", "cpu", 256, False) == "splash"
    assert attention_kind("cudnn", "gpu", 2048, False) == "cudnn"
    with pytest.raises(UserError, match="multiple of 128"):
        attention_kind("splash", "tpu", 100, False)


def test_config_checks_attention_impl():
    for impl in (None, "xla", "splash", "cudnn"):
        ModelConfig(attention_impl=impl)
    with pytest.raises(ConfigError, match="attention_impl"):
        ModelConfig(attention_impl="flash")


def test_splash_matches_xla_forward_packed_gqa():
    q, k, v = _qkv()
    seg = _packed_segments(B, S)
    want = attention(q, k, v, _mask(seg), None)
    got = splash_attention(q, k, v, seg, interpret=True)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_splash_matches_xla_gradients_packed_gqa():
    q, k, v = _qkv()
    seg = _packed_segments(B, S)
    cot = jax.random.normal(jax.random.key(1), q.shape)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * cot)

    want = jax.grad(loss(lambda q, k, v: attention(q, k, v, _mask(seg), None)), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(lambda q, k, v: splash_attention(q, k, v, seg, interpret=True)), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


@pytest.mark.slow
def test_sharded_splash_matches_xla_on_a_mesh():
    """Rows over fsdp, heads over tensor (query and key heads alike), inside shard_map; forward and dq."""
    mesh = sharding.make_mesh(data=1, fsdp=2, expert=1, tensor=2, devices=jax.devices()[:4])
    q, k, v = _qkv(s=128)
    seg = _packed_segments(B, 128)

    def loss(f):
        return lambda q: jnp.sum(f(q) ** 2)

    want_fn = jax.jit(jax.value_and_grad(loss(lambda q: attention(q, k, v, _mask(seg), None))))
    got_fn = jax.jit(jax.value_and_grad(loss(lambda q: sharded_splash_attention(q, k, v, seg, mesh))))
    (want, dwant), (got, dgot) = want_fn(q), got_fn(q)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(dgot, dwant, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_model_with_splash_matches_xla():
    """The whole transformer, packed rows: attention_impl="splash" (no dense mask) == "xla"."""
    base = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, mlp_hidden=96)
    cx, cs = ModelConfig(**base, attention_impl="xla"), ModelConfig(**base, attention_impl="splash")
    params = model.init(cx, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 128), 0, 64)
    seg = _packed_segments(1, 128)
    positions = jnp.where(seg == 1, jnp.arange(128), jnp.arange(128) - 100)
    want, _ = model.apply(cx, params, tokens, positions, seg)
    got, _ = model.apply(cs, params, tokens, positions, seg)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
