"""Training-data extraction check (flexmoe_jax.privacy, `flexmoe privacy`).

The decisive test overfits a tiny model on a few real training documents: the check must find
them extracted while held-out documents and a fresh model's documents stay at 0. Every check here
uses the same batch size and lengths, so generation compiles once per model config.
"""

import collections
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexmoe_jax import checkpoint, cli, data, model, privacy, trained_docs
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.data import packing

PRE, SUF, BATCH = 16, 16, 16
CONFIG = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, mlp_hidden=64, max_seq_len=128)
N_TRAIN = 4


def test_edit_distance_known_values():
    assert privacy.edit_distance(list(b"kitten"), list(b"sitting")) == 3
    assert privacy.edit_distance(list(b"flaw"), list(b"lawn")) == 2
    assert privacy.edit_distance([], [1, 2, 3]) == 3
    assert privacy.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert privacy.edit_distance([1, 2, 3, 4], [2, 3, 4, 5]) == 2  # one deletion, one insertion
    assert privacy.normalized_similarity([1, 2, 3, 4], [1, 2, 3, 5]) == 0.75
    assert privacy.normalized_similarity([], []) == 1.0
    assert privacy.normalized_similarity([1, 2], [3, 4, 5, 6]) == 0.0
    ref = list(range(32))
    assert privacy.normalized_similarity(ref[:29] + [99, 98, 97], ref) == pytest.approx(29 / 32)  # 3 edits: >= 0.9
    assert privacy.normalized_similarity(ref[:28] + [99, 98, 97, 96], ref) < 0.9


def test_edit_distance_matches_plain_dp():
    def plain(a, b):
        d = np.arange(len(b) + 1)
        for i, x in enumerate(a, 1):
            prev, d[0] = d.copy(), i
            for j, y in enumerate(b, 1):
                d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (x != y))
        return int(d[-1])

    rng = np.random.RandomState(0)
    for _ in range(200):
        a, b = rng.randint(0, 4, rng.randint(0, 10)), rng.randint(0, 4, rng.randint(0, 10))
        assert privacy.edit_distance(a, b) == plain(a, b)


@pytest.fixture(scope="module")
def train_docs(small_data_dir):
    """The training documents `run` checks first (same selection), long enough for the check."""
    docs = privacy.load_documents(small_data_dir, "humor", "train", N_TRAIN, PRE + SUF)
    assert len(docs) == N_TRAIN
    return docs


