"""The training state on an FSDP mesh of 8 (simulated CPU) devices: every optimizer-state leaf sharded like
its parameter (scalars replicated), about 1/8 of the optimizer state per device, the whole state donated
to the step and kept on its shardings, the same numbers as one device; the resume restores it so placed.
"""

import os

if "jax" not in __import__("sys").modules:  # conftest sets this too; alone, the file still gets 8 devices
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")

import types  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from flexmoe_jax import expert, flops, model, optim, train  # noqa: E402
from flexmoe_jax.config import tiny  # noqa: E402
from flexmoe_jax.sharding import make_mesh  # noqa: E402
from flexmoe_jax.trainer import state_store  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

N = 8
# eps: Adam's first update is g / (|g| + eps); a large eps keeps it smooth where g is near 0, so the sharded
# step's float reordering moves params by float error, not by a sign flip of a vanishing gradient.
OCFG = optim.OptimConfig(peak_lr=1e-2, warmup_steps=0, total_steps=4, eps=1e-3, bias_lr_scale=0.5)
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def fsdp():
    return make_mesh(1, N, 1, 1)


def _phase(phase: str):
    """(config, trainable, frozen) of ``phase``: a full MoE pretrained whole, or an owner's slot of an
    upcycled dense anchor (the public slot frozen)."""
    if phase == "pretrain":
        cfg = tiny()
        params = jax.device_get(model.init(cfg, 0))
    else:
        anchor = tiny(num_experts=0)
        cfg, params = expert.upcycle(anchor, jax.device_get(model.init(anchor, 0)), "math")
    return (cfg, *jax.device_get(optim.split(params, train.split_for(phase))))  # host copies: never donated


def _param_key(path) -> str | None:
    """The trainable key a state leaf mirrors: its last dict key (``mu['layers/mlp/up']``), if any."""
    last = path[-1] if path else None
    return last.key if isinstance(last, jax.tree_util.DictKey) else None


