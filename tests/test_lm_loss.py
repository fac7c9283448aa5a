"""The chunked LM loss (flexmoe_jax.lm_loss): the same loss and gradients as whole-sequence logits,
with one chunk's logits live at a time."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexmoe_jax import lm_loss, model, train
from flexmoe_jax.config import tiny


def _batch(cfg, b=2, s=48, seed=0):
    rng = np.random.RandomState(seed)
    toks = rng.randint(3, cfg.vocab_size, (b, s + 1)).astype(np.int32)
    weights = np.ones((b, s), np.float32)
    weights[:, -7:] = 0.0
    return {"decoder_input_tokens": toks[:, :-1], "decoder_target_tokens": toks[:, 1:],
            "decoder_loss_weights": weights, "decoder_segment_ids": np.ones((b, s), np.int32),
            "decoder_positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()}


@pytest.mark.parametrize("seq_len, chunk, n", [(48, 0, 1), (48, 48, 1), (48, 64, 1), (48, 16, 3), (48, 20, 3),
                                               (48, 7, 8), (2048, 512, 4), (13, 4, 13)])
def test_num_chunks_is_the_fewest_equal_chunks_within_the_limit(seq_len, chunk, n):
    assert lm_loss.num_chunks(seq_len, chunk) == n


def test_head_free_forward_times_the_head_is_the_models_logits():
    cfg = tiny(num_experts=4, top_k=2)
    p = model.init(cfg, 0)
    b = _batch(cfg)
    logits, _ = model.apply(cfg, p, b["decoder_input_tokens"])
    hidden, _ = model.apply_hidden(cfg, p, b["decoder_input_tokens"], b["decoder_positions"],
                                   b["decoder_segment_ids"])
    assert hidden.shape == (2, 48, cfg.d_model)
    again = jnp.dot(hidden, p["lm_head"].astype(hidden.dtype), preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))


@pytest.mark.parametrize("moe", [False, True])
def test_chunked_loss_and_gradients_equal_the_whole_sequence(moe):
    cfg = tiny(num_experts=4 if moe else 0, top_k=2)
    p = model.init(cfg, 1)
    b = _batch(cfg, seed=3)
    whole, chunked = train.LossConfig(logits_chunk=0), train.LossConfig(logits_chunk=16)

    def loss(params, lc):
        return train.loss_and_metrics(cfg, params, b, lc)

    (l0, m0), g0 = jax.value_and_grad(loss, has_aux=True)(p, whole)
    (l1, m1), g1 = jax.value_and_grad(loss, has_aux=True)(p, chunked)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(float(m1["ce"]), float(m0["ce"]), rtol=1e-6)
    for (path, a), c in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=2e-5, atol=1e-7, err_msg=str(path))
    # the reference: softmax cross-entropy of the model's own logits
    logits, _ = model.apply(cfg, p, b["decoder_input_tokens"])
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["decoder_target_tokens"][..., None], -1)[..., 0]
    w = b["decoder_loss_weights"]
    np.testing.assert_allclose(float(m1["ce"]), float(jnp.sum(ce * w) / w.sum()), rtol=1e-5)


def test_only_one_chunk_of_logits_is_live():
    """The compiled gradient's temporaries shrink with the chunk: the whole [B, S, V] fp32 logits (and
    their gradient) are never materialized."""
    cfg = dataclasses.replace(tiny(num_experts=0), vocab_size=16384)
    p = model.init(cfg, 0)
    b = _batch(cfg, b=2, s=256)

    def temp(chunk):
        f = jax.jit(jax.grad(lambda q: train.loss_and_metrics(cfg, q, b, train.LossConfig(logits_chunk=chunk))[0]))
        return f.lower(p).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 2 * 256 * 16384 * 4
    whole, chunked = temp(0), temp(32)
    assert whole > logits_bytes  # the whole logits (at least) are live at once
    # chunks of 32 of 256 positions free more than the whole logits (80 -> 28 MiB measured)
    assert whole - chunked > logits_bytes


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_chunked_loss_on_an_fsdp_mesh_equals_one_device():
    """On 8 devices (rows and the head's embed dim split over fsdp) the chunked loss and its gradients
    are the one-device whole-sequence ones."""
    from flexmoe_jax.sharding import make_mesh

    cfg = tiny(num_experts=4, top_k=2)
    mesh = make_mesh(1, 8, 1, 1)
    p = model.init(cfg, 2)
    b = _batch(cfg, b=8, s=48, seed=5)
    want, gw = jax.value_and_grad(lambda q: train.loss_and_metrics(cfg, q, b, train.LossConfig(logits_chunk=0))[0])(p)
    sh = model.param_shardings(cfg, mesh)
    placed = jax.device_put(jax.device_get(p), sh)
    f = jax.jit(jax.value_and_grad(
        lambda q, bb: train.loss_and_metrics(cfg, q, bb, train.LossConfig(logits_chunk=16), mesh)[0]),
        out_shardings=(None, sh))  # gradients sharded like their parameters, as the train step pins them
    got, gg = f(placed, jax.device_put(b, train.batch_sharding(mesh)))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert gg["lm_head"].sharding == placed["lm_head"].sharding and len(gg["lm_head"].sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(gg["lm_head"]), np.asarray(gw["lm_head"]), rtol=1e-4, atol=1e-6)
