"""Train step, masked optimizer, expert training invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexmoe_jax import expert, model, optim, train
from flexmoe_jax.config import tiny


def _batch(cfg, b=4, s=32, seed=0):
    rng = np.random.RandomState(seed)
    toks = rng.randint(3, cfg.vocab_size, (b, s + 1)).astype(np.int32)
    weights = np.ones((b, s), np.float32)
    weights[:, -5:] = 0.0  # padding is masked
    return {"decoder_input_tokens": toks[:, :-1], "decoder_target_tokens": toks[:, 1:],
            "decoder_loss_weights": weights, "decoder_segment_ids": np.ones((b, s), np.int32),
            "decoder_positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()}


@pytest.fixture(scope="module")
def anchor():
    cfg = tiny(num_experts=0, init_std=0.05)
    return cfg, jax.device_get(model.init(cfg, 0))


def test_split_combine_roundtrip(anchor):
    cfg, p = anchor
    ecfg, ep = expert.upcycle(cfg, p, "math")
    tr, fr = optim.split(ep, expert.TRAINABLE)
    assert set(tr) == {"layers/moe/gate#1", "layers/moe/up#1", "layers/moe/down#1",
                       "layers/moe/router#1", "layers/moe/bias#1"}
    back = optim.combine(tr, fr)
    jax.tree.map(np.testing.assert_array_equal, back, ep)


def test_upcycle_copies_public_ffn(anchor):
    cfg, p = anchor
    ecfg, ep = expert.upcycle(cfg, p, "math")
    assert ecfg.names == ("public", "math") and ecfg.top_k == 2
    for k in ("gate", "up", "down"):
        np.testing.assert_array_equal(ep["layers"]["moe"][k][:, 0], p["layers"]["mlp"][k])
        np.testing.assert_array_equal(ep["layers"]["moe"][k][:, 1], p["layers"]["mlp"][k])
    # Two identical experts with any mixing weights summing <= 1, renormalized by the post-FFN
    # RMSNorm, reproduce the dense anchor exactly up to float error.
    toks = _batch(cfg)["decoder_input_tokens"]
    np.testing.assert_allclose(model.forward(ecfg, ep, toks), model.forward(cfg, p, toks), atol=2e-4)
    with pytest.raises(ValueError, match="dense"):
        expert.upcycle(ecfg, ep, "x")
    with pytest.raises(ValueError, match="'public'"):
        expert.upcycle(cfg, p, "public")


def _run(cfg, params, spec, steps, ocfg, grad_accum=1, batches=None):
    trainable, frozen = optim.split(params, spec)
    tx = optim.make_optimizer(ocfg, trainable)
    state = train.init_state(trainable, tx)
    step = train.jit_train_step(cfg, tx, train.LossConfig(), grad_accum, None)
    history = []
    for i in range(steps):
        batch = batches[i] if batches else _batch(cfg, seed=0)
        state, m = step(state, frozen, batch)
        history.append(jax.device_get(m))
    return state, frozen, history, tx


def test_expert_training_freezes_everything_else(anchor):
    cfg, p = anchor
    ecfg, ep = expert.upcycle(cfg, p, "math", router_rows=np.random.RandomState(0).normal(
        0, 0.05, (cfg.n_layers, 2, cfg.d_model)).astype(np.float32))
    ocfg = optim.OptimConfig(peak_lr=3e-3, warmup_steps=1, total_steps=6, weight_decay=0.0)
    state, frozen, hist, _ = _run(ecfg, ep, expert.TRAINABLE, 6, ocfg)
    final = jax.device_get(optim.combine(state.trainable, frozen))
    flat_final, flat_start = optim.flatten(final), optim.flatten(ep)
    for path, start in flat_start.items():
        if path.startswith("layers/moe/"):
            np.testing.assert_array_equal(flat_final[path][:, 0], start[:, 0], err_msg=path)  # public slot
            assert not np.array_equal(flat_final[path][:, 1], start[:, 1]) or path.endswith("bias"), path
        else:
            np.testing.assert_array_equal(flat_final[path], start, err_msg=path)
    # Every anchor tensor (what the merge checks) is bit-identical.
    assert hist[-1]["ce"] < hist[0]["ce"]
    # Optimizer state: AdamW's two moments of the trainable leaves only, plus step counters.
    trainable_bytes = optim.state_bytes(state.trainable)
    assert trainable_bytes * 2 <= optim.state_bytes(state.opt_state) <= trainable_bytes * 2 + 64
    full_bytes = optim.state_bytes(ep)
    assert trainable_bytes < 0.4 * full_bytes


def test_pretraining_learns_and_accumulation_matches(anchor):
    cfg, p = anchor
    ocfg = optim.OptimConfig(peak_lr=1e-2, warmup_steps=0, total_steps=4, weight_decay=0.1)
    batches = [_batch(cfg, b=4, seed=i % 2) for i in range(4)]
    s1, _, h1, _ = _run(cfg, p, optim.ALL, 4, ocfg, 1, batches)
    s2, _, h2, _ = _run(cfg, p, optim.ALL, 4, ocfg, 2, batches)
    assert h1[-1]["ce"] < h1[0]["ce"]
    np.testing.assert_allclose(h1[0]["ce"], h2[0]["ce"], rtol=1e-5)
    np.testing.assert_allclose(h1[0]["grad_norm"], h2[0]["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), s1.trainable, s2.trainable)


def test_moe_metrics_and_router_only_split(anchor):
    cfg, p = anchor
    ecfg, ep = expert.upcycle(cfg, p, "code")
    _, m = train.loss_and_metrics(ecfg, ep, jax.tree.map(jnp.asarray, _batch(cfg)), train.LossConfig())
    np.testing.assert_allclose(float(jnp.sum(m["expert_share"])), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["expert_share"]), [0.5, 0.5], rtol=1e-6)  # top-2 of 2
    np.testing.assert_allclose(np.asarray(m["expert_gate"]), [0.5, 0.5], rtol=1e-5)  # zero router
    tr, fr = optim.split(ep, optim.ROUTER_ONLY)
    assert set(tr) == {"layers/moe/router", "layers/moe/bias"}


def test_fingerprint_detects_any_change(anchor):
    cfg, p = anchor
    f = expert.fingerprint(cfg, p)
    assert f == expert.fingerprint(cfg, jax.tree.map(np.copy, p))
    q = jax.tree.map(np.copy, p)
    q["final_norm"][3] += 1e-7
    assert expert.fingerprint(cfg, q) != f
    assert expert.fingerprint(cfg.replace(rope_theta=10000.0), p) != f
    assert expert.fingerprint(cfg.replace(routing="public_plus"), p) == f  # how it routes, not what it is
    # The documented formula (what earlier checkpoints recorded): hashing a copy-free view gives the
    # same digest, for float32, bfloat16 and non-contiguous (transposed) arrays alike.
    import hashlib
    import json

    for tree in (p, jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), p),
                 jax.tree.map(lambda x: np.asarray(x).T, p)):
        from flexmoe_jax.config import INFERENCE_FIELDS

        desc = {k: v for k, v in cfg.to_dict().items() if k not in INFERENCE_FIELDS}  # as before they existed
        h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode())
        for path, leaf in sorted(optim.flatten(tree).items()):
            arr = np.asarray(leaf)
            h.update(f"{path}|{arr.dtype}|{arr.shape}".encode())
            h.update(arr.tobytes())
        assert expert.fingerprint(cfg, tree) == h.hexdigest()


def test_router_init_rows(anchor):
    from flexmoe_jax import router_init

    cfg, p = anchor
    a, b = _batch(cfg, seed=1), _batch(cfg, seed=2)
    b["decoder_input_tokens"] = (b["decoder_input_tokens"] % 7) + 3  # a "domain" of a few token ids
    rows = router_init.rows("hidden", cfg, p, [a], [b], num_batches=1)
    assert rows.shape == (cfg.n_layers, 2, cfg.d_model)
    norms = np.linalg.norm(rows, axis=-1)
    assert (norms <= 1.0 + 1e-5).all() and (norms > 0.05).all()
    assert not np.allclose(rows[:, 0], rows[:, 1], atol=1e-3)
    # padding is excluded: zero-weight tokens do not move the mean
    b2 = dict(b, decoder_loss_weights=np.concatenate([b["decoder_loss_weights"][:, :10],
                                                       np.zeros_like(b["decoder_loss_weights"][:, 10:])], 1))
    b3 = dict(b2, decoder_input_tokens=b2["decoder_input_tokens"].copy())
    b3["decoder_input_tokens"][:, 20:] = 5
    np.testing.assert_allclose(router_init.rows("hidden", cfg, p, [a], [b2], 1),
                               router_init.rows("hidden", cfg, p, [a], [b3], 1), atol=1e-6)
    assert not router_init.rows("zeros", cfg, p).any()
    assert router_init.rows("random", cfg, p).std() > 0
    with pytest.raises(ValueError, match="router_init must be one of"):
        router_init.rows("gritlm", cfg, p)
    with pytest.raises(ValueError, match="needs batches"):
        router_init.rows("hidden", cfg, p)


def _grad_flops(cfg, params, spec, concat_slots):
    trainable, frozen = optim.split(params, spec)
    batch = _batch(cfg, b=4, s=32)

    def loss(t):
        return train.loss_and_metrics(cfg, optim.combine(t, frozen, concat_slots), batch, train.LossConfig())[0]

    return jax.jit(jax.grad(loss)).lower(trainable).compile().cost_analysis()["flops"]


@pytest.mark.slow  # over ~3 s on 2 cores
def test_expert_step_skips_frozen_slot_weight_gradients(anchor):
    """Keeping the frozen public slot a separate leaf removes its weight-gradient matmuls."""
    cfg = anchor[0].replace(n_layers=1)  # one layer: XLA's cost analysis counts a loop body once
    ecfg, ep = expert.upcycle(cfg, jax.device_get(model.init(cfg, 0)), "math")
    cut = _grad_flops(ecfg, ep, expert.TRAINABLE, concat_slots=False)
    joined = _grad_flops(ecfg, ep, expert.TRAINABLE, concat_slots=True)
    full = _grad_flops(ecfg, ep, optim.ALL, concat_slots=True)
    t, d, h = 4 * 32, ecfg.d_model, ecfg.mlp_hidden
    slot_dw = 3 * 2 * t * d * h  # gate, up, down weight gradients of one expert slot
    assert joined - cut >= 0.9 * slot_dw, (joined, cut, slot_dw)
    assert cut < full


@pytest.mark.parametrize("scale", [0.0, 10.0])
@pytest.mark.slow  # over ~3 s on 2 cores
def test_bias_start_and_own_learning_rate(anchor, scale):
    """RunConfig.bias_init starts the owner's bias below 0 (so it can move both ways under the clamp);
    OptimConfig.bias_lr_scale is its own learning rate: 0 keeps it fixed, 10 moves it 10x an update."""
    cfg, p = anchor
    ecfg, ep = expert.upcycle(cfg, p, "math", bias_init=-1.0)
    np.testing.assert_array_equal(ep["layers"]["moe"]["bias"], [[0.0, -1.0]] * cfg.n_layers)
    with pytest.raises(ValueError, match="bias_init"):
        expert.upcycle(cfg, p, "math", bias_init=0.5)
    base = dict(peak_lr=3e-3, warmup_steps=1, total_steps=4, weight_decay=0.0)
    moved = {}
    for s in (1.0, scale):
        state, frozen, _, _ = _run(ecfg, ep, expert.TRAINABLE, 4, optim.OptimConfig(**base, bias_lr_scale=s))
        moved[s] = np.asarray(state.trainable["layers/moe/bias#1"]) + 1.0
        router = np.asarray(state.trainable["layers/moe/router#1"])
    assert np.abs(moved[1.0]).max() > 1e-4
    if scale == 0.0:
        np.testing.assert_array_equal(moved[0.0], 0.0)  # fixed at its start
    else:
        assert np.abs(moved[scale]).mean() > 3 * np.abs(moved[1.0]).mean()
    assert not np.array_equal(router, ep["layers"]["moe"]["router"][:, 1:2])  # the rows still train
    with pytest.raises(ValueError, match="bias_lr_scale"):
        optim.OptimConfig(bias_lr_scale=-1.0)


def test_btx_init_stacks_dense_ffns_and_averages_the_rest(anchor):
    """The paper's BTX start: public + dense experts' FFNs as experts, every other tensor averaged."""
    from flexmoe_jax import baselines

    cfg, p = anchor
    d1 = jax.tree.map(lambda x: np.asarray(x) + 0.01, p)
    d2 = jax.tree.map(lambda x: np.asarray(x) - 0.03, p)
    bcfg, bp = baselines.btx_init(cfg, p, {"a": d1, "b": d2}, top_k=2)
    assert bcfg.names == ("public", "a", "b") and bcfg.top_k == 2 and not bcfg.expert_bias
    for k in ("gate", "up", "down"):
        for slot, src in enumerate((p, d1, d2)):
            np.testing.assert_array_equal(bp["layers"]["moe"][k][:, slot], src["layers"]["mlp"][k])
    np.testing.assert_allclose(bp["embed"], np.asarray(p["embed"]) - 0.02 / 3, atol=1e-6)
    assert np.asarray(model.forward(bcfg, bp, np.arange(3, 19)[None])).shape[-1] == cfg.vocab_size
