"""Mixed-domain evaluation documents (flexmoe_jax.data.mixed): held-out text only, seeded, scored as a task."""

import json

import numpy as np
import pytest

from flexmoe_jax.data import mixed


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """FlexMix-mini with two closed domains (humor, literature), small, plus the public sources."""
    from flexmoe_jax import data

    d = tmp_path_factory.mktemp("flexmix_two")
    try:
        data.build(d, domains=["humor", "literature"], max_docs_per_domain=24, vocab_size=512, progress=False)
    except data.SourceMissing as e:
        pytest.skip(f"corpora not installed ({e}); run .ci/install_data_sources.sh")
    return d


def test_documents_splice_whole_lines_of_distinct_domains():
    texts = {"a": ["alpha one\nalpha two\nalpha three", "apple\n\navocado"],
             "b": ["beta one\nbeta two", "banana bread"], "c": ["gamma ray\ngamma burst"]}
    docs = mixed.make_documents(texts, n_docs=30, parts=(2, 3), part_chars=20, seed=1)
    assert len(docs) == 30
    lines = {d: {ln for t in ts for ln in t.split("\n") if ln} for d, ts in texts.items()}
    for i, doc in enumerate(docs):
        names = doc.source.split("+")
        assert len(names) == (2, 3)[i % 2] and len(set(names)) == len(names)
        # every line is a whole line of a held-out document, the parts in the order the source names
        order = []
        for ln in doc.text.split("\n"):
            owner = [d for d in names if ln in lines[d]]
            assert owner, (ln, doc.source)
            if not order or order[-1] != owner[0]:
                order.append(owner[0])
        assert order == names
    again = mixed.make_documents(texts, n_docs=30, parts=(2, 3), part_chars=20, seed=1)
    assert [d.text for d in again] == [d.text for d in docs]
    other = mixed.make_documents(texts, n_docs=30, parts=(2, 3), part_chars=20, seed=2)
    assert [d.text for d in other] != [d.text for d in docs]
    with pytest.raises(ValueError, match="at least 2 domains"):
        mixed.make_documents({"a": texts["a"], "b": ["", "\n"]}, n_docs=3)


def test_a_long_line_is_cut_at_a_word():
    rng = np.random.default_rng(0)
    part = mixed.part_of("word " * 400, 100, rng)
    assert 0 < len(part) <= 100 and not part.endswith(" w")


def test_build_writes_a_test_only_task_from_test_splits(two_domains):
    from flexmoe_jax import data
    from flexmoe_jax.data import layout as L
    from flexmoe_jax.data.tfds_io import read_split_texts

    man = mixed.build(two_domains, n_docs=40, seed=0)
    assert man["kind"] == "evaluation" and man["splits"]["test"]["docs"] == 40
    assert man["splits"]["train"]["docs"] == 0 and set(man["mixtures"]) <= {"humor+literature", "literature+humor"}
    assert mixed.MIXED_TASK in data.register_tasks(two_domains)
    texts = read_split_texts(two_domains, L.OWNER_NAME, mixed.MIXED_TASK, "test")
    assert len(texts) == 40
    held_out = {ln for d in ("humor", "literature")
                for t in read_split_texts(two_domains, L.FLEXMIX_NAME, d, "test") for ln in t.split("\n")}
    trained = {ln for d in ("humor", "literature")
               for t in read_split_texts(two_domains, L.FLEXMIX_NAME, d, "train") for ln in t.split("\n")}
    for t in texts:
        for ln in t.split("\n"):
            assert ln in held_out or any(ln in h for h in held_out), ln  # whole lines (or a cut of one) of test text
    assert any(ln not in trained for t in texts for ln in t.split("\n"))
    # Rebuilding with the same settings is a no-op; another seed replaces the documents.
    stamp = (L.owners_dir(two_domains) / f"{mixed.MIXED_TASK}.json").stat().st_mtime_ns
    assert mixed.build(two_domains, n_docs=40, seed=0) == man
    assert (L.owners_dir(two_domains) / f"{mixed.MIXED_TASK}.json").stat().st_mtime_ns == stamp
    other = mixed.build(two_domains, n_docs=40, seed=1)
    assert other["key"] != man["key"]
    assert read_split_texts(two_domains, L.OWNER_NAME, mixed.MIXED_TASK, "test") != texts
    with pytest.raises(ValueError, match="no built domain"):
        mixed.build(two_domains, domains=["humor", "code"])


def test_mixed_task_is_scored_beside_the_domains_and_kept_out_of_the_average(two_domains):
    from flexmoe_jax import eval as ev, model
    from flexmoe_jax.config import ModelConfig

    mixed.build(two_domains, n_docs=24, seed=0)
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, mlp_hidden=64, max_seq_len=128)
    scorer = ev.ModelScorer(cfg, model.init(cfg, 0), name="m")
    res = ev.evaluate(scorer, str(two_domains), tasks=["humor", "literature", mixed.MIXED_TASK], split="test",
                      seq_len=128, batch_size=8, mc_items_per_domain=0, progress=False)
    assert res[mixed.MIXED_TASK]["docs"] == 24 and res[mixed.MIXED_TASK]["bpb"] > 0
    assert res["average"]["bpb"] == pytest.approx((res["humor"]["bpb"] + res["literature"]["bpb"]) / 2)
    json.dumps({k: {m: v for m, v in r.items() if m not in ev.PER_DOC} for k, r in res.items()})
