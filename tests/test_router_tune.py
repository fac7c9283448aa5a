"""Router tuning on proxy data and public-data bias calibration of a merged model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexmoe_jax import checkpoint, model, optim, router_tune
from flexmoe_jax.config import tiny

NAMES = ("public", "code", "math")


@pytest.fixture(scope="module")
def merged():
    cfg = tiny(vocab_size=512, num_experts=3, top_k=2, expert_names=NAMES, init_std=0.2)
    params = jax.device_get(model.init(cfg, 0))
    # Make "code" eager on any text: its router rows are the public rows plus the mean FFN-input
    # direction, so its margin over the public expert is positive on average.
    toks = np.random.RandomState(0).randint(3, cfg.vocab_size, (8, 32)).astype(np.int32)
    h = np.asarray(model.ffn_inputs(cfg, params, jnp.asarray(toks)))  # [L, B, S, d]
    direction = h.mean(axis=(1, 2))
    router = np.array(params["layers"]["moe"]["router"])
    router[:, 1] = router[:, 0] + 3.0 * direction / np.linalg.norm(direction, axis=-1, keepdims=True)
    params["layers"]["moe"]["router"] = router
    return cfg, params


def _batches(cfg, n, seed=1):
    rng = np.random.RandomState(seed)
    for _ in range(n):
        toks = rng.randint(3, cfg.vocab_size, (4, 33)).astype(np.int32)
        w = np.ones((4, 32), np.float32)
        w[:, -4:] = 0  # padding excluded
        yield {"decoder_input_tokens": toks[:, :-1], "decoder_target_tokens": toks[:, 1:], "decoder_loss_weights": w,
               "decoder_segment_ids": np.ones((4, 32), np.int32),
               "decoder_positions": np.broadcast_to(np.arange(32, dtype=np.int32), (4, 32)).copy()}


@pytest.mark.slow  # over ~3 s on 2 cores
def test_calibration_removes_positive_public_margins(merged):
    cfg, params = merged
    before = router_tune.router_margins(cfg, params, _batches(cfg, 3), 3)
    assert before[:, 1].min() > 0.5, before  # "code" outranks public on generic text
    ccfg, cparams, report = router_tune.calibrate_bias(cfg, params, _batches(cfg, 100), num_batches=3)
    assert ccfg.expert_bias and ccfg.names == NAMES
    bias = np.asarray(cparams["layers"]["moe"]["bias"])
    assert bias.shape == (cfg.n_layers, 3) and np.all(bias <= 0) and np.all(bias[:, 0] == 0)
    after = router_tune.router_margins(ccfg, cparams, _batches(cfg, 3), 3)
    assert after.max() <= 0.05 * before.max() + 1e-3, (before, after)
    np.testing.assert_allclose(report["margin_after"], after, atol=1e-3)
    # Only the bias changed; the model still runs.
    flat, cflat = optim.flatten(params), optim.flatten(cparams)
    assert set(cflat) - set(flat) == {"layers/moe/bias"}
    for k, v in flat.items():
        np.testing.assert_array_equal(v, cflat[k])
    assert np.isfinite(np.asarray(model.forward(ccfg, cparams, next(_batches(cfg, 1))["decoder_input_tokens"]))).all()


def test_quantile_calibration_bounds_how_often_experts_outrank_public(merged):
    cfg, params = merged
    q90 = router_tune.router_margins(cfg, params, _batches(cfg, 3), 3, quantile=0.9)
    mean = router_tune.router_margins(cfg, params, _batches(cfg, 3), 3)
    assert np.all(q90[:, 1:] >= mean[:, 1:])
    ccfg, cparams, report = router_tune.calibrate_bias(cfg, params, _batches(cfg, 100), num_batches=3, quantile=0.9)
    assert report["statistic"] == "quantile 0.9"
    after = router_tune.router_margins(ccfg, cparams, _batches(cfg, 3), 3, quantile=0.9)
    assert after[:, 1:].max() <= 0.05 * q90[:, 1:].max() + 1e-3, (q90, after)
    # The mean calibration leaves experts above public on many more public tokens than the 0.9 one.
    _, mparams, _ = router_tune.calibrate_bias(cfg, params, _batches(cfg, 100), num_batches=3)
    cbias, mbias = np.asarray(cparams["layers"]["moe"]["bias"]), np.asarray(mparams["layers"]["moe"]["bias"])
    assert np.all(cbias[:, 1:] <= mbias[:, 1:] + 1e-6)


def test_calibration_needs_public_slot(merged):
    cfg, params = merged
    with pytest.raises(ValueError, match="slot 0"):
        router_tune.calibrate_bias(cfg.replace(expert_names=("a", "b", "c")), params, _batches(cfg, 3), 2)
    dense = tiny(num_experts=0)
    with pytest.raises(ValueError, match="merge experts first"):
        router_tune.calibrate_bias(dense, model.init(dense, 0), _batches(cfg, 3), 2)


@pytest.mark.slow  # over ~3 s on 2 cores
def test_document_gates_match_per_document_forward(merged):
    cfg, params = merged
    rng = np.random.RandomState(3)
    docs = [list(rng.randint(3, cfg.vocab_size, n)) for n in (5, 40, 17, 1, 64)]
    got = router_tune.document_gates(cfg, params, docs, seq_len=32, batch_size=4)
    full = cfg.replace(top_k=cfg.num_experts)
    for d, row in zip(docs, got):
        d = np.asarray(d[:32], np.int32)[None]
        gates = np.asarray(model.apply(full, params, d)[1]["gates"])  # [L, 1, n, E]
        np.testing.assert_allclose(row, gates.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # full softmax


def test_select_proxy_takes_each_experts_best_documents(merged):
    cfg, params = merged
    rng = np.random.RandomState(4)
    texts = ["".join(map(str, rng.randint(0, 10, rng.randint(5, 30)))) for _ in range(40)]

    def tokenize(t):
        return [int(c) * 37 + 3 for c in t]

    chosen, report = router_tune.select_proxy(cfg, params, texts, tokenize, per_expert=5, public=7)
    scores = router_tune.document_gates(cfg, params, [tokenize(t) for t in texts])
    for e, name in enumerate(NAMES[1:], start=1):
        best = {texts[i] for i in np.argsort(-scores[:, e], kind="stable")[:5]}
        assert best <= set(chosen)
        assert report["experts"][name]["mean_gate"] >= report["experts"][name]["pool_mean_gate"]
    assert report["public_docs"] == 7 and len(chosen) == report["total_docs"] == len(set(chosen))
    assert report["pool"] == 40


def test_tune_router_trains_only_router_rows(merged, data_dir, tmp_path):
    from flexmoe_jax import cli

    cfg, params = merged
    cfg = cfg.replace(max_seq_len=64)
    src = tmp_path / "merged"
    checkpoint.save(src, cfg, params)
    out = tmp_path / "tuned"
    args = ["tune-router", "--ckpt", str(src), "--out", str(out), "--data_dir", data_dir, "--top_k", "3",
            "--per_expert", "8", "--public", "8", "--pool", "64"]
    for p in ("RunConfig.steps=3", "RunConfig.batch_size=8", "RunConfig.seq_len=64", "RunConfig.log_every=1",
              "OptimConfig.warmup_steps=1"):
        args += ["--gin_param", p]
    assert cli.main(args) == 0
    tcfg, tparams = checkpoint.load(out / "model")
    assert tcfg.top_k == 3 and tcfg.names == NAMES
    before, after = optim.flatten(params), optim.flatten(tparams)
    changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert changed == {"layers/moe/router"}, changed
    report = json.loads((out / "proxy_report.json").read_text())
    assert set(report["experts"]) == {"code", "math"} and report["total_docs"] >= 8
    log = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)


def test_cli_calibrate(merged, data_dir, tmp_path):
    from flexmoe_jax import cli

    cfg, params = merged
    src = tmp_path / "merged"
    checkpoint.save(src, cfg.replace(max_seq_len=64), params)
    out, rep = tmp_path / "calibrated", tmp_path / "cal.json"
    assert cli.main(["calibrate", "--ckpt", str(src), "--out", str(out), "--data_dir", data_dir, "--batches", "2",
                     "--batch_size", "4", "--seq_len", "64", "--report", str(rep)]) == 0
    ccfg, cparams = checkpoint.load(out)
    assert ccfg.expert_bias and np.all(np.asarray(cparams["layers"]["moe"]["bias"]) <= 0)
    report = json.loads(rep.read_text())
    assert np.max(np.asarray(report["margin_after"])[:, 1:]) <= np.max(np.asarray(report["margin_before"])[:, 1:])
    assert checkpoint.load_metadata(out)["calibration"]["experts"] == list(NAMES)
    assert cli.main(["calibrate", "--ckpt", str(tmp_path / "nope"), "--out", str(out), "--data_dir", data_dir]) == 2
