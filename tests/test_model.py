"""Model semantics, opt-out, and bad input (HF parity lives in test_hf.py)."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexmoe_jax import layers, model, selection
from flexmoe_jax.config import ConfigError, ModelConfig, tiny


@pytest.fixture(scope="module")
def moe():
    cfg = tiny(num_experts=4, top_k=2, init_std=0.2)
    return cfg, model.init(cfg, 0)


def _tokens(cfg, b=2, s=16, seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, (b, s)).astype(np.int32)


def test_param_tree_is_stacked(moe):
    cfg, p = moe
    L, E = cfg.n_layers, cfg.num_experts
    assert p["layers"]["moe"]["gate"].shape == (L, E, cfg.d_model, cfg.mlp_hidden)
    assert p["layers"]["moe"]["down"].shape == (L, E, cfg.mlp_hidden, cfg.d_model)
    assert p["layers"]["moe"]["router"].shape == (L, E, cfg.d_model)
    assert p["layers"]["attn"]["q_norm"].shape == (L, cfg.n_heads * cfg.head_size)
    axes = model.logical_axes(cfg)
    assert axes["layers"]["moe"]["gate"] == ("layers", "expert", "embed", "mlp")
    assert axes["embed"] == ("vocab", "embed")
    n = sum(x.size for x in jax.tree.leaves(p))
    assert n == cfg.num_params()


def test_scan_keeps_program_size_independent_of_depth():
    def eqns(n_layers):
        cfg = tiny(n_layers=n_layers)
        shapes = model.param_shapes(cfg)
        jaxpr = jax.make_jaxpr(lambda p, t: model.apply(cfg, p, t))(shapes, jnp.zeros((1, 8), jnp.int32))
        return len(jaxpr.jaxpr.eqns)

    assert eqns(2) == eqns(12)


def test_causal(moe):
    cfg, p = moe
    t = _tokens(cfg)
    t2 = t.copy()
    t2[:, 10:] = (t2[:, 10:] + 7) % cfg.vocab_size
    a, b = model.forward(cfg, p, t), model.forward(cfg, p, t2)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert np.abs(np.asarray(a[:, 10:] - b[:, 10:])).max() > 1e-3


def test_packed_segments_equal_separate_sequences(moe):
    cfg, p = moe
    a, b = _tokens(cfg, 1, 6, seed=1), _tokens(cfg, 1, 10, seed=2)
    packed = np.concatenate([a, b], axis=1)
    seg = np.array([[1] * 6 + [2] * 10])
    pos = np.array([list(range(6)) + list(range(10))])
    out = model.forward(cfg, p, packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(out[:, :6], model.forward(cfg, p, a), atol=2e-5)
    np.testing.assert_allclose(out[:, 6:], model.forward(cfg, p, b), atol=2e-5)


@pytest.mark.parametrize("impl", ["dense", "ragged", "blocks"])
def test_dispatch_paths_agree_in_the_model(moe, impl):
    cfg, p = moe
    t = _tokens(cfg)
    ref = model.forward(cfg.replace(moe_impl="dense"), p, t)
    np.testing.assert_allclose(model.forward(cfg.replace(moe_impl=impl), p, t), ref, atol=1e-4)


def test_opt_out_equals_physical_exclusion(moe):
    cfg, p = moe
    t = _tokens(cfg)
    masked = model.forward(cfg, p, t, active_experts=["public", "expert_1", "expert_3"])
    c2, p2 = selection.exclude(cfg, p, ["expert_2"])
    assert c2.names == ("public", "expert_1", "expert_3") and c2.num_experts == 3
    np.testing.assert_array_equal(masked, model.forward(c2, p2, t))
    np.testing.assert_array_equal(masked, model.forward(cfg, p, t, active_experts=[0, 1, 3]))
    # Opting out changes the answer: the excluded expert did serve tokens.
    assert np.abs(np.asarray(masked - model.forward(cfg, p, t))).max() > 1e-4


def test_excluded_expert_weights_are_never_read(moe):
    cfg, p = moe
    poisoned = jax.tree.map(lambda x: x, p)
    moe_p = dict(poisoned["layers"]["moe"])
    for name in ("gate", "up", "down", "router"):
        moe_p[name] = moe_p[name].at[:, 2].set(jnp.nan)
    poisoned = {**poisoned, "layers": {**poisoned["layers"], "moe": moe_p}}
    t = _tokens(cfg)
    out = model.forward(cfg, poisoned, t, active_experts=["public", "expert_1", "expert_3"])
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(out, model.forward(cfg, p, t, active_experts=["public", "expert_1", "expert_3"]))


def test_opt_out_caps_top_k_and_rejects_explicit_excess(moe):
    cfg, p = moe
    t = _tokens(cfg)
    single = model.forward(cfg, p, t, active_experts=["expert_3"])  # top-2 capped at 1
    c1, p1 = selection.include(cfg, p, ["expert_3"])
    assert c1.top_k == 1
    np.testing.assert_array_equal(single, model.forward(c1, p1, t))
    with pytest.raises(ValueError, match="top_k=3 is larger than the 2 active experts"):
        model.forward(cfg, p, t, active_experts=["public", "expert_1"], top_k=3)
    with pytest.raises(ValueError, match="top_k=5"):
        model.forward(cfg, p, t, top_k=5)


def test_top_k_all_equals_dense_mixture(moe):
    cfg, p = moe
    t = _tokens(cfg)
    a = model.forward(cfg, p, t, top_k=4)
    b = model.forward(cfg.replace(top_k=4, moe_impl="blocks"), p, t)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_unknown_expert_names(moe):
    cfg, p = moe
    t = _tokens(cfg)
    with pytest.raises(ValueError, match="unknown expert 'hospital'.*'public'"):
        model.forward(cfg, p, t, active_experts=["hospital"])
    with pytest.raises(ValueError, match="unknown expert"):
        selection.exclude(cfg, p, ["nope"])
    with pytest.raises(ValueError, match="out of range"):
        selection.exclude(cfg, p, [9])
    with pytest.raises(ValueError, match="twice"):
        selection.exclude(cfg, p, ["public", 0])
    with pytest.raises(ValueError, match="every expert"):
        selection.exclude(cfg, p, [0, 1, 2, 3])


def test_aux_losses(moe):
    cfg, p = moe
    t = _tokens(cfg)
    logits, aux = model.forward(cfg, p, t, return_aux=True)
    np.testing.assert_allclose(aux["logit_z"], jnp.square(jax.nn.logsumexp(logits, -1)), rtol=1e-6)
    assert aux["router_z"].shape == t.shape and np.all(np.asarray(aux["router_z"]) >= 0)
    gates = np.asarray(aux["gates"])
    assert gates.shape == (cfg.n_layers, *t.shape, cfg.num_experts)
    # exactly top_k experts carry weight per token; no renormalization -> sum < 1
    assert ((gates > 0).sum(-1) == cfg.top_k).all()
    assert (gates.sum(-1) < 1.0 + 1e-6).all()


def test_expert_bias_is_clamped():
    cfg = tiny(num_experts=3, top_k=1, expert_bias=True, init_std=0.2)
    p = model.init(cfg, 3)
    t = _tokens(cfg)
    base, aux = model.forward(cfg, p, t, return_aux=True)
    bias = p["layers"]["moe"]["bias"]
    up = {**p, "layers": {**p["layers"], "moe": {**p["layers"]["moe"], "bias": bias + 5.0}}}
    np.testing.assert_array_equal(base, model.forward(cfg, up, t))  # positive bias clamps to 0
    down = {**p, "layers": {**p["layers"], "moe": {**p["layers"]["moe"], "bias": bias.at[:, 1].set(-1e4)}}}
    _, aux_down = model.forward(cfg, down, t, return_aux=True)
    assert np.asarray(aux["gates"])[..., 1].max() > 0
    assert np.asarray(aux_down["gates"])[..., 1].max() == 0  # expert 1 can no longer win


def test_dense_olmo2_model():
    cfg = tiny(num_experts=0)
    p = model.init(cfg, 0)
    assert "mlp" in p["layers"] and "moe" not in p["layers"]
    logits, aux = model.forward(cfg, p, _tokens(cfg), return_aux=True)
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    assert set(aux) == {"logit_z"}
    with pytest.raises(ValueError, match="dense model"):
        model.forward(cfg, p, _tokens(cfg), active_experts=["public"])


@pytest.mark.slow  # over ~3 s on 2 cores
def test_remat_and_bf16(moe):
    cfg, p = moe
    t = _tokens(cfg)
    ref = model.forward(cfg, p, t)

    def loss(c, p):
        return jnp.mean(model.apply(c, p, jnp.asarray(t))[0] ** 2)

    g_ref = jax.grad(loss, argnums=1)(cfg, p)
    g_remat = jax.grad(loss, argnums=1)(cfg.replace(remat="full"), p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_ref, g_remat)
    bf = model.forward(cfg.replace(dtype="bfloat16", moe_impl="dense"), p, t)
    assert bf.dtype == jnp.float32
    assert np.abs(np.asarray(bf - ref)).max() < 0.5


def test_bad_tokens(moe):
    cfg, p = moe
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        model.forward(cfg, p, np.array([[1, 2, 256]]))
    with pytest.raises(ValueError, match="token ids"):
        model.forward(cfg, p, np.array([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds the model's position limit max_seq_len=128"):
        model.forward(cfg, p, np.zeros((1, 129), np.int32))
    with pytest.raises(ValueError, match="integer"):
        model.forward(cfg, p, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model.forward(cfg, p, np.zeros((4,), np.int32))


def test_params_that_disagree_with_config(moe):
    cfg, p = moe
    with pytest.raises(ValueError,
                       match=r"layers'\]\['moe'\]\['gate'\] has shape \(2, 4, 64, 96\), config wants \(2, 5, 64, 96\)"):
        model.forward(cfg.replace(num_experts=5), p, _tokens(cfg))
    with pytest.raises(ValueError, match="missing"):
        model.forward(cfg.replace(expert_bias=True), p, _tokens(cfg))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(num_experts=2, top_k=3), "top_k=3 must be between 1 and num_experts=2"),
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(moe_impl="fast"), "moe_impl must be one of"),
    (dict(num_experts=2, expert_names=("a",)), "1 expert_names for 2 experts"),
    (dict(num_experts=2, expert_names=("a", "a")), "unique"),
])
def test_config_errors(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        tiny(**kwargs)


def test_config_json_roundtrip_and_gin():
    cfg = tiny(expert_names=("public", "math", "code", "bible"))
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown fields"):
        ModelConfig.from_dict({"d_modle": 3})
    gin.clear_config()
    gin.parse_config("ModelConfig.d_model = 96\nModelConfig.num_experts = 3\nModelConfig.top_k = 2")
    try:
        c = ModelConfig()
        assert (c.d_model, c.num_experts, c.top_k) == (96, 3, 2)
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name,params_b", [("model/olmo2_1b.gin", 1.48), ("model/olmo2_7b.gin", 7.30),
                                           ("model/flexolmo_7x7b.gin", 33.3)])
def test_gin_model_sizes(name, params_b):
    from flexmoe_jax.config import from_gin

    cfg = from_gin([name])
    assert abs(cfg.num_params() / 1e9 - params_b) < 0.05 * params_b


def test_gin_errors():
    from flexmoe_jax.config import from_gin

    with pytest.raises(FileNotFoundError, match="gin file 'model/nope.gin' not found"):
        from_gin(["model/nope.gin"])
    with pytest.raises(ValueError):
        from_gin(["model/tiny.gin"], ["ModelConfig.d_modle = 3"])


@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2)])
def test_attention_equals_masked_softmax_reference(hq, hk):
    """The head-major, normalize-after form equals softmax(q k^T / sqrt(d), masked) v in float64,
    GQA included, and a query whose keys are all masked gets uniform weights (softmax's answer)."""
    b, s, m, hd = 2, 5, 7, 8
    rng = np.random.RandomState(0)
    q, k, v = (rng.randn(b, n, h, hd).astype(np.float32) for n, h in ((s, hq), (m, hk), (m, hk)))
    mask = rng.rand(b, 1, s, m) < 0.6
    mask[..., 0] = True
    mask[1, 0, 3] = False  # every key masked for this query
    got = np.asarray(jax.jit(lambda q, k, v: layers.attention(q, k, v, jnp.asarray(mask), None))(q, k, v))
    g = hq // hk
    kk, vv = np.repeat(k, g, axis=2).astype(np.float64), np.repeat(v, g, axis=2).astype(np.float64)
    scores = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), kk) / np.sqrt(hd)
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True, initial=-1e300))
    probs[1, :, 3] = 1.0  # the fully masked row: uniform
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd->bqhd", probs, vv)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
