"""Domain routing: causal per-document decisions, exact owner/public models, opt-out, stats files."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexmoe_jax import eval as eval_lib, model, routing, selection
from flexmoe_jax.config import tiny
from flexmoe_jax.evaluation.expert_use import counts_routing

NAMES = ("public", "a", "b")


def _brute_force(table, inputs, positions):
    """Each token's argmax over experts of its segment's summed log-probs so far, by loops."""
    out = np.zeros(inputs.shape, np.int32)
    for r in range(inputs.shape[0]):
        for t in range(inputs.shape[1]):
            start = t - positions[r, t]
            ids = [int(x) for x in inputs[r, start:t + 1] if x > 0]
            out[r, t] = int(np.argmax(table[:, ids].sum(axis=1))) if ids else 0
    return out


def test_decision_is_causal_and_restarts_with_each_segment():
    rng = np.random.default_rng(0)
    table = np.log(rng.dirichlet(np.ones(16), size=3)).astype(np.float32)
    inputs = rng.integers(1, 16, size=(3, 24)).astype(np.int32)
    positions = np.concatenate([np.arange(10), np.arange(14)])[None].repeat(3, 0).astype(np.int32)
    positions[2] = np.arange(24)
    inputs[:, 10] = 0  # a BOS in front of the second segment counts for nothing
    segs = np.where(np.arange(24) < 10, 1, 2)[None].repeat(3, 0).astype(np.int32)
    got = np.asarray(routing.domain_of(routing.Tables(jnp.asarray(table)), inputs, positions, segs))
    np.testing.assert_array_equal(got, _brute_force(table, inputs, positions))
    changed = inputs.copy()
    changed[:, 17:] = rng.integers(1, 16, size=(3, 7))
    again = np.asarray(routing.domain_of(routing.Tables(jnp.asarray(table)), changed, positions, segs))
    np.testing.assert_array_equal(again[:, :17], got[:, :17])  # no token sees the future


def test_bigram_decisions_match_a_direct_computation():
    """With pair counts, each token's log-likelihood is (c(prev, cur) + MU p(cur)) / (c(prev) + MU) after a
    previous token of its segment (unigram at the segment's first token); the argmax is causal."""
    rng = np.random.default_rng(1)
    V, names = 16, ("public", "a", "b")
    stats = {}
    for n in names:
        toks = rng.integers(1, V, size=400)
        ids = toks[:-1].astype(np.int64) * V + toks[1:]
        pairs, pc = np.unique(ids, return_counts=True)
        stats[n] = routing.Stats(n, np.bincount(toks, minlength=V).astype(np.int64), {"vocab_size": V}, pairs, pc)
    router = routing.DomainRouter.build(stats, names, V)
    assert router.order == 2
    inputs = rng.integers(1, V, size=(2, 20)).astype(np.int32)
    positions = np.concatenate([np.arange(8), np.arange(12)])[None].repeat(2, 0).astype(np.int32)
    segs = np.where(np.arange(20) < 8, 1, 2)[None].repeat(2, 0).astype(np.int32)
    got = np.asarray(routing.domain_of(router.table, inputs, positions, segs))
    uni = routing.log_probs(stats, names, V)
    for r in range(2):
        cum = np.zeros(3)
        for t in range(20):
            prev = inputs[r, t - 1] if positions[r, t] > 0 else 0
            cur = inputs[r, t]
            ll = []
            for e, n in enumerate(names):
                if prev:
                    c = dict(zip(stats[n].pairs.tolist(), stats[n].pair_counts.tolist())).get(int(prev) * V + int(cur),
                                                                                              0)
                    ll.append(np.log((c + routing.MU * np.exp(uni[e, cur])) / (stats[n].counts[prev] + routing.MU)))
                else:
                    ll.append(uni[e, cur])
            cum = (cum if positions[r, t] > 0 else 0) + np.array(ll)
            assert got[r, t] == int(np.argmax(cum)), (r, t)


@pytest.fixture(scope="module")
def merged():
    config = tiny(num_experts=3, top_k=2, expert_names=NAMES, expert_bias=True, n_layers=2)
    params = model.init(config, 0)
    # Distinct, nonzero biases: the owner's 2-expert model mixes by router rows and biases.
    params["layers"]["moe"]["bias"] = -jnp.abs(jax.random.normal(jax.random.PRNGKey(1), (2, 3))) * 0.3
    return config, params


def _stats(vocab, favour):
    """Stats where expert ``favour[v]`` is the likeliest for token v."""
    counts = {n: np.ones(vocab, np.int64) for n in NAMES}
    for v, n in favour.items():
        counts[n][v] += 1000
    return {n: routing.Stats(n, c, {"task": "test"}) for n, c in counts.items()}


def _logits(config, params, tokens, stats=None):
    scorer = eval_lib.ModelScorer(config, params, routing_stats=stats)
    segs, pos = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    bias = None if scorer.router is None else scorer.router.bias(tokens, pos, segs)
    return model.apply(scorer.config, scorer.params, tokens, pos, segs, route_bias=bias)[0]


@pytest.mark.slow  # over ~3 s on 2 cores
def test_domain_tokens_compute_the_owner_model_and_public_tokens_the_public_model(merged):
    config, params = merged
    v = config.vocab_size
    stats = _stats(v, {**{t: "a" for t in range(2, 40)}, **{t: "public" for t in range(40, 80)}})
    a_text = jnp.asarray(np.random.default_rng(1).integers(2, 40, size=(2, 12)), jnp.int32)
    pub_text = jnp.asarray(np.random.default_rng(2).integers(40, 80, size=(2, 12)), jnp.int32)
    owner = model.select_experts(config, params, ["public", "a"])  # owner a's 2-expert model
    public = model.select_experts(config, params, ["public"])  # the public FFN alone
    np.testing.assert_allclose(_logits(config, params, a_text, stats), _logits(*owner, a_text), atol=2e-5)
    np.testing.assert_allclose(_logits(config, params, pub_text, stats), _logits(*public, pub_text), atol=2e-5)
    # ... and differs from top-k routing, which mixes in b.
    assert not np.allclose(_logits(config, params, a_text, stats), _logits(config, params, a_text), atol=1e-3)


def test_opt_out_is_the_merge_without_the_expert_in_domain_mode(merged):
    config, params = merged
    stats = _stats(config.vocab_size, {t: ("a" if t % 2 else "b") for t in range(2, 60)})
    text = jnp.asarray(np.random.default_rng(3).integers(2, 60, size=(2, 16)), jnp.int32)
    out = selection.exclude(config, params, ["b"])
    without_b = (config.replace(num_experts=2, top_k=2, expert_names=("public", "a")),
                 jax.tree.map(lambda x: x[:, :2], params["layers"]["moe"]))
    without_b = (without_b[0], {**params, "layers": {**params["layers"], "moe": without_b[1]}})
    np.testing.assert_array_equal(_logits(*out, text, stats), _logits(*without_b, text, stats))


def test_stats_file_round_trip_and_clear_errors(tmp_path, merged):
    config, _ = merged
    s = routing.Stats("a", np.arange(5, dtype=np.int64), {"task": "t"})
    back = routing.Stats.load(s.save(tmp_path / "a.npz"))
    assert back.name == "a" and back.source == {"task": "t"} and np.array_equal(back.counts, s.counts)
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ValueError, match="missing \\['b'\\].*flexmoe routing-stats"):
        routing.DomainRouter.build({"public": s, "a": s}, NAMES, 8)
    with pytest.raises(ValueError, match="public"):
        routing.DomainRouter.build({"a": s, "b": s}, ("a", "b"), 8)
    with pytest.raises(ValueError, match="vocabular"):
        routing.DomainRouter.build({n: s for n in NAMES}, NAMES, 4)
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="routing-stats"):
        routing.Stats.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="two routing-stats files"):
        routing.load_stats([tmp_path / "a.npz", tmp_path / "a.npz"])


