"""KV-cache decoding and generation with per-expert attribution (model.decode_step, generate, `flexmoe generate`).

Every generation here compiles one program (seconds on CPU), so tests share a few module-level
results and vary only traced arguments (eos id, seed, temperature) where they can.
"""

import functools
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from flexmoe_jax import checkpoint, cli, generate, model, selection
from flexmoe_jax.config import ModelConfig

NAMES = ("public", "code", "math", "news")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10]]
NEW = 8


def _config(**kw):
    base = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=64,
                max_seq_len=32, init_std=0.2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def moe():
    cfg = _config(num_experts=4, top_k=2, expert_names=NAMES)
    return cfg, model.init(cfg, 0)


@pytest.fixture(scope="module")
def dense():
    cfg = _config()
    return cfg, model.init(cfg, 1)


@pytest.fixture(scope="module")
def greedy(moe):
    """The batch of PROMPTS (different lengths) generated greedily with no eos: the reference for later tests."""
    cfg, p = moe
    return generate.generate(cfg, p, PROMPTS, max_new_tokens=NEW, eos_id=None)


@pytest.mark.parametrize("kind", ["dense", "moe_opt_out"])
@pytest.mark.slow  # over ~3 s on 2 cores
def test_cache_prefill_then_steps_equals_full_forward(kind, moe, dense):
    """Prefill 5 tokens, then 7 one-token steps: every logit equals forward on the whole sequence.

    Row 1 is left-padded by 3 (segment 0, positions from 0 at its first real token), as generate does.
    The MoE case routes top-2 of the 3 experts kept by active_experts.
    """
    cfg, p = dense if kind == "dense" else moe
    kw = {} if kind == "dense" else {"active_experts": ["public", "math", "news"]}
    s, pre = 12, 5
    tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, s)).astype(np.int32)
    seg = np.ones((2, s), np.int32)
    seg[1, :3] = 0
    tokens[1, :3] = 0
    pos = np.stack([np.arange(s), np.maximum(np.arange(s) - 3, 0)]).astype(np.int32)
    full = np.asarray(model.forward(cfg, p, tokens, positions=pos, segment_ids=seg, **kw))

    cache = model.init_cache(cfg, 2, s)
    logits, cache = model.decode_step(cfg, p, cache, tokens[:, :pre], positions=pos[:, :pre],
                                      segment_ids=seg[:, :pre], **kw)
    got = [np.asarray(logits)]
    for i in range(pre, s):
        logits, cache = model.decode_step(cfg, p, cache, tokens[:, i:i + 1], positions=pos[:, i:i + 1],
                                          segment_ids=seg[:, i:i + 1], **kw)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    np.testing.assert_allclose(got[0], full[0], atol=1e-5)
    np.testing.assert_allclose(got[1, 3:], full[1, 3:], atol=1e-5)  # padding positions are never read
    assert int(cache["index"]) == s
    with pytest.raises(ValueError, match="do not fit"):
        model.decode_step(cfg, p, cache, tokens[:, :1], **kw)


def test_params_unchanged_by_cache(moe):
    """Decoding with the KV cache neither adds parameters nor changes (donates, aliases, writes) any.

    The tree init makes is the one the cache path reads; after cached generation and explicit
    decode_step calls every leaf is still there, bit-identical, with the same path, shape and dtype.
    """
    cfg, p = moe
    assert model.param_shapes(cfg).keys() == p.keys()
    model.check_params(cfg, p)
    assert set(model.init_cache(cfg, 1, 4)) == {"index", "segment_ids", "layers"}

    def snapshot(tree):
        return {jax.tree_util.keystr(k): np.array(v, copy=True) for k, v in jax.tree_util.tree_leaves_with_path(tree)}

    structure, before = jax.tree_util.tree_structure(p), snapshot(p)
    first = generate.generate(cfg, p, PROMPTS, max_new_tokens=NEW, eos_id=None)
    tokens = np.random.RandomState(1).randint(3, cfg.vocab_size, (2, 6)).astype(np.int32)
    cache = model.init_cache(cfg, 2, 6)
    _, cache = model.decode_step(cfg, p, cache, tokens[:, :5], active_experts=["public", "math", "news"])
    _, cache = model.decode_step(cfg, p, cache, tokens[:, 5:], active_experts=["public", "math", "news"])
    assert int(cache["index"]) == 6

    assert jax.tree_util.tree_structure(p) == structure and p.keys() == model.param_shapes(cfg).keys()
    assert not any(getattr(v, "is_deleted", lambda: False)() for v in jax.tree_util.tree_leaves(p))  # not donated
    after = snapshot(p)
    assert after.keys() == before.keys()
    for k in before:
        assert (after[k].shape, after[k].dtype) == (before[k].shape, before[k].dtype), k
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    model.check_params(cfg, p)
    # The same params still generate the same tokens (nothing the cache wrote leaked into them).
    again = generate.generate(cfg, p, PROMPTS, max_new_tokens=NEW, eos_id=None)
    assert [r["tokens"] for r in again] == [r["tokens"] for r in first]


