"""Training-data extraction check (flexmoe_jax.privacy, `flexmoe privacy`).

The decisive test overfits a tiny model on a few real training documents: the check must find
them extracted while held-out documents and a fresh model's documents stay at 0. Every check here
uses the same batch size and lengths, so generation compiles once per model config.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexmoe_jax import checkpoint, cli, model, privacy
from flexmoe_jax.config import ModelConfig

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
    assert over["train"]["rate"] >= 0.75, over["train"]
    assert over["train"]["mean_best_similarity"] > 0.9
    assert over["test"]["docs"] >= 1
    assert over["test"]["rate"] == 0.0 and over["test"]["mean_best_similarity"] < 0.5, over["test"]
    for split in ("train", "test"):
        assert new[split]["rate"] == 0.0 and new[split]["mean_best_similarity"] < 0.3, new[split]
    table = privacy.markdown(results)
    assert "| overfit | humor |" in table and "train rate" in table and "test rate" in table
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
