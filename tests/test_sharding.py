"""Sharded execution equals single-device execution, and parameters really are split.

Runs on the 8 simulated CPU devices from conftest.py. For each (data, fsdp,
expert, tensor) mesh and each MoE dispatch path, the jitted forward logits and
the gradient of a scalar loss (next-token cross-entropy + 1e-3 * router z-loss)
must match a single-device run to fp32 tolerance, with the mesh passed into
``model.apply`` so every activation constraint is active.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flexmoe_jax import config as config_lib, model, train
from flexmoe_jax.sharding import MESH_AXES, batch_spec, make_mesh, named_sharding

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")

# (data, fsdp, expert, tensor)
MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 1, 4, 2), (2, 1, 4, 1), (1, 2, 2, 2)]
IMPLS = ["dense", "blocks", "ragged"]
BATCH, SEQ = 8, 16
ATOL, RTOL = 1e-5, 1e-4
# Compile time dominates this file: with XLA:CPU's fusion emitters and LLVM -O2
# one tiny forward+grad program takes ~7 CPU-s to compile, with the classic
# emitters at -O0 ~1.5 s. Same HLO, same partitioning; only codegen differs.
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0}


def moe_config(impl: str) -> config_lib.ModelConfig:
    # 8 experts so an expert axis of 4 holds 2 each; small blocks so "blocks" runs several.
    return config_lib.tiny(num_experts=8, top_k=2, n_heads=4, d_model=64, moe_impl=impl,
                           moe_block_size=32)


def dense_config() -> config_lib.ModelConfig:
    return config_lib.tiny(num_experts=0, n_heads=4, d_model=64)


def tokens_for(cfg) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.PRNGKey(1), (BATCH, SEQ), 0, cfg.vocab_size),
                      np.int32)


def loss_and_logits(cfg, mesh, params, tokens):
    """The real training loss (CE + z-losses) of the whole rows, plus the logits."""
    loss, _ = train.loss_and_metrics(cfg, params, train.lm_batch(tokens), train.LossConfig(), mesh)
    logits, _ = model.apply(cfg, params, tokens, mesh=mesh)
    return loss, logits


def step_fn(cfg, mesh):
    """(params, tokens) -> (loss, logits, grads), jitted with explicit shardings on ``mesh``."""
    grad_fn = jax.value_and_grad(functools.partial(loss_and_logits, cfg, mesh), has_aux=True)

    def step(params, tokens):
        (loss, logits), grads = grad_fn(params, tokens)
        return loss, logits, grads

    if mesh is None:
        return jax.jit(step, compiler_options=FAST_COMPILE)
    pshard = model.param_shardings(cfg, mesh)
    # Shardings from the one rules table (batch -> (data, fsdp, expert), act_vocab -> tensor).
    batch = named_sharding(mesh, ("batch", "length"), (BATCH, SEQ))
    logits = named_sharding(mesh, ("batch", "length", "act_vocab"), (BATCH, SEQ, cfg.vocab_size))
    return jax.jit(step, in_shardings=(pshard, batch),
                   out_shardings=(NamedSharding(mesh, P()), logits, pshard),
                   compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def host_params(cfg):
    """model.init(cfg, 0) as host numpy. The dispatch path does not change the
    parameters, so every moe_impl shares one init (and one init compile)."""
    return jax.tree.map(np.asarray, model.init(cfg.replace(moe_impl="auto"), 0))


@functools.lru_cache(maxsize=None)
def reference(cfg):
    """Single-device (loss, logits, grads) as host numpy, plus the host params and tokens."""
    dev = jax.devices()[0]
    params = jax.device_put(host_params(cfg), dev)
    tokens = tokens_for(cfg)
    loss, logits, grads = step_fn(cfg, None)(params, jax.device_put(tokens, dev))
    host = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    return host(params), tokens, float(loss), np.asarray(logits), host(grads)


def assert_tree_close(got, want, what):
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    for path, w in jax.tree_util.tree_leaves_with_path(want):
        np.testing.assert_allclose(np.asarray(flat_got[path]), w, atol=ATOL, rtol=RTOL,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def check_against_reference(cfg, mesh, params):
    _, tokens, ref_loss, ref_logits, ref_grads = reference(cfg)
    tokens = jax.device_put(tokens, NamedSharding(mesh, batch_spec()))
    compiled = step_fn(cfg, mesh).lower(params, tokens).compile()
    # Really partitioned: the gradient of data/fsdp-split work needs cross-device reductions.
    hlo = compiled.as_text()
    assert "all-reduce" in hlo or "reduce-scatter" in hlo
    loss, logits, grads = compiled(params, tokens)
    np.testing.assert_allclose(float(loss), ref_loss, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=ATOL, rtol=RTOL)
    assert_tree_close(grads, ref_grads, "grads")
    # Outputs come back with the shardings we asked for.
    want = model.param_shardings(cfg, mesh)
    for (path, g), s in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
        assert g.sharding.is_equivalent_to(s, g.ndim), jax.tree_util.keystr(path)
    return grads


def _mesh_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", MESHES, ids=_mesh_id)
@pytest.mark.slow  # over ~3 s on 2 cores
def test_moe_sharded_matches_single_device(shape, impl):
    cfg = moe_config(impl)
    mesh = make_mesh(*shape)
    # Host params placed with param_shardings (init_sharded is checked below).
    params = jax.tree.map(jax.device_put, host_params(cfg), model.param_shardings(cfg, mesh))
    check_against_reference(cfg, mesh, params)


def test_forward_api_with_mesh():
    """model.forward(..., mesh=mesh) on sharded params gives the single-device logits."""
    cfg = moe_config("auto")  # auto -> blocks on CPU (top_k < num_experts)
    mesh = make_mesh(2, 1, 4, 1)
    params = jax.tree.map(jax.device_put, host_params(cfg), model.param_shardings(cfg, mesh))
    _, tokens, _, ref_logits, _ = reference(moe_config("blocks"))
    tokens = jax.device_put(tokens, named_sharding(mesh, ("batch", "length"), tokens.shape))
    logits, aux = model.forward(cfg, params, tokens, mesh=mesh, return_aux=True)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=ATOL, rtol=RTOL)
    assert aux["gates"].shape == (cfg.n_layers, BATCH, SEQ, cfg.num_experts)


def check_init_sharded(cfg, mesh, params):
    """init_sharded drew the same numbers as the single-device init, straight into the layout."""
    assert_tree_close(params, host_params(cfg), "init_sharded params")
    want = model.param_shardings(cfg, mesh)
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim), jax.tree_util.keystr(path)


def _shard_shapes(x):
    return {tuple(s.data.shape) for s in x.addressable_shards}


def test_expert_tensors_split_on_expert_axis():
    cfg = moe_config("auto")
    e, d, h, L = cfg.num_experts, cfg.d_model, cfg.mlp_hidden, cfg.n_layers
    mesh = make_mesh(1, 2, 4, 1)  # expert=4 and fsdp=2
    params = model.init_sharded(cfg, 0, mesh)
    check_init_sharded(cfg, mesh, params)
    moe = params["layers"]["moe"]
    for name in ("gate", "up", "down"):
        x = moe[name]
        spec = tuple(x.sharding.spec)
        assert spec[1] == "expert", (name, spec)
        embed_dim = 2 if name != "down" else 3
        assert spec[embed_dim] == "fsdp", (name, spec)
        want = list(x.shape)
        want[1] //= 4
        want[embed_dim] //= 2
        assert _shard_shapes(x) == {tuple(want)}, name
        assert {s.data.shape[1] for s in x.addressable_shards} == {e // 4}
        # 4 distinct expert slices of 2 experts each.
        assert {s.index[1].start for s in x.addressable_shards} == {0, 2, 4, 6}
    assert moe["gate"].shape == (L, e, d, h)
    # The router is not split over experts (every token scores every expert); embed is.
    assert tuple(moe["router"].sharding.spec) == (None, None, "fsdp")
    assert _shard_shapes(moe["router"]) == {(L, e, d // 2)}
    assert _shard_shapes(params["embed"]) == {(cfg.vocab_size, d // 2)}  # (vocab, embed)
    assert _shard_shapes(params["final_norm"]) == {(d,)}  # norms replicated


def test_fsdp_and_tensor_split_embed_and_mlp():
    cfg = moe_config("auto")
    e, d, h, L, v = cfg.num_experts, cfg.d_model, cfg.mlp_hidden, cfg.n_layers, cfg.vocab_size
    mesh = make_mesh(1, 2, 2, 2)
    params = jax.tree.map(jax.device_put, host_params(cfg), model.param_shardings(cfg, mesh))
    gate = params["layers"]["moe"]["gate"]  # [L, E, d, h] (layers, expert, embed, mlp)
    assert tuple(gate.sharding.spec) == (None, "expert", "fsdp", "tensor")
    assert _shard_shapes(gate) == {(L, e // 2, d // 2, h // 2)}
    assert _shard_shapes(params["layers"]["moe"]["down"]) == {(L, e // 2, h // 2, d // 2)}
    assert _shard_shapes(params["embed"]) == {(v // 2, d // 2)}       # (vocab, embed)
    assert _shard_shapes(params["lm_head"]) == {(d // 2, v // 2)}     # (embed, vocab)
    assert _shard_shapes(params["layers"]["attn"]["q_proj"]) == {(L, d // 2, d // 2)}
    assert _shard_shapes(params["layers"]["attn"]["o_proj"]) == {(L, d // 2, d // 2)}
    assert _shard_shapes(params["layers"]["moe"]["router"]) == {(L, e, d // 2)}
    assert _shard_shapes(params["final_norm"]) == {(d,)}


@pytest.mark.slow  # over ~3 s on 2 cores
def test_dense_model_shards_and_matches():
    cfg = dense_config()
    d, h, L = cfg.d_model, cfg.mlp_hidden, cfg.n_layers
    mesh = make_mesh(2, 2, 1, 2)
    params = model.init_sharded(cfg, 0, mesh)
    assert "moe" not in params["layers"]
    gate = params["layers"]["mlp"]["gate"]  # [L, d, h] (layers, embed, mlp)
    assert tuple(gate.sharding.spec) == (None, "fsdp", "tensor")
    assert _shard_shapes(gate) == {(L, d // 2, h // 2)}
    assert _shard_shapes(params["layers"]["mlp"]["down"]) == {(L, h // 2, d // 2)}
    check_init_sharded(cfg, mesh, params)
    check_against_reference(cfg, mesh, params)


@pytest.mark.slow  # over ~3 s on 2 cores
def test_indivisible_dims_fall_back_to_replicated():
    """4 heads on a tensor axis of 8: dims the axis does not divide replicate instead of failing."""
    cfg = moe_config("auto").replace(num_experts=4, vocab_size=250)
    mesh = make_mesh(1, 1, 1, 8)
    shardings = model.param_shardings(cfg, mesh)
    # vocab 250 is not divisible by 8 -> replicated; mlp 96 and q_width 64 are -> split.
    assert tuple(shardings["embed"].spec)[0] is None
    assert tuple(shardings["layers"]["moe"]["gate"].spec)[-1] == "tensor"
    shapes = model.param_shapes(cfg)
    params = jax.tree.map(lambda s, sh: jax.device_put(np.zeros(s.shape, s.dtype), sh), shapes, shardings)
    assert _shard_shapes(params["layers"]["moe"]["gate"]) == {(2, 4, 64, 12)}
    assert _shard_shapes(params["embed"]) == {(250, 64)}
    # The whole sharded step (4 heads constrained onto 8 tensor shards) still lowers and compiles.
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    step_fn(cfg, mesh).lower(params, tokens).compile()


def test_make_mesh_wrong_device_count_is_clear():
    with pytest.raises(ValueError, match=r"needs 16 devices but 8 are available"):
        make_mesh(2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"needs 4 devices but 8"):
        make_mesh(expert=4)
    # An explicit device list is honoured.
    mesh = make_mesh(1, 1, 4, 1, devices=jax.devices()[:4])
    assert mesh.shape == dict(zip(MESH_AXES, (1, 1, 4, 1)))
    with pytest.raises(ValueError, match="needs 4 devices but 2"):
        make_mesh(2, 2, devices=jax.devices()[:2])


def _collectives(hlo: str) -> list[str]:
    return [line.strip() for line in hlo.splitlines()
            if re.search(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all)\(", line)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 1, 4, 1), (1, 2, 2, 2)], ids=_mesh_id)
@pytest.mark.slow  # over ~3 s on 2 cores
def test_expert_parallel_moves_tokens_not_experts(shape, impl):
    """With an expert axis, no device ever receives another device's experts.

    The compiled training step (forward + backward) may gather an expert
    tensor's fsdp-split ``embed`` dim, but no collective ever produces a
    tensor holding all E experts: each device runs the experts it holds on
    the tokens its expert group sends it (moe.dispatch_sharded). A
    weight-gathering layout (GSPMD on the plain dispatch) does produce
    [E, d, h] all-gathers, which this test would catch.
    """
    cfg = moe_config(impl)
    e, d, h = cfg.num_experts, cfg.d_model, cfg.mlp_hidden
    mesh = make_mesh(*shape)
    params = jax.tree.map(jax.device_put, host_params(cfg), model.param_shardings(cfg, mesh))
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32, sharding=NamedSharding(mesh, batch_spec()))
    hlo = step_fn(cfg, mesh).lower(params, tokens).compile().as_text()
    coll = _collectives(hlo)
    assert any("reduce-scatter(" in c for c in coll)  # partial outputs go back to their token shard
    whole = re.compile(rf"\[(\d+,)?{e},({d}|{h}),({d}|{h}|{h // 2})\]")
    moved = [c for c in coll if whole.search(c.split("=", 1)[1].split("(", 1)[0])]
    assert not moved, moved
    assert mesh.shape["expert"] > 1


def test_weight_gathering_layout_is_caught():
    """The check above can fail: plain dispatch under GSPMD gathers all experts onto every device."""
    from flexmoe_jax import moe

    cfg = moe_config("blocks")
    e, d, h = cfg.num_experts, cfg.d_model, cfg.mlp_hidden
    mesh = make_mesh(2, 1, 4, 1)
    w = moe.Experts(*(jax.ShapeDtypeStruct(s, jnp.float32, sharding=named_sharding(mesh, axes, s))
                      for s, axes in (((e, d, h), ("expert", "embed", "mlp")), ((e, d, h), ("expert", "embed", "mlp")),
                                      ((e, h, d), ("expert", "mlp", "embed")))))
    x = jax.ShapeDtypeStruct((64, d), jnp.float32, sharding=named_sharding(mesh, ("batch", None), (64, d)))
    router = jax.ShapeDtypeStruct((e, d), jnp.float32)

    def run(x, router, w, sharded):
        r = moe.route(x, router, None, cfg.top_k)
        return moe.dispatch_sharded(x, r, w, mesh, "blocks", 32) if sharded else moe.dispatch(x, r, w, "blocks", 32)

    whole = re.compile(rf"\[{e},({d}|{h}),({d}|{h})\]")
    for sharded, expect_moved in ((False, True), (True, False)):
        coll = _collectives(jax.jit(functools.partial(run, sharded=sharded)).lower(x, router, w).compile().as_text())
        moved = [c for c in coll if whole.search(c.split("=", 1)[1].split("(", 1)[0])]
        assert bool(moved) == expect_moved, (sharded, moved)


@pytest.mark.parametrize("shape", [(4, 1, 2, 1), (2, 1, 2, 2)], ids=_mesh_id)
@pytest.mark.slow  # over ~3 s on 2 cores
def test_expert_training_step_sharded_matches_single_device(shape):
    """An owner's step (frozen public slot and trained slot as separate leaves, joined inside the
    layer) on a mesh whose expert axis holds one slot per device equals the single-device step."""
    from flexmoe_jax import expert, optim

    anchor_cfg = dense_config()
    cfg, params = expert.upcycle(anchor_cfg, jax.device_get(model.init(anchor_cfg, 0)), "math",
                                 router_rows=np.random.RandomState(0).normal(
                                     0, 0.05, (anchor_cfg.n_layers, 2, anchor_cfg.d_model)).astype(np.float32))
    trainable, frozen = optim.split(params, expert.TRAINABLE)
    batch = train.lm_batch(tokens_for(cfg))

    def loss(mesh, t, f, b):
        return train.loss_and_metrics(cfg, optim.combine(t, f, concat_slots=False), b, train.LossConfig(), mesh)[0]

    grad = lambda mesh: jax.jit(jax.value_and_grad(functools.partial(loss, mesh)),  # noqa: E731
                                compiler_options=FAST_COMPILE)
    want_loss, want = grad(None)(trainable, frozen, batch)
    mesh = make_mesh(*shape)
    from flexmoe_jax.train import place

    got_loss, got = grad(mesh)(place(cfg, trainable, mesh), place(cfg, frozen, mesh),
                               jax.device_put(batch, NamedSharding(mesh, batch_spec())))
    np.testing.assert_allclose(float(got_loss), float(want_loss), atol=ATOL, rtol=RTOL)
    assert set(got) == set(want) == {k for k in trainable}
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=ATOL, rtol=RTOL, err_msg=k)


@pytest.mark.slow  # over ~3 s on 2 cores
def test_experts_indivisible_by_the_expert_axis_still_match():
    """6 experts on an expert axis of 4: the expert tensors stay whole (replicated), the batch is
    still split over the expert axis, and each device runs all experts on its own tokens."""
    cfg = moe_config("blocks").replace(num_experts=6)
    mesh = make_mesh(2, 1, 4, 1)
    shardings = model.param_shardings(cfg, mesh)
    assert tuple(shardings["layers"]["moe"]["gate"].spec)[1] is None
    params = jax.tree.map(jax.device_put, host_params(cfg), shardings)
    check_against_reference(cfg, mesh, params)


def test_a_mesh_that_cannot_split_a_dimension_warns_once(caplog):
    import logging

    from flexmoe_jax import sharding

    sharding._warn_replicated.cache_clear()
    mesh = make_mesh(1, 1, 1, 8)
    with caplog.at_level(logging.WARNING, logger="flexmoe_jax.sharding"):
        s1 = sharding.named_sharding(mesh, ("embed", "mlp"), (16, 4))
        s2 = sharding.named_sharding(mesh, ("embed", "mlp"), (16, 4))
    assert s1.spec == s2.spec and s1.spec[1] is None  # mlp replicated, embed keeps its (size-1) axis
    warned = [r.getMessage() for r in caplog.records if "do not divide" in r.getMessage()]
    assert len(warned) == 1 and "'mlp' of size 4" in warned[0] and "tensor (8 devices)" in warned[0]