@pytest.mark.slow
def test_routing_stats_and_domain_eval_from_the_command_line(small_data_dir, tmp_path):
    """An owner releases its stats privately by default (exact only on request, with a warning), the
    builder the public data's; eval routes by them."""
    from flexmoe_jax import checkpoint, data

    cli = [sys.executable, "-m", "flexmoe_jax.cli"]
    files = []
    for task, name in (("flexmix_mini.humor", "humor"), ("flexmix_mini.public", "public")):
        out = tmp_path / f"{name}.npz"
        r = subprocess.run(cli + ["routing-stats", "--data_dir", small_data_dir, "--task", task, "--out", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"routing stats of {name} " in r.stdout and "(1, 1e-06)-DP per document" in r.stdout and out.exists()
        files.append(str(out))
    released = routing.Stats.load(files[0])
    assert not released.exact and released.pairs is None and released.sketch.size == 1 << 18
    assert released.release["epsilon"] == 1.0 and released.release["unit"] == "document"
    assert released.source == {"task": "flexmix_mini.humor", "split": "train", "vocab_size": released.counts.size}
    r = subprocess.run(cli + ["routing-stats", "--data_dir", small_data_dir, "--task", "flexmix_mini.humor",
                              "--exact_routing_stats", "--out", str(tmp_path / "exact.npz")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "WARNING" in r.stderr and "EXACT counts" in r.stderr
    counted = routing.Stats.load(tmp_path / "exact.npz")
    assert counted.exact and counted.tokens == counted.source["tokens"] > 0 and counted.source["split"] == "train"
    vocab = data.vocabulary(small_data_dir).vocab_size
    config = tiny(vocab_size=vocab, num_experts=2, top_k=2, expert_names=("public", "humor"), n_layers=2)
    ckpt = tmp_path / "m"
    checkpoint.save(ckpt, config, model.init(config, 0))
    args = ["eval", "--ckpt", str(ckpt), "--data_dir", small_data_dir, "--tasks", "humor", "--mc_items", "0",
            "--max_tokens", "400"]
    r = subprocess.run(cli + args + ["--routing", "domain"], capture_output=True, text=True)
    assert r.returncode == 2 and "--routing_stats" in r.stderr
    r = subprocess.run(cli + args + ["--routing", "domain", "--routing_stats", *files, "--json",
                                     str(tmp_path / "r.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_density_routing_picks_the_model_that_best_explains_the_segment_so_far(merged):
    """Each token's log-prob is that of the member ({public} or {public, d}, sliced from the merged
    model) with the highest log-likelihood of the segment's earlier tokens; opting out drops a member."""
    config, params = merged
    rng = np.random.default_rng(4)
    S = 12
    batch = {"decoder_input_tokens": rng.integers(2, config.vocab_size, size=(2, S)).astype(np.int32)}
    batch["decoder_target_tokens"] = np.roll(batch["decoder_input_tokens"], -1, axis=1)
    batch["decoder_positions"] = np.broadcast_to(np.arange(S), (2, S)).astype(np.int32)
    batch["decoder_segment_ids"] = np.ones((2, S), np.int32)
    scorer = eval_lib.density_scorer(config, params)
    got = np.asarray(scorer.logprobs(batch))
    members = [np.asarray(eval_lib.ModelScorer(*selection.select(config, params, include=p)).logprobs(batch))
               for p in (["public"], ["public", "a"], ["public", "b"])]
    lp = np.stack(members)  # [M, B, S]
    prefix = np.cumsum(lp, axis=2) - lp  # log-likelihood of the tokens before each one
    for r in range(2):
        for t in range(1, S):
            np.testing.assert_allclose(got[r, t], lp[np.argmax(prefix[:, r, t]), r, t], rtol=1e-5, atol=1e-5)
    # Its routing statistics: each token reaches the experts of the member it went to (every member's at
    # a segment's first token, where all tie), the same log-probs from the same pass.
    lp2, sel = scorer.logprobs_and_selection(batch)
    np.testing.assert_array_equal(np.asarray(lp2), got)
    sel = np.asarray(sel)
    assert sel.shape == (1, 2, S, 3) and sel[0, :, :, 0].all()  # public always
    assert sel[0, :, 0].all()  # the first token: every member
    best = np.argmax(prefix[:, :, 1:], axis=0)  # [B, S-1]: 0 public, 1 {public, a}, 2 {public, b}
    np.testing.assert_array_equal(sel[0, :, 1:, 1], best == 1)
    np.testing.assert_array_equal(sel[0, :, 1:, 2], best == 2)
    assert counts_routing(scorer)
    only_a = eval_lib.density_scorer(*selection.exclude(config, params, ["b"]))
    assert len(only_a.members) == 2
    with pytest.raises(ValueError, match="density routing needs"):
        eval_lib.density_scorer(*selection.select(config, params, include=["a"]))