def test_greedy_equals_naive_per_prompt_loop(moe, greedy):
    """The batched, left-padded, cached generation equals re-running forward on each prompt's prefix alone."""
    cfg, p = moe
    width = max(map(len, PROMPTS)) + NEW
    for prompt, r in zip(PROMPTS, greedy):
        buf = np.zeros((1, width), np.int32)  # right padding: causal, so it never changes earlier logits
        buf[0, :len(prompt)] = prompt
        n = len(prompt)
        for _ in range(NEW):
            buf[0, n] = int(np.argmax(np.asarray(model.forward(cfg, p, buf))[0, n - 1]))
            n += 1
        assert r["tokens"] == buf[0, len(prompt):n].tolist()


@pytest.mark.slow  # over ~3 s on 2 cores
def test_batch_equals_single_prompt_and_no_cache(moe, greedy):
    cfg, p = moe
    alone = generate.generate(cfg, p, [PROMPTS[1]], max_new_tokens=NEW, eos_id=None)[0]
    assert alone["tokens"] == greedy[1]["tokens"]
    for a, b in zip(alone["attribution"]["experts"].values(), greedy[1]["attribution"]["experts"].values()):
        assert a == pytest.approx(b, abs=1e-5)
    slow = generate.generate(cfg, p, PROMPTS, max_new_tokens=NEW, eos_id=None, use_cache=False)
    assert [r["tokens"] for r in slow] == [r["tokens"] for r in greedy]


def test_eos_stops_each_row(moe, greedy):
    cfg, p = moe
    eos = greedy[0]["tokens"][3]
    out = generate.generate(cfg, p, PROMPTS, max_new_tokens=NEW, eos_id=eos)
    for full, r in zip(greedy, out):
        want = full["tokens"][:full["tokens"].index(eos) + 1] if eos in full["tokens"] else full["tokens"]
        assert r["tokens"] == want and r["attribution"]["tokens"] == len(want)
    assert len(out[0]["tokens"]) <= 4


def test_attribution_shares_and_opt_out(moe, greedy):
    cfg, p = moe
    for r in greedy:
        a = r["attribution"]
        assert list(a["experts"]) == list(NAMES) and not a["dense"] and a["excluded"] == []
        assert sum(a["experts"].values()) == pytest.approx(1.0, abs=1e-6)
        assert sum(a["counts"].values()) == NEW * cfg.n_layers * cfg.top_k
    json.dumps(greedy)  # plain JSON

    opted = generate.generate(cfg, p, PROMPTS, max_new_tokens=NEW, eos_id=None,
                              active_experts=["public", "math", "news"])
    c2, p2 = selection.exclude(cfg, p, ["code"])
    physical = generate.generate(c2, p2, PROMPTS, max_new_tokens=NEW, eos_id=None)
    for o, ph in zip(opted, physical):
        a = o["attribution"]
        assert "code" not in a["experts"] and a["excluded"] == ["code"]
        assert sum(a["experts"].values()) == pytest.approx(1.0, abs=1e-6)
        assert o["tokens"] == ph["tokens"]
        assert a["counts"] == ph["attribution"]["counts"]
        for name in a["experts"]:
            assert a["experts"][name] == pytest.approx(ph["attribution"]["experts"][name], abs=1e-5)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(moe, greedy):
    cfg, p = moe

    def run(**kw):
        return [r["tokens"] for r in generate.generate(cfg, p, PROMPTS, max_new_tokens=NEW, eos_id=None, **kw)]

    a = run(temperature=2.0, top_p=0.95, seed=1)
    assert a == run(temperature=2.0, top_p=0.95, seed=1)
    assert a != run(temperature=2.0, top_p=0.95, seed=2)
    assert a != [r["tokens"] for r in greedy]
    assert run(temperature=1.0, top_p=1e-6, seed=3) == [r["tokens"] for r in greedy]


def test_dense_model_attribution(dense):
    cfg, p = dense
    out = generate.generate(cfg, p, PROMPTS[:2], max_new_tokens=3, eos_id=None)
    assert [len(r["tokens"]) for r in out] == [3, 3]
    assert out[0]["attribution"] == {"dense": True, "experts": {}, "counts": {}, "tokens": 3, "layers": 2}


