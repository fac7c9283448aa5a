"""Routing semantics and the dropless dispatch paths (dense, ragged, blocks, and gmm: TPU kernels, interpreted here).

Every path must compute the same function as a plain einsum reference, forward
and backward (gradients w.r.t. the tokens, the router and every expert weight),
to fp32 tolerance, including awkward shapes: T*K not a multiple of the block
size, a single token, top_k == num_experts, a block size that is not a power
of two times the granule (56 -> 48 = 3 x 16), and an expert that receives no token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexmoe_jax import moe
from flexmoe_jax.moe import grouped
from flexmoe_jax.sharding import make_mesh

IMPLS = ("dense", "ragged", "blocks")
D, H = 16, 24


def _einsum_reference(x, r, w):
    """The textbook mixture: every expert on every token, mixed by the gate matrix."""
    gates = moe.gate_matrix(r, w.gate.shape[0])
    h = jax.nn.silu(jnp.einsum("td,edh->teh", x, w.gate)) * jnp.einsum("td,edh->teh", x, w.up)
    return jnp.einsum("teh,ehd,te->td", h, w.down, gates)


def _problem(e, t, seed=0, bias=None, skew=0.0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(ks[0], (t, D), jnp.float32)
    router = jax.random.normal(ks[1], (e, D), jnp.float32)
    x = x + skew * router[0] / jnp.sum(router[0] ** 2)  # pushes tokens towards expert 0
    w = moe.Experts(jax.random.normal(ks[2], (e, D, H)) * 0.3,
                    jax.random.normal(ks[3], (e, D, H)) * 0.3,
                    jax.random.normal(ks[4], (e, H, D)) * 0.3)
    cot = jax.random.normal(ks[5], (t, D), jnp.float32)
    return x, router, w, cot, None if bias is None else jnp.asarray(bias, jnp.float32)


# LLVM -O0: these programs are tiny and compile time dominates; numerics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _outputs_and_grads(k, norm, bias, block_size):
    """One jitted program: {path: (y, grads w.r.t. (x, router, experts))} for the reference and every path."""
    def run(x, router, w, cot):
        out = {}
        paths = {"reference": _einsum_reference}
        paths.update({impl: (lambda impl: lambda x, r, w: moe.dispatch(x, r, w, impl, block_size))(impl)
                      for impl in IMPLS})
        for name, dispatch in paths.items():
            def loss(x, router, w):
                y = dispatch(x, moe.route(x, router, bias, k, norm), w)
                return jnp.vdot(y, cot), y
            (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, router, w)
            out[name] = (y, grads)
        return out
    return jax.jit(run, compiler_options=FAST_COMPILE)


def _assert_close(got, want, what):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


# (experts, top_k, tokens, block_size, norm_topk_prob, expert bias, skew towards expert 0)
CASES = [
    # expert 0 gets most tokens (several full blocks), expert 1 none, the rest short tails
    pytest.param(8, 2, 64, 16, False, [0.0, -1e4] + [0.0] * 6, 8.0, id="E8k2-skewed-expert-without-tokens"),
    pytest.param(8, 2, 96, 64, False, None, 0.0, id="E8k2-tail-chain"),
    # 56 rounds down to 48 = 3 x 16 rows, which the halving chain cannot cover alone
    pytest.param(7, 5, 37, 56, True, None, 0.0, id="E7k5-T*K-not-divisible-block-not-pow2"),
    pytest.param(4, 4, 5, 128, False, None, 0.0, id="k==E-tiny-T"),
    pytest.param(3, 1, 1, 16, True, None, 0.0, id="single-token"),
]


@pytest.mark.parametrize("e,k,t,block_size,norm,bias,skew", CASES)
@pytest.mark.slow  # over ~3 s on 2 cores
def test_paths_equal_forward_and_gradients(e, k, t, block_size, norm, bias, skew):
    x, router, w, cot, b = _problem(e, t, seed=e * 100 + t, bias=bias, skew=skew)
    out = _outputs_and_grads(k, norm, b, block_size)(x, router, w, cot)
    y_ref, g_ref = out["reference"]
    for impl in IMPLS:
        y, g = out[impl]
        _assert_close(y, y_ref, f"{impl} forward")
        _assert_close(g, g_ref, f"{impl} grad")
    if bias is not None:  # the starved expert (index 1) gets exactly zero weight gradient
        for name in ("gate", "up", "down"):
            assert not np.any(np.asarray(getattr(g[2], name)[1]))


def test_blocks_layout_is_a_padded_permutation():
    e, k, t, granule = 5, 3, 41, 16
    idx = np.argsort(np.random.RandomState(3).randn(t, e), axis=-1)[:, :k].astype(np.int32)
    idx[:, 0] = np.where(idx[:, 0] == 4, 0, idx[:, 0])  # skew the load
    layout = jax.jit(moe.blocks._block_layout, static_argnums=(1, 2))(idx, e, granule)
    slot, source, start, rows = map(np.asarray, layout)
    counts = np.bincount(idx.ravel(), minlength=e)
    np.testing.assert_array_equal(rows, -(-counts // granule) * granule)
    np.testing.assert_array_equal(start, np.cumsum(rows) - rows)
    assert len(set(slot.ravel())) == t * k  # distinct rows
    for a, (tok, kk) in enumerate(np.ndindex(t, k)):
        ex = idx[tok, kk]
        assert start[ex] <= slot[tok, kk] < start[ex] + counts[ex]  # packed at the front of its range
        assert source[slot[tok, kk]] == a
    assert np.sum(source < t * k) == t * k  # every other row is padding
    assert source.shape[0] % granule == 0 and source.shape[0] >= rows.sum()


def test_blocks_layout_skips_experts_held_elsewhere():
    """Index E = "on another device": slot one past the row space, no row, and a row space
    sized for T * min(K, E) local assignments (here 1 local expert of top-2: half of T*K)."""
    t, k, granule = 40, 2, 16
    rng = np.random.RandomState(5)
    idx = np.stack([rng.permutation(4)[:k] for _ in range(t)]).astype(np.int32)  # 4 experts, distinct per token
    local = np.where(idx == 2, 0, 1).astype(np.int32)  # this device holds expert 2 only
    layout = jax.jit(moe.blocks._block_layout, static_argnums=(1, 2))(local, 1, granule)
    slot, source, start, rows = map(np.asarray, layout)
    total = source.shape[0]
    assert total == -(-(t * 1 + 1 * (granule - 1)) // granule) * granule < t * k
    mine = local == 0
    assert np.all(slot[~mine] == total)
    assert sorted(slot[mine].tolist()) == list(range(mine.sum()))
    assert np.sum(source < t * k) == mine.sum()
    np.testing.assert_array_equal(rows, [-(-mine.sum() // granule) * granule])


def test_blocks_sizes_chain():
    assert moe.blocks._block_sizes(128, 16, 10_000) == (128, 64, 32, 16)
    assert moe.blocks._block_sizes(48, 16, 10_000) == (48, 16)
    assert moe.blocks._block_sizes(56, 16, 10_000) == (48, 16)  # rounded down to a granule multiple
    assert moe.blocks._block_sizes(8, 16, 10_000) == (16,)
    assert moe.blocks._block_sizes(512, 16, 64) == (64, 32, 16)  # nothing larger than the row space
    assert moe.blocks._block_sizes(1, 1, 8) == (1,)


def test_route_is_softmax_over_all_experts_then_top_k():
    x, router, _, _, _ = _problem(6, 9)
    r, z = jax.jit(lambda x, router: (lambda r: (r, moe.router_z_loss(r)))(moe.route(x, router, None, 2)))(x, router)
    logits = np.asarray(x, np.float64) @ np.asarray(router, np.float64).T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want_idx = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
    np.testing.assert_array_equal(r.index, want_idx)
    np.testing.assert_allclose(r.weights, np.take_along_axis(probs, want_idx, -1), rtol=1e-5)
    assert r.index.dtype == jnp.int32 and r.weights.dtype == jnp.float32
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(z, lse ** 2, rtol=1e-5)


def test_norm_topk_prob_renormalizes():
    x, router, _, _, _ = _problem(6, 9)
    plain = moe.route(x, router, None, 3)
    normed = moe.route(x, router, None, 3, norm_topk_prob=True)
    np.testing.assert_array_equal(plain.index, normed.index)
    np.testing.assert_allclose(np.sum(normed.weights, -1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(normed.weights, plain.weights / np.sum(plain.weights, -1, keepdims=True), rtol=1e-6)
    assert np.all(np.sum(plain.weights, -1) < 1.0)


def test_expert_bias_is_clamped_to_non_positive():
    x, router, _, _, _ = _problem(4, 12)
    base = moe.route(x, router, None, 2)
    positive = moe.route(x, router, jnp.array([5.0, 0.0, 3.0, 0.0]), 2)
    for a, b in zip(positive, base):  # a positive bias changes nothing
        np.testing.assert_array_equal(a, b)
    negative = moe.route(x, router, jnp.array([0.0, -2.0, 0.0, 0.0]), 2)
    np.testing.assert_allclose(negative.logits, base.logits.at[:, 1].add(-2.0), rtol=1e-6)
    starved = moe.route(x, router, jnp.array([0.0, -1e4, 0.0, 0.0]), 2)
    assert not np.any(np.asarray(starved.index) == 1)


def test_gate_matrix():
    x, router, _, _, _ = _problem(5, 7)
    r = moe.route(x, router, None, 2)
    g = np.asarray(moe.gate_matrix(r, 5))
    assert g.shape == (7, 5)
    np.testing.assert_allclose(g.sum(-1), np.asarray(r.weights).sum(-1), rtol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(g, np.asarray(r.index), -1), r.weights)
    assert np.sum(g > 0, axis=-1).tolist() == [2] * 7


def test_blocks_bfloat16_tracks_dense():
    x, router, w, _, _ = _problem(6, 33)
    xb, wb = x.astype(jnp.bfloat16), jax.tree.map(lambda a: a.astype(jnp.bfloat16), w)
    r = moe.route(xb, router, None, 2)
    y = jax.jit(lambda x, r, w: moe.dispatch_blocks(x, r, w, 32))(xb, r, wb)
    assert y.dtype == jnp.bfloat16
    want = _einsum_reference(x, moe.route(x, router, None, 2), w)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.1, rtol=0.05)


def test_choose_impl_rules():
    assert moe.choose_impl("auto", 2, 2, "cpu") == "dense"  # expert training: 2 of 2
    assert moe.choose_impl("auto", 7, 7, "gpu") == "dense"
    assert moe.choose_impl("auto", 2, 8, "cpu") == "blocks"
    assert moe.choose_impl("auto", 5, 7, "cpu") == "blocks"
    assert moe.choose_impl("auto", 2, 8, "gpu") == "ragged"
    assert moe.choose_impl("auto", 2, 8, "tpu") == "gmm"
    assert moe.choose_impl("auto", 8, 8, "tpu") == "dense"
    assert moe.choose_impl("auto", 2, 8, "tpu", (1024, 3584)) == "gmm"
    assert moe.choose_impl("auto", 2, 8, "tpu", (256, 688)) == "ragged"  # 688: no 128-lane tiling
    for impl in IMPLS + ("gmm",):
        assert moe.choose_impl(impl, 2, 8, "cpu") == impl
        assert moe.choose_impl(impl, 8, 8, "gpu") == impl


def test_unknown_impl_is_a_clear_error():
    x, router, w, _, _ = _problem(4, 3)
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        moe.dispatch(x, moe.route(x, router, None, 2), w, "fast")


def test_dense_scan_form_beyond_the_unroll_limit(monkeypatch):
    monkeypatch.setattr(moe.dispatcher, "_DENSE_UNROLL_MAX", 2)  # 3 experts -> the lax.scan form
    x, router, w, cot, _ = _problem(3, 11)

    def grads(dispatch):
        def loss(x, router, w):
            return jnp.vdot(dispatch(x, moe.route(x, router, None, 2), w), cot)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), compiler_options=FAST_COMPILE)(x, router, w)

    _assert_close(grads(moe.dispatch_dense), grads(_einsum_reference), "dense (scan)")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.slow  # over ~3 s on 2 cores
def test_local_routing_runs_only_the_local_experts(impl):
    """What one expert-parallel device computes: its slice of experts, nothing of the others.

    Summing the outputs of every slice's ``local_routing`` dispatch gives the
    full mixture (forward and gradients), and assignments renumbered to
    "held elsewhere" contribute exactly zero (the blocks layout keeps them in
    a slot of their own, the ragged path after the last group).
    """
    e, k, t, per = 8, 3, 45, 2
    x, router, w, cot, _ = _problem(e, t, seed=11)

    def sliced(x, router, w):
        r = moe.route(x, router, None, k)
        parts = []
        for first in range(0, e, per):
            mine = moe.Experts(*(a[first:first + per] for a in w))
            parts.append(moe.dispatch(x, moe.local_routing(r, jnp.int32(first), per), mine, impl, 16))
        return parts

    def loss(fn, x, router, w):
        out = fn(x, router, w)
        return jnp.vdot(sum(out) if isinstance(out, list) else out, cot)

    full = lambda x, router, w: _einsum_reference(x, moe.route(x, router, None, k), w)  # noqa: E731
    got = jax.jit(jax.value_and_grad(lambda *a: loss(sliced, *a), argnums=(0, 1, 2)))(x, router, w)
    want = jax.jit(jax.value_and_grad(lambda *a: loss(full, *a), argnums=(0, 1, 2)))(x, router, w)
    _assert_close(got, want, f"{impl} sliced")
    # A slice whose experts nobody chose computes zeros.
    r = moe.route(x, router, jnp.array([0.0] * 6 + [-1e4] * 2), k)
    idle = moe.local_routing(r, jnp.int32(6), per)
    assert np.all(np.asarray(idle.index) == per) and not np.any(np.asarray(idle.weights))
    y = moe.dispatch(x, idle, moe.Experts(*(a[6:] for a in w)), impl, 16)
    assert not np.any(np.asarray(y))


# --- gmm: megablox's TPU grouped-matmul kernels, run here in Pallas interpret mode (slow: keep cases tiny).

GMM_TILE = (16, 1024, 1024)  # 16-row tiles: several per group, groups that start and end mid-tile


def _gmm(x, r, w):
    return grouped.dispatch_gmm(x, r, w, interpret=True, max_tile=GMM_TILE)


def _dispatch_and_grads(paths, k, bias, local=None):
    """One jitted program: {name: ((loss, y), grads w.r.t. (x, router, experts))} for each path.

    ``local`` = (first, n): the routing of a device holding experts [first, first + n) only
    (every other assignment "held elsewhere", index n), against those experts' weights.
    """
    def run(x, router, w, cot):
        out = {}
        for name, dispatch in paths.items():
            def loss(x, router, w):
                r = moe.route(x, router, bias, k)
                if local is not None:
                    r = moe.local_routing(r, jnp.int32(local[0]), local[1])
                    w = moe.Experts(*(a[local[0]:local[0] + local[1]] for a in w))
                y = dispatch(x, r, w)
                return jnp.vdot(y, cot), y
            out[name] = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, router, w)
        return out
    return jax.jit(run, compiler_options=FAST_COMPILE)


# (experts, top_k, tokens, expert bias, skew towards expert 0, local (first, n) or None)
GMM_CASES = [
    # 80 rows in 16-row tiles: expert 0 spans several tiles, expert 1 is empty, the rest short
    pytest.param(4, 2, 40, [0.0, -1e4, 0.0, 0.0], 6.0, None, id="uneven-and-empty-groups"),
    # a device holding experts 2..4 of 8: most assignments are "held elsewhere"
    pytest.param(8, 3, 21, None, 0.0, (2, 3), id="held-elsewhere"),
]


@pytest.mark.parametrize("e,k,t,bias,skew,local", GMM_CASES)
@pytest.mark.slow  # over ~3 s on 2 cores (Pallas interpret mode)
def test_gmm_equals_ragged_and_dense_forward_and_gradients(e, k, t, bias, skew, local):
    """gmm (gmm forward, tgmm weight gradients) computes what ragged and dense do: the output and
    the gradients w.r.t. the tokens, the router and the three expert weight tensors."""
    x, router, w, cot, b = _problem(e, t, seed=7 * e + t, bias=bias, skew=skew)
    paths = {"dense": moe.dispatch_dense, "ragged": moe.dispatch_ragged, "gmm": _gmm}
    out = _dispatch_and_grads(paths, k, b, local)(x, router, w, cot)
    (_, y), g = out["gmm"]
    for ref in ("dense", "ragged"):
        (_, y_ref), g_ref = out[ref]
        _assert_close(y, y_ref, f"gmm vs {ref} forward")
        _assert_close(g, g_ref, f"gmm vs {ref} grad")
    if bias is not None:  # the empty group: exactly zero weight gradient
        for name in ("gate", "up", "down"):
            assert not np.any(np.asarray(getattr(g[2], name)[1]))
    if local is not None:  # tokens with no local expert get exactly zero
        idx = np.asarray(moe.local_routing(moe.route(x, router, b, k), jnp.int32(local[0]), local[1]).index)
        away = np.all(idx == local[1], axis=1)
        assert away.any() and not np.any(np.asarray(y)[away])


@pytest.mark.slow  # over ~3 s on 2 cores (Pallas interpret mode)
def test_gmm_sharded_matches_single_device_ragged():
    """Under dispatch_sharded (shard_map, the kernels per device) on a (data 1, fsdp 2, expert 2, tensor 2)
    mesh: forward and gradients equal the single-device ragged path."""
    e, k, t = 8, 2, 24
    x, router, w, cot, _ = _problem(e, t, seed=3, skew=4.0)
    mesh = make_mesh(1, 2, 2, 2, devices=jax.devices()[:8])
    paths = {"ragged": moe.dispatch_ragged,
             "gmm": lambda x, r, w: moe.dispatch_sharded(x, r, w, mesh, "gmm")}
    out = _dispatch_and_grads(paths, k, None)(x, router, w, cot)
    _assert_close(out["gmm"], out["ragged"], "gmm sharded")


def test_gmm_tiling_divides_the_dims():
    """Tiles: rows up to 512 (fewer when there are few rows), the other dims the largest multiple of 128
    up to 1024 that divides them (3584 = 4 x 896), else the whole dim."""
    assert grouped.tiling(32768, 1024, 3584) == (512, 1024, 896)
    assert grouped.tiling(32768, 3584, 1024) == (512, 896, 1024)
    assert grouped.tiling(80, 16, 24) == (80, 16, 24)
    assert grouped.tiling(37, 100, 4096) == (48, 100, 1024)
    assert grouped.row_tile(0) == 16