def _per_device(tree) -> int:
    """Bytes device 0 holds of a tree's arrays."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def _assert_like_params(opt_state, trainable, mesh) -> int:
    """Each leaf mirroring a parameter has its sharding, every other (scalar) leaf is replicated;
    returns how many leaves mirror a parameter."""
    mirrored = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        key = _param_key(path)
        where = jax.tree_util.keystr(path)
        if key is not None:
            assert leaf.shape == trainable[key].shape, where
            assert leaf.sharding == trainable[key].sharding, (where, leaf.sharding, trainable[key].sharding)
            mirrored += 1
        else:
            assert leaf.ndim == 0 and leaf.sharding.is_equivalent_to(NamedSharding(mesh, P()), 0), where
    return mirrored


@pytest.mark.parametrize("phase", ["pretrain", "expert"])
def test_optimizer_state_is_sharded_like_its_params(phase, fsdp):
    cfg, trainable, _ = _phase(phase)
    tx = optim.make_optimizer(OCFG, trainable)
    placed = train.place(cfg, trainable, fsdp)
    state = train.init_sharded(placed, tx, train.state_shardings(cfg, tx, placed, fsdp))
    assert _assert_like_params(state.opt_state, placed, fsdp) == 2 * len(placed)  # Adam's mu and nu
    assert state.step.sharding.is_fully_replicated
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state.trainable, trainable)

    total = optim.state_bytes(state.opt_state)
    sharded = _per_device(state.opt_state)
    before = _per_device(jax.jit(lambda t: train.init_state(t, tx))(placed).opt_state)  # no out_shardings
    print(f"{phase}: optimizer state {total} B in all; per device {before} B replicated, {sharded} B sharded")
    assert before == total
    assert sharded <= 1.3 * total / N


def test_masked_out_leaves_stay_masked(fsdp):
    """optax.masked over half the params: MaskedNode leaves pass through, the rest sharded like params."""
    cfg, trainable, _ = _phase("pretrain")
    mask = {k: i % 2 == 0 for i, k in enumerate(sorted(trainable))}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.masked(optax.adam(1e-3), mask))
    placed = train.place(cfg, trainable, fsdp)
    sh = train.state_shardings(cfg, tx, placed, fsdp)
    state = train.init_sharded(placed, tx, sh)
    mu = state.opt_state[1].inner_state[0].mu
    assert {k for k, v in mu.items() if isinstance(v, optax.MaskedNode)} == {k for k, m in mask.items() if not m}
    assert _assert_like_params(state.opt_state, placed, fsdp) == 2 * sum(mask.values())


def _one_device_step(cfg, trainable, frozen, tx, batch):
    state = train.init_state(trainable, tx)
    return train.jit_train_step(cfg, tx, train.LossConfig(), 1, None)(state, frozen, batch)


@pytest.mark.slow  # compiles the MoE step twice: over ~3 s on 2 cores
@pytest.mark.parametrize("phase", ["pretrain", "expert"])
def test_sharded_step_donates_keeps_shardings_and_matches_one_device(phase, fsdp):
    cfg, trainable, frozen = _phase(phase)
    tx = optim.make_optimizer(OCFG, trainable)
    batch = train.lm_batch(np.random.RandomState(0).randint(3, cfg.vocab_size, (N, 17)))
    want_state, want = _one_device_step(cfg, trainable, frozen, tx, batch)

    placed, frozen_placed = train.place(cfg, trainable, fsdp), train.place(cfg, frozen, fsdp)
    sh = train.state_shardings(cfg, tx, placed, fsdp)
    state = train.init_sharded(placed, tx, sh)
    step = train.jit_train_step(cfg, tx, train.LossConfig(), 1, fsdp, sh, train.shardings(cfg, frozen, fsdp))
    before = jax.tree.leaves(state)
    new, got = step(state, frozen_placed, jax.device_put(batch, train.batch_sharding(fsdp)))
    assert all(x.is_deleted() for x in before)  # params, optimizer state and step: all donated
    jax.tree.map(lambda x, s: (x.sharding == s) or pytest.fail(f"{x.sharding} != {s}"), new, sh)
    _assert_like_params(new.opt_state, new.trainable, fsdp)
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), atol=ATOL, rtol=RTOL)
    for k in trainable:
        np.testing.assert_allclose(np.asarray(new.trainable[k]), np.asarray(want_state.trainable[k]),
                                   atol=ATOL, rtol=RTOL, err_msg=k)
        assert not np.array_equal(np.asarray(new.trainable[k]), trainable[k]) or k.endswith("bias#1"), k
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=RTOL),
                 new.opt_state, want_state.opt_state)


def test_resume_restores_onto_the_state_shardings(fsdp, tmp_path):
    """A saved sharded state restored into a one-device ``like`` lands on the given shardings."""
    cfg, trainable, _ = _phase("expert")
    tx = optim.make_optimizer(OCFG, trainable)
    placed = train.place(cfg, trainable, fsdp)
    sh = train.state_shardings(cfg, tx, placed, fsdp)
    state = train.init_sharded(placed, tx, sh)
    mngr = state_store.manager(tmp_path, types.SimpleNamespace(keep_checkpoints=1))
    state_store.save(mngr, 1, state, {"step": 1})
    mngr.wait_until_finished()
    like = train.init_state(trainable, tx)  # on one device
    restored = state_store.restore(mngr, 1, like, tmp_path / "state", sh)["state"]
    mngr.close()
    jax.tree.map(lambda x, s: (x.sharding == s) or pytest.fail(f"{x.sharding} != {s}"), restored, sh)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)


@pytest.mark.slow  # compiles the MoE step: over ~3 s on 2 cores
def test_compile_check_step_takes_the_sharded_state():
    """``flexmoe compile-check``'s step (flops.compile_train_step) is compiled on the same state shardings."""
    compiled, cfg, mesh = flops.compile_train_step(tiny(), "pretrain", N, 16, mesh=(1, N, 1, 1), ocfg=OCFG)
    trainable = jax.eval_shape(lambda: optim.split(model.init(cfg, 0), optim.ALL)[0])
    tx = optim.make_optimizer(OCFG, trainable)
    want = train.state_shardings(cfg, tx, trainable, mesh)
    got = compiled.input_shardings[0][0]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w, a in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                       jax.tree.leaves(train.abstract_state(trainable, tx, want))):
        assert g.is_equivalent_to(w, a.ndim), (g, w)