def test_bad_input(moe):
    cfg, p = moe
    gen = generate.generate
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen(cfg, p, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="no prompts"):
        gen(cfg, p, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="generate_text"):
        gen(cfg, p, "hello", max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=32"):
        gen(cfg, p, [[5] * 30], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive"):
        gen(cfg, p, [[5]], max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown expert 'law'"):
        gen(cfg, p, [[5]], max_new_tokens=2, active_experts=["public", "law"])
    with pytest.raises(ValueError, match="outside this model's vocab"):
        gen(cfg, p, [[5, 600]], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        gen(cfg, p, [[5]], max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        gen(cfg, p, [[5]], max_new_tokens=2, top_p=0.0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A data directory holding only a 512-piece tokenizer, trained on this repository's own source text."""
    from flexmoe_jax.data import layout, tokenizer

    d = tmp_path_factory.mktemp("tok")
    root = pathlib.Path(__file__).resolve().parent.parent / "flexmoe_jax"
    texts = [f.read_text() for f in sorted(root.rglob("*.py"))]
    tokenizer.train(texts, layout.tokenizer_path(d), vocab_size=512)
    return str(d)


def test_cli_generate(moe, tokenizer_dir, tmp_path, capsys):
    cfg, p = moe
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save(ckpt, cfg, p)
    out = str(tmp_path / "gen.json")
    argv = ["generate", "--ckpt", ckpt, "--data_dir", tokenizer_dir, "--max_new_tokens", "4",
            "--prompt", "def forward(config", "--prompt", "the model", "--exclude", "code"]
    assert cli.main(argv + ["--json", out]) == 0
    printed = capsys.readouterr().out
    assert "=== [0] def forward(config" in printed and "opted out: code" in printed
    with open(out) as f:
        records = json.load(f)
    assert [r["prompt"] for r in records] == ["def forward(config", "the model"]
    for r in records:
        assert set(r) == {"prompt", "completion", "tokens", "attribution"}
        assert 1 <= len(r["tokens"]) <= 4 and isinstance(r["completion"], str)
        a = r["attribution"]
        assert set(a["experts"]) == {"public", "math", "news"} and a["excluded"] == ["code"]
        assert sum(a["experts"].values()) == pytest.approx(1.0, abs=1e-6)

    # The same numbers as the Python API on the physically excluded model.
    from flexmoe_jax import data

    c2, p2 = selection.exclude(cfg, p, ["code"])
    api = generate.generate_text(c2, p2, ["def forward(config", "the model"], data.sentencepiece(tokenizer_dir),
                                 max_new_tokens=4)
    assert [r["tokens"] for r in api] == [r["tokens"] for r in records]
    capsys.readouterr()

    # Density routing from the command line: the same tokens as the API's on the opted-out model.
    assert cli.main(argv[:-2] + ["--exclude", "code", "--routing", "density", "--json", out]) == 0
    with open(out) as f:
        records = json.load(f)
    api = generate.generate_text(c2, p2, ["def forward(config", "the model"], data.sentencepiece(tokenizer_dir),
                                 max_new_tokens=4, routing="density")
    assert [r["tokens"] for r in api] == [r["tokens"] for r in records]
    for r in records:
        a = r["attribution"]
        assert a["excluded"] == ["code"] and a["counts"]["public"] == len(r["tokens"]) * a["layers"]
    capsys.readouterr()

    # --exclude takes names, as in every command: "1" is not slot 1 here (issue 18: one vocabulary).
    for bad, msg in [(["--exclude", "law"], "unknown expert 'law'"), (["--exclude", "1"], "unknown expert '1'"),
                     (["--max_new_tokens", "40"], "max_seq_len"),
                     (["--include", "public", "--exclude", "code"], "not both")]:
        argv = ["generate", "--ckpt", ckpt, "--data_dir", tokenizer_dir, "--prompt", "hi", "--max_new_tokens", "4",
                *bad]
        assert cli.main(argv + ["--json", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("flexmoe generate: error:") and msg in err, err
        assert not os.path.exists(tmp_path / "bad.json")
    assert cli.main(["generate", "--ckpt", ckpt, "--data_dir", tokenizer_dir, "--prompt", "ok", "--prompt", " "]) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["public_plus", "document_top_k", "document_public_plus", "domain"])
@pytest.mark.slow  # over ~3 s on 2 cores
def test_routing_modes_generate_as_forward_on_each_prefix(moe, mode):
    """Cached, batched, left-padded generation under a routing mode equals re-running the model with
    that mode on each prompt's prefix alone (document averages and domain sums carried in the cache)."""
    import jax.numpy as jnp

    from flexmoe_jax import routing

    cfg, p = moe
    stats = None
    if mode == "domain":
        stats = {}  # bigram models (pair counts), so the running sums need the token before each one
        rng = np.random.default_rng(0)
        for i, n in enumerate(NAMES):
            counts = np.ones(cfg.vocab_size, np.int64)
            counts[i::4] += 50
            pairs, pc = np.unique(rng.integers(0, cfg.vocab_size ** 2, size=3000), return_counts=True)
            stats[n] = routing.Stats(n, counts, {"vocab_size": cfg.vocab_size}, pairs, pc)
    out = generate.generate(cfg, p, PROMPTS, max_new_tokens=NEW, eos_id=None, routing=mode, routing_stats=stats)
    run_cfg, router = routing.resolve(cfg, mode, stats)
    assert router is None or router.order == 2
    assert run_cfg.routing == ("top_k" if mode == "domain" else mode)
    width = max(map(len, PROMPTS)) + NEW  # right padding: every mode is causal, so it changes nothing earlier
    step = jax.jit(lambda x, pos, seg, bias: model.apply(run_cfg, p, x, pos, seg, route_bias=bias)[0])
    for prompt, r in zip(PROMPTS, out):
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(prompt)] = prompt
        pos, seg = jnp.arange(width)[None], jnp.ones((1, width), jnp.int32)
        for n in range(len(prompt), len(prompt) + NEW):
            bias = None if router is None else router.bias(jnp.asarray(buf), pos, seg)
            buf[0, n] = int(jnp.argmax(step(jnp.asarray(buf), pos, seg, bias)[0, n - 1]))
        assert r["tokens"] == buf[0, len(prompt):len(prompt) + NEW].tolist()
        a = r["attribution"]
        if mode.endswith("public_plus") or mode == "domain":  # the public expert serves every token
            assert a["counts"]["public"] == a["tokens"] * a["layers"]


@pytest.mark.slow  # over ~3 s on 2 cores
def test_density_generation_equals_choosing_the_best_sub_model_at_each_token(moe):
    """Density generation (every member decoded at once as route masks on one cache each) equals, on
    each prompt alone, taking the physically sliced sub-models {public}, {public, d}, scoring the
    prompt and the tokens so far under each, and continuing greedily with the most likely one; the
    attribution counts the chosen members' experts (public in every member)."""
    import jax.numpy as jnp

    cfg, p = moe
    pools = [["public"]] + [["public", n] for n in NAMES[1:]]
    subs = [selection.select(cfg, p, include=pool) for pool in pools]
    fwd = [jax.jit(functools.partial(lambda c, sp, x: model.forward(c.replace(routing="top_k"), sp, x), c, sp))
           for c, sp in subs]
    out = generate.generate(cfg, p, PROMPTS, max_new_tokens=NEW, eos_id=None, routing="density")
    width = max(map(len, PROMPTS)) + NEW
    chosen_any = set()
    for prompt, r in zip(PROMPTS, out):
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(prompt)] = prompt
        picks = []
        for n in range(len(prompt), len(prompt) + NEW):
            lps = [np.asarray(jax.nn.log_softmax(f(jnp.asarray(buf))[0], axis=-1)) for f in fwd]  # [S, V] each
            context = [sum(lp[t - 1, buf[0, t]] for t in range(1, n)) for lp in lps]
            best = int(np.argmax(context))
            picks.append(best)
            buf[0, n] = int(np.argmax(lps[best][n - 1]))
        assert r["tokens"] == buf[0, len(prompt):len(prompt) + NEW].tolist()
        a = r["attribution"]
        assert a["counts"]["public"] == NEW * cfg.n_layers
        for k, name in enumerate(NAMES[1:], 1):
            assert a["counts"][name] == cfg.n_layers * picks.count(k), (name, picks)
        chosen_any.update(picks)
    assert len(chosen_any) > 1, "every token went to one member: the test would not see a wrong choice"


def test_density_generation_refuses_what_it_cannot_do(moe, dense):
    cfg, p = moe
    with pytest.raises(ValueError, match="routing stats"):
        generate.generate(cfg, p, PROMPTS[:1], max_new_tokens=2, routing="density", routing_stats={})
    with pytest.raises(ValueError, match="KV cache"):
        generate.generate(cfg, p, PROMPTS[:1], max_new_tokens=2, routing="density", use_cache=False)
    with pytest.raises(ValueError, match="at least one owner"):
        generate.generate(cfg, p, PROMPTS[:1], max_new_tokens=2, routing="density", active_experts=["public"])
    with pytest.raises(ValueError, match="'public' expert"):
        generate.generate(*dense, PROMPTS[:1], max_new_tokens=2, routing="density")