@pytest.fixture(scope="module")
def overfit(train_docs):
    """CONFIG trained with adam on exactly [BOS] + the first PRE + SUF tokens of the training documents."""
    rows = jnp.asarray([[privacy.BOS_ID] + d[:PRE + SUF] for d in train_docs], jnp.int32)
    params = model.init(CONFIG, 0)
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits, _ = model.apply(CONFIG, p, rows[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state = opt.init(params)
    for _ in range(300):
        params, state, value = step(params, state)
    assert float(value) < 0.05, f"the tiny model did not memorize its documents (loss {float(value):.3f})"
    return params


@pytest.fixture(scope="module")
def fresh():
    return model.init(CONFIG, 1)


def test_memorized_documents_are_extracted_held_out_and_fresh_are_not(small_data_dir, overfit, fresh):
    results = privacy.run({"overfit": (CONFIG, overfit), "fresh": (CONFIG, fresh)}, small_data_dir, ["humor"],
                          num_docs=N_TRAIN, prefix_len=PRE, suffix_len=SUF, batch_size=BATCH, progress=False)
    over, new = results["overfit"]["humor"], results["fresh"]["humor"]
    assert over["train"]["docs"] == N_TRAIN and over["train"]["skipped"] == 0
    # Without trained_from the documents are the first ones in storage order, and the result says
    # they are not known to be trained on.
    assert over["train"]["selection"]["trained_on"] is None and over["train"]["selection"]["used"] == N_TRAIN
    assert "not known to be trained on" in over["train"]["selection"]["source"]
    assert over["test"]["selection"]["trained_on"] is False
    assert over["train"]["rate"] >= 0.75, over["train"]
    assert over["train"]["mean_best_similarity"] > 0.9
    assert over["test"]["docs"] >= 1
    assert over["test"]["rate"] == 0.0 and over["test"]["mean_best_similarity"] < 0.5, over["test"]
    for split in ("train", "test"):
        assert new[split]["rate"] == 0.0 and new[split]["mean_best_similarity"] < 0.3, new[split]
    table = privacy.markdown(results)
    assert "| overfit | humor |" in table and "train rate" in table and "test rate" in table
    assert f"| {N_TRAIN} (not known trained on) |" in table and "not known to be trained on" in table
    json.dumps(results)  # JSON-ready


def test_samples_of_a_document_differ_and_the_seed_reproduces_them(train_docs, fresh):
    """Rows of one batch draw their own noise, and a document whose samples straddle two batches
    (samples 0-15 in batch 0, 16-19 in batch 1 at the same row positions) still gets distinct ones."""
    kw = dict(prefix_len=PRE, suffix_len=SUF, samples=20, batch_size=BATCH, keep_samples=True)
    a = privacy.extraction_check(CONFIG, fresh, train_docs[:2], **kw)
    for doc in a["samples"]:
        assert len(doc) == 20 and all(len(s) == SUF for s in doc)
        assert len({tuple(s) for s in doc}) == 20
    assert a["samples"][0] != a["samples"][1]
    assert privacy.extraction_check(CONFIG, fresh, train_docs[:2], **kw)["samples"] == a["samples"]
    assert privacy.extraction_check(CONFIG, fresh, train_docs[:2], seed=1, **kw)["samples"] != a["samples"]


def test_bad_inputs_are_clear_errors(small_data_dir, train_docs, fresh):
    short = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, mlp_hidden=64, max_seq_len=32)
    with pytest.raises(ValueError, match="max_seq_len=32 .*lower prefix_len/suffix_len"):
        privacy.extraction_check(short, model.init(short, 0), train_docs, prefix_len=PRE, suffix_len=SUF)
    with pytest.raises(ValueError, match="no document has prefix_len \\+ suffix_len = 32 tokens"):
        privacy.extraction_check(CONFIG, fresh, [d[:31] for d in train_docs], prefix_len=PRE, suffix_len=SUF)
    with pytest.raises(ValueError, match="threshold"):
        privacy.extraction_check(CONFIG, fresh, train_docs, threshold=1.5)
    with pytest.raises(ValueError, match="unknown task 'nonsense'"):
        privacy.run({"m": (CONFIG, fresh)}, small_data_dir, ["nonsense"], progress=False)
    with pytest.raises(ValueError, match="splits must be"):
        privacy.run({"m": (CONFIG, fresh)}, small_data_dir, ["humor"], splits=["holdout"], progress=False)
    with pytest.raises(ValueError, match="no train document of at least .* 1000 tokens"):
        privacy.run({"m": (CONFIG, fresh)}, small_data_dir, ["humor"], prefix_len=500, suffix_len=500,
                    progress=False)


def test_cli_on_a_saved_checkpoint_writes_json(tmp_path, small_data_dir, fresh, capsys):
    checkpoint.save(tmp_path / "ckpt", CONFIG, fresh)
    out = tmp_path / "privacy.json"
    argv = ["privacy", "--ckpt", str(tmp_path / "ckpt"), "--name", "random", "--data_dir", small_data_dir,
            "--tasks", "humor", "--docs", "2", "--samples", "2", "--prefix_len", str(PRE), "--suffix_len", str(SUF),
            "--batch_size", str(BATCH), "--json", str(out)]
    assert cli.main(argv) == 0
    assert "| random | humor |" in capsys.readouterr().out
    results = json.loads(out.read_text())
    check = results["random"]["humor"]["train"]
    assert check["docs"] == 2 and check["extracted"] == 0 and check["settings"]["samples"] == 2
    assert "test" in results["random"]["humor"]
    assert cli.main(argv[:-2] + ["--tasks", "nonsense"]) == 2
    assert "unknown task 'nonsense'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- documents a run trained on

HUMOR = "flexmix_mini.humor"
RUN_SEQ, RUN_BATCH = 64, 8
RUN = ["ModelConfig.vocab_size=512", "ModelConfig.d_model=32", "ModelConfig.n_heads=2", "ModelConfig.mlp_hidden=64",
       "ModelConfig.n_layers=1", "ModelConfig.max_seq_len=64", f"RunConfig.seq_len={RUN_SEQ}",
       f"RunConfig.batch_size={RUN_BATCH}", "OptimConfig.warmup_steps=1", "RunConfig.log_every=1",
       f'RunConfig.task="{HUMOR}"']


def _train(data_dir, workdir, steps, *extra):
    argv = ["train", "--gin_file", "phase/pretrain.gin", "--workdir", str(workdir)]
    for p in RUN + [f'RunConfig.data_dir="{data_dir}"', f"RunConfig.steps={steps}", *extra]:
        argv += ["--gin_param", p]
    assert cli.main(argv) == 0
    return workdir


@pytest.fixture(scope="module")
def runs(small_data_dir, tmp_path_factory):
    """Tiny runs on humor: 2 steps; 5 steps keeping the checkpoints of steps 2, 4 and 5; and 3 steps
    with public replay on an owner's data directory (hard links to the same datasets, as in the demo)."""
    from flexmoe_jax import demo

    root = tmp_path_factory.mktemp("runs")
    owner = demo.owner_data_dir(small_data_dir, "humor", root / "owner_data")
    return {"short": _train(small_data_dir, root / "short", 2),
            "long": _train(small_data_dir, root / "long", 5, "RunConfig.checkpoint_every=2",
                           "RunConfig.keep_checkpoints=3"),
            "replay": _train(owner, root / "replay", 3, "RunConfig.public_replay=0.3"),
            "owner_data": owner}


def _fed_segments(name, data_dir, steps):
    """Segments of batches 0..steps-1 as the trainer reads them, cut at each position-0 token."""
    it = data.batches(name, "train", RUN_BATCH, RUN_SEQ, data_dir, seed=0)
    out = set()
    for _ in range(steps):
        b = next(it)
        for t, pos, seg in zip(b["decoder_target_tokens"], b["decoder_positions"], b["decoder_segment_ids"]):
            starts = [i for i in range(RUN_SEQ) if pos[i] == 0 and seg[i] > 0]
            for a, e in zip(starts, starts[1:] + [int((seg > 0).sum())]):
                out.add(tuple(int(x) for x in t[a:e]))
    return out


def _humor_docs(data_dir):
    """Every humor train document tokenized with the data directory's plain SentencePiece (no seqio)."""
    sp = data.sentencepiece(data_dir)
    return [list(ids) for ids in sp.encode(trained_docs.split_texts(HUMOR, "train", data_dir))]


def _fed_pieces(ids, fed):
    """Numbers of the pieces of a document (+ EOS, id 1, cut every seq_len tokens) among ``fed``."""
    full = list(ids) + [1]
    return [k for k, a in enumerate(range(0, len(full), RUN_SEQ)) if tuple(full[a:a + RUN_SEQ]) in fed]


def test_document_tokens_are_the_packed_segments(small_data_dir):
    """SentencePiece's ids of every document, + EOS, cut every seq_len tokens, are exactly the
    segments seqio packed into the split's rows (each piece once)."""
    docs = _humor_docs(small_data_dir)
    rows = packing.packed_rows(HUMOR, "train", RUN_SEQ, small_data_dir)
    segments = collections.Counter(
        tuple(int(x) for x in s) for t, g in zip(rows["decoder_target_tokens"], rows["decoder_segment_ids"])
        for s in trained_docs.row_segments(t, g))
    pieces = collections.Counter(tuple(int(x) for x in p) for d in docs for p in trained_docs.pieces(d, RUN_SEQ))
    assert segments == pieces and len(docs) > 10


def test_trained_documents_are_the_ones_the_batches_fed(runs, small_data_dir):
    docs = _humor_docs(small_data_dir)
    for name, steps in (("short", 2), ("long", 5)):
        got = trained_docs.trained_documents(runs[name], small_data_dir)
        assert (got.task, got.run_task, got.split, got.steps, got.seq_len) == (HUMOR, HUMOR, "train", steps, RUN_SEQ)
        fed = _fed_segments(HUMOR, small_data_dir, steps)
        expect = [i for i, d in enumerate(docs) if _fed_pieces(d, fed)]
        assert got.indices == expect  # every document with a piece fed, and no other
        assert got.documents == [docs[i] for i in expect]
        assert got.pieces == [_fed_pieces(docs[i], fed) for i in expect]
        # The fed pieces' tokens are the documents' text the rows carried (EOS dropped).
        for i, k, toks in got.fed_pieces(1):
            assert tuple((docs[i] + [1])[k * RUN_SEQ:(k + 1) * RUN_SEQ]) in fed
            assert toks == docs[i][k * RUN_SEQ:(k + 1) * RUN_SEQ] and len(toks) >= 1
        assert sum(map(len, got.pieces)) >= len(got.fed_pieces(RUN_SEQ))
        assert 0 < len(got) <= got.split_docs == len(docs)
        assert f"{len(got)} of {len(docs)} {HUMOR} train documents trained on" in got.describe()
    # The run's recorded data directory is the default.
    assert trained_docs.trained_documents(runs["short"]).indices == \
        trained_docs.trained_documents(runs["short"], small_data_dir).indices


def test_a_longer_run_trained_on_a_superset(runs, small_data_dir):
    short = trained_docs.trained_documents(runs["short"], small_data_dir)
    long = trained_docs.trained_documents(runs["long"], small_data_dir)
    def fed(t):
        return {(i, k) for i, ks in zip(t.indices, t.pieces) for k in ks}

    assert fed(short) < fed(long) and set(short.indices) <= set(long.indices)
    # Its checkpoint of step 2 read exactly what the 2-step run read (same seed, same data).
    at2 = trained_docs.trained_documents(runs["long"], small_data_dir, step=2)
    assert (at2.steps, at2.checkpoint_step, at2.indices, at2.pieces) == (2, 2, short.indices, short.pieces)
    at4 = trained_docs.trained_documents(runs["long"], small_data_dir, step=4)
    assert fed(short) <= fed(at4) <= fed(long) and at4.steps == 4
    with pytest.raises(ValueError, match="no checkpoint of step 3; it keeps steps \\[2, 4, 5\\]"):
        trained_docs.trained_documents(runs["long"], small_data_dir, step=3)


def test_replay_run_on_an_owner_data_dir(runs, small_data_dir, tmp_path):
    """A public-replay run is rebuilt from its mixture's name; the owner's data directory (the one it
    trained with, the default) and the full one give the same documents."""
    owner = trained_docs.trained_documents(runs["replay"])
    assert owner.data_dir == str(runs["owner_data"])
    assert owner.run_task == f"{HUMOR}+flexmix_mini.public@30" and owner.task == HUMOR and owner.steps == 3
    full = trained_docs.trained_documents(runs["replay"], small_data_dir)
    assert full.indices == owner.indices and full.documents == owner.documents and len(full) > 0
    fed = _fed_segments(owner.run_task, small_data_dir, 3)
    docs = _humor_docs(small_data_dir)
    assert owner.indices == [i for i, d in enumerate(docs) if _fed_pieces(d, fed)]
    # Without the recorded settings (no model/), the share comes from the name.
    bare = tmp_path / "bare"
    shutil.copytree(runs["replay"] / "state", bare / "state")
    assert trained_docs.trained_documents(bare, small_data_dir).indices == owner.indices
    # The public tasks it replayed are domains it read too.
    gcide = trained_docs.trained_documents(runs["replay"], small_data_dir, domain="public_gcide")
    assert gcide.task == "flexmix_mini.public_gcide" and gcide.run_task == owner.run_task


def test_trained_documents_errors(runs, small_data_dir, tmp_path):
    with pytest.raises(ValueError, match="is not a training run directory: it does not exist"):
        trained_docs.trained_documents(tmp_path / "nothing", small_data_dir)
    with pytest.raises(ValueError, match="is not a training run directory: it has no state/"):
        trained_docs.trained_documents(tmp_path, small_data_dir)
    with pytest.raises(ValueError, match="it looks like a saved model; pass the run directory above it"):
        trained_docs.trained_documents(runs["short"] / "model", small_data_dir)
    empty = tmp_path / "empty"
    (empty / "state").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no complete checkpoint"):
        trained_docs.trained_documents(empty, small_data_dir)
    no_data = tmp_path / "no_data"
    shutil.copytree(runs["short"] / "state", no_data / "state")
    shutil.rmtree(no_data / "state" / "2" / "data")
    with pytest.raises(ValueError, match="step 2 has no saved data position"):
        trained_docs.trained_documents(no_data, small_data_dir)
    with pytest.raises(ValueError, match="never read domain 'public_gcide'"):
        trained_docs.trained_documents(runs["short"], small_data_dir, domain="public_gcide")
    # A data directory without the run's task: the owner's, with humor taken out of its manifest.
    no_humor = tmp_path / "no_humor"
    shutil.copytree(runs["owner_data"] / "tokenizer", no_humor / "tokenizer")
    manifest = json.loads((runs["owner_data"] / "manifest.json").read_text())
    manifest["configs"].pop("humor")
    (no_humor / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="the run trained on 'flexmix_mini.humor', which .* does not hold"):
        trained_docs.trained_documents(runs["short"], no_humor)
    with pytest.raises(ValueError, match="does not hold .*'flexmix_mini.humor'"):
        trained_docs.trained_documents(runs["replay"], no_humor)
    data.register_tasks(small_data_dir)  # point the task names back at the shared data directory


def test_privacy_checks_the_documents_the_run_trained_on(runs, small_data_dir, fresh):
    trained = trained_docs.trained_documents(runs["short"], small_data_dir)
    need = PRE + SUF
    fed = trained.fed_pieces(need)
    test_docs = trained_docs.split_documents(HUMOR, "test", small_data_dir)
    kw = dict(num_docs=3, prefix_len=PRE, suffix_len=SUF, samples=2, batch_size=BATCH, progress=False)
    results = privacy.run({"fresh": (CONFIG, fresh)}, small_data_dir, trained_from={"humor": runs["short"]}, **kw)
    assert list(results["fresh"]) == ["humor"]  # the domains default to trained_from's
    train, test = results["fresh"]["humor"]["train"], results["fresh"]["humor"]["test"]
    sel = train["selection"]
    assert sel["trained_on"] is True and sel["available"] == len(fed) >= 3 and sel["unit"] == "piece"
    assert sel["used"] == train["docs"] == 3 and train["skipped"] == 0
    pairs = list(zip(sel["doc_indices"], sel["piece_indices"]))
    assert set(pairs) <= {(i, k) for i, k, _ in fed} and len(set(pairs)) == 3
    assert sel["run"]["run_dir"] == str(runs["short"]) and sel["run"]["steps"] == 2
    assert trained.describe() in sel["source"]
    tsel = test["selection"]
    held_out = trained_docs.split_pieces(test_docs, RUN_SEQ, need)
    assert tsel["trained_on"] is False and tsel["available"] == len(held_out) >= 1
    assert tsel["used"] == test["docs"] == min(3, tsel["available"])
    assert all(len(test_docs[i]) >= (k * RUN_SEQ) + need for i, k in zip(tsel["doc_indices"], tsel["piece_indices"]))
    # The same documents (and samples) again from a TrainedDocuments computed beforehand.
    again = privacy.run({"fresh": (CONFIG, fresh)}, small_data_dir, ["humor"], trained_from={"humor": trained}, **kw)
    assert again["fresh"]["humor"]["train"]["selection"] == sel
    assert again["fresh"]["humor"]["train"]["best_similarities"] == train["best_similarities"]
    table = privacy.markdown(results)
    assert f"| 3 of {len(fed)} trained-on pieces |" in table and f"of {tsel['available']} held-out pieces |" in table
    assert f"- humor train: {sel['source']}" in table
    json.dumps(results)
    with pytest.raises(ValueError, match="seq_len=64 tokens, fewer than prefix_len \\+ suffix_len = 80"):
        privacy.run({"fresh": (CONFIG, fresh)}, small_data_dir, trained_from={"humor": runs["short"]},
                    **{**kw, "prefix_len": 40, "suffix_len": 40})
    with pytest.raises(ValueError, match="not among the domains checked"):
        privacy.run({"fresh": (CONFIG, fresh)}, small_data_dir, ["public"], trained_from={"humor": runs["short"]},
                    **kw)
    with pytest.raises(ValueError, match="is not a training run directory"):
        privacy.run({"fresh": (CONFIG, fresh)}, small_data_dir, trained_from={"humor": runs["short"] / "model"},
                    **kw)
