"""FlexMix-mini: small slices of every domain through tfds + seqio; splits, dedup, decontamination,
tokenizer, packing, exact resume, owners' data, CLI errors.

One small build (24 documents per config, 512-piece tokenizer) is shared by the module. The
corpora come from Debian packages (.ci/install_data_sources.sh); if one is missing the tests that
need the build are skipped with the package named.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

import flexmoe_jax.data as D
from flexmoe_jax.data import corpora, layout, sources, splits

MAX_DOCS = 24
VOCAB = 512


def _missing_sources():
    missing = []
    for c in sources.CONFIGS:
        try:
            sources.SOURCES[c].locate()
        except sources.SourceMissing:
            missing.extend(sources.SOURCES[c].packages)
    return missing


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    missing = _missing_sources()
    if missing:
        pytest.skip(f"corpora not installed: apt-get install -y {' '.join(missing)} (.ci/install_data_sources.sh)")
    d = tmp_path_factory.mktemp("flexmix")
    logs = []
    t = time.time()
    card = D.build(d, max_docs_per_domain=MAX_DOCS, vocab_size=VOCAB, progress=False, log=logs.append)
    return {"dir": d, "card": card, "logs": logs, "seconds": time.time() - t}


# ------------------------------------------------------------------------------------ pure units
def test_import_is_light():
    code = ("import sys, flexmoe_jax, flexmoe_jax.data, flexmoe_jax.cli.data; "
            "print(any(m.split('.')[0] in ('tensorflow', 'seqio', 'tensorflow_datasets') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_normalize_dedup_and_stable_splits():
    docs = [sources.Doc(f"document number {i}\n" + "x" * (i % 7), str(i), "t") for i in range(400)]
    dup = [sources.Doc("\n\ndocument number 3\nxxx   \r\n\n", "dup", "t"), sources.Doc("  \n ", "empty", "t")]
    sel = splits.select(docs + dup)
    assert sel.stats["duplicates"] == 1 and sel.stats["empty"] == 1 and sel.stats["candidates"] == 402
    hashes = {s: [h for h, _ in sel.splits[s]] for s in splits.SPLITS}
    assert sum(map(len, hashes.values())) == 400
    assert len(set().union(*map(set, hashes.values()))) == 400  # no document in two splits
    for s, hs in hashes.items():
        assert all(splits.split_of(h) == s for h in hs)
    assert 300 < len(hashes["train"]) < 400 and hashes["validation"] and hashes["test"]
    # caps: every split gets its share (at least one), and raising a cap only adds documents
    small, bigger = splits.select(docs, max_docs=10), splits.select(docs, max_docs=40)
    assert [len(small.splits[s]) for s in splits.SPLITS] == [8, 1, 1]
    for s in splits.SPLITS:
        assert set(small.splits[s]) <= set(bigger.splits[s])
    by_bytes = splits.select(docs, max_bytes=2000)
    assert sum(len(d.text) for _, d in by_bytes.splits["train"]) >= 0.9 * 2000 * 0.9
    # owners: every document keeps its hash split, but validation/test are never empty with 3+ docs
    few = splits.dedup([sources.Doc(t, t, "t") for t in ("a", "b", "c")])
    assigned = splits.assign_splits(few)
    assert all(assigned[s] for s in splits.SPLITS)


def test_test_split_quota_keeps_train_and_validation():
    """A larger test quota (DEFAULT_TEST_BYTES) adds test documents and leaves train/validation as
    they were; None keeps every document the hash puts in test; generated corpora need bytes."""
    docs = [sources.Doc(f"doc {i}\n" + "y" * (50 + i % 13), str(i), "t") for i in range(600)]
    share = splits.select(docs, max_bytes=6000)
    every = splits.select(docs, max_bytes=6000, test_bytes=None)
    some = splits.select(docs, max_bytes=6000, test_bytes=1500)
    for s in ("train", "validation"):
        assert every.splits[s] == share.splits[s] == some.splits[s]
    in_test = [h for h in splits.dedup(docs) if splits.split_of(h) == "test"]
    assert len(every.splits["test"]) == len(in_test) > len(some.splits["test"]) > len(share.splits["test"])
    assert 1500 <= sum(len(d.text) for _, d in some.splits["test"]) < 1500 + 70
    with pytest.raises(ValueError, match="test_bytes"):
        splits.select_generated(lambda s, n, b: iter(()), None, 6000, test_bytes=None)
    # A train cap (owners with little data) shrinks train to a prefix of itself and nothing else.
    capped = splits.select(docs, max_bytes=6000, test_bytes=None, train_bytes=1200)
    assert capped.splits["train"] == every.splits["train"][:len(capped.splits["train"])]
    assert 1200 <= sum(len(d.text) for _, d in capped.splits["train"]) < 1200 + 70
    assert capped.splits["validation"] == every.splits["validation"] and capped.splits["test"] == every.splits["test"]
    asked = {}

    def gen(split, n, b):
        asked[split] = b
        return (sources.Doc(f"{split} {i} " + "z" * 40, f"{split}{i}", "t") for i in range(3))

    splits.select_generated(gen, None, 6000, test_bytes=1000, train_bytes=500)
    assert asked == {"train": 500, "validation": splits._quotas(6000, 1)["validation"], "test": 1000}


def test_generated_code_files_are_not_code():
    gen = corpora._GENERATED
    assert gen.search("# This file is generated by mkstringprep.py. DO NOT EDIT.\n")
    assert gen.search('"""Token constants."""\n# Auto-generated by Tools/scripts/generate_token.py')
    assert gen.search('"""Keywords\n\nThis file is automatically generated; please don\'t muck it up!')
    assert not gen.search('"""Parser engine for the grammar tables generated by pgen.')
    assert not gen.search("def generate(x):\n    return x  # the generated value")


def test_ngram_decontamination_unit():
    closed = "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat today"
    idx = splits.NgramIndex.from_texts([closed])
    assert idx.contains("Intro. The QUICK brown fox jumps over the lazy dog, while the cat sleeps on a mat")
    assert not idx.contains("the quick brown fox jumps over the lazy dog while the cat")  # 12 words
    assert not idx.contains("completely unrelated public text about dictionaries and words and more words here")


def test_missing_source_names_package(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "_FORTUNE_DIR", tmp_path / "nowhere")
    with pytest.raises(sources.SourceMissing, match="fortunes"):
        sources.ensure_available(["humor"])
    with pytest.raises(sources.SourceMissing, match=r"apt-get install -y fortunes fortunes-min"):
        D.build(tmp_path / "d", domains=["humor"], max_docs_per_domain=6, progress=False, log=lambda m: None)
    assert not (tmp_path / "d").exists()  # nothing half-written
    with pytest.raises(ValueError, match="unknown FlexMix-mini domain 'poetry'"):
        D.build(tmp_path / "d", domains=["poetry"], progress=False)


@pytest.mark.slow  # over ~3 s on 2 cores
def test_math_generator_is_real_and_deterministic():
    from flexmoe_jax.data import mathgen

    with mathgen.Generator(seed=3, workers=1) as g:
        one = [d.text for d in g.docs("test", max_docs=6)]
    with mathgen.Generator(seed=3, workers=2) as g:
        two = [d.text for d in g.docs("test", max_docs=6)]
        again = [d.text for d in g.docs("test", max_docs=6)]
    assert one == two == again
    assert all(t.count("Question: ") == mathgen.PROBLEMS_PER_DOC and "\nAnswer: " in t for t in one)
    target = mathgen.ensure_installed()
    assert (target / "mathematics_dataset" / "modules" / "algebra.py").exists()
    assert json.loads((target / ".complete").read_text())["sympy"] == "1.5.1"


# ------------------------------------------------------------------------------- the small build
def test_build_every_domain_card_and_cache(small):
    card = small["card"]
    assert set(card["configs"]) == set(D.CONFIGS)
    for c, e in card["configs"].items():
        for s in D.SPLITS:
            row = e["splits"][s]
            assert row["docs"] >= 1 and row["bytes"] > 0 and row["tokens"] > row["docs"], (c, s, row)
        assert sum(e["splits"][s]["docs"] for s in D.SPLITS) == MAX_DOCS
        assert e["license"] and e["description"]
    assert card["tokenizer"]["vocab_size"] == VOCAB
    md = (small["dir"] / "card.md").read_text()
    assert "| code | closed | train |" in md and "public_wordnet" in md
    # second build with the same arguments: nothing to do, nothing rewritten
    info = layout.dataset_dir(small["dir"], layout.FLEXMIX_NAME, "code") / "dataset_info.json"
    mtime = info.stat().st_mtime_ns
    logs = []
    t = time.time()
    D.build(small["dir"], max_docs_per_domain=MAX_DOCS, vocab_size=VOCAB, progress=False, log=logs.append)
    assert time.time() - t < 10 and "nothing to do" in logs[-1]
    assert info.stat().st_mtime_ns == mtime


def test_splits_disjoint_deduped_and_public_decontaminated(small):
    from flexmoe_jax.data import pipeline

    index = pipeline.decontamination_index()
    for c in D.CONFIGS:
        seen = {}
        for s in D.SPLITS:
            for text in pipeline.read_split_texts(small["dir"], layout.FLEXMIX_NAME, c, s):
                h = splits.doc_hash(text)
                assert h not in seen, f"{c}: a document is twice in {seen.get(h)} and {s}"
                seen[h] = s
                assert text == splits.normalize(text)
                if c != "math":  # math splits are generated per split
                    assert splits.split_of(h) == s
                if c in D.PUBLIC_SOURCES:
                    assert not index.contains(text)
    # the index catches real overlaps: GCIDE quotes the KJV and FOLDOC quotes fortunes
    hits = sum(index.contains(d.text) for _, d in zip(range(3000), sources.documents("public_gcide")))
    assert hits > 0


def test_tokenizer_public_only_roundtrip_and_seqio(small, tmp_path):
    import tensorflow as tf

    from flexmoe_jax.data import tokenizer as T
    texts = [d.text for _, d in zip(range(2000), sources.documents("public_wordnet"))]
    a = T.train(texts, tmp_path / "a" / "spm.model", 400).read_bytes()
    assert a == T.train(texts, tmp_path / "b" / "spm.model", 400).read_bytes()  # reproducible bytes
    with pytest.raises(ValueError, match="vocab_size=280"):
        T.train(texts, tmp_path / "c" / "spm.model", 280)

    man = json.loads((small["dir"] / "manifest.json").read_text())
    assert man["tokenizer"]["trained_on"] == [f"flexmix_mini/{c}:train" for c in D.PUBLIC_SOURCES]
    sp = D.sentencepiece(small["dir"])
    vocab = D.vocabulary(small["dir"])
    assert vocab.vocab_size == sp.get_piece_size() == VOCAB
    assert (sp.pad_id(), vocab.eos_id, sp.unk_id()) == (0, 1, 2)
    from flexmoe_jax.data import pipeline
    samples = [t for c in ("code", "math", "humor", "techdocs")
               for t in pipeline.read_split_texts(small["dir"], layout.FLEXMIX_NAME, c, "validation")[:1]]
    samples.append("def f(x):\n\tif x:\n        return 'ünïcødé ✓ 3.14'\n")
    for text in samples:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert list(vocab.encode_tf(tf.constant(text)).numpy()) == ids


def _segments_ok(b):
    tgt, inp, lw = b["decoder_target_tokens"], b["decoder_input_tokens"], b["decoder_loss_weights"]
    seg, pos = b["decoder_segment_ids"], b["decoder_positions"]
    assert np.array_equal(lw, (tgt != 0).astype(np.int32))
    assert np.array_equal(seg > 0, tgt != 0)
    start = pos == 0
    assert np.all(inp[start] == 0)
    cont = ~start & (seg > 0)
    prev_tgt = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
    assert np.array_equal(inp[cont], prev_tgt[cont])
    prev_pos = np.concatenate([np.zeros_like(pos[:, :1]), pos[:, :-1]], axis=1)
    assert np.all(pos[cont] == prev_pos[cont] + 1)


@pytest.mark.slow
def test_tasks_packing_and_every_token_once(small):
    names = D.register_tasks(small["dir"])
    assert set(names) == {f"flexmix_mini.{c}" for c in D.CONFIGS} | {D.PUBLIC_MIXTURE, D.ALL_MIXTURE}
    import seqio
    assert {t.name for t in seqio.get_mixture_or_task(D.PUBLIC_MIXTURE).tasks} == \
        {f"flexmix_mini.{c}" for c in D.PUBLIC_SOURCES}
    L = 64  # (train splits at this length are reused by the batch tests below)
    for c in D.CONFIGS:
        name = f"flexmix_mini.{c}"
        for s in (D.SPLITS if c == "code" else ("train", "validation")):
            rows = list(D.eval_batches(name, s, 16, L, small["dir"]))
            for b in rows:
                assert all(b[f].shape == (16, L) and b[f].dtype == np.int32 for f in D.FEATURES)
                _segments_ok(b)
            stats = D.split_stats(name, s, small["dir"])
            # chunking + packing keeps every token (incl. one EOS per document) exactly once
            assert sum(int(b["decoder_loss_weights"].sum()) for b in rows) == stats["tokens"]
            assert sum(int((b["decoder_target_tokens"] == 1).sum()) for b in rows) >= stats["docs"]
    bpt = D.bytes_per_token("flexmix_mini.code", "validation", small["dir"])
    st = D.split_stats("flexmix_mini.code", "validation", small["dir"])
    assert abs(bpt - st["bytes"] / st["tokens"]) < 1e-9
    assert abs(D.bits_per_byte(st["tokens"] * np.log(2) * bpt, st["bytes"]) - 1.0) < 1e-9


def test_batches_resume_exactly(small):
    args = ("flexmix_mini.all", "train", 8, 64, small["dir"])
    it = D.batches(*args, seed=5)
    run = [next(it) for _ in range(40)]
    for b in run[:3]:
        _segments_ok(b)
    state = {**it.state()}
    assert state["step"] == 40
    json.dumps(state)
    for n in (0, 1, 25, 39):
        b = next(D.batches(*args, seed=5, start_step=n))
        assert all(np.array_equal(b[f], run[n][f]) for f in D.FEATURES), n
    it2 = D.batches(*args, seed=5)
    for _ in range(17):
        next(it2)
    again = next(D.batches_from_state(it2.state(), small["dir"]))
    assert all(np.array_equal(again[f], run[17][f]) for f in D.FEATURES)
    # past the block boundary (1024 steps) and several epochs of a small task
    far = D.batches(*args, seed=5)
    far_run = [next(far) for _ in range(1030)]
    for n in (1023, 1024, 1029):
        b = D.batches(*args, seed=5, start_step=n).batch_at(n)
        assert all(np.array_equal(b[f], far_run[n][f]) for f in D.FEATURES)
    other = next(D.batches(*args, seed=6))
    assert not np.array_equal(other["decoder_target_tokens"], run[0]["decoder_target_tokens"])
    # host sharding: the shards of a step are the rows of the global batch
    shards = [D.batches(*args, seed=5, shard_index=i, num_shards=4).batch_at(7) for i in range(4)]
    for f in D.FEATURES:
        assert np.array_equal(np.concatenate([s[f] for s in shards]), run[7][f])


def test_mixture_samples_by_rate(small):
    from flexmoe_jax.data import batching

    it = batching.Batches("flexmix_mini.all", "train", 32, 64, small["dir"], seed=0)
    draws = np.concatenate([it._draws(0), it._draws(1)]).ravel()
    freq = np.bincount(draws, minlength=len(it.tasks)) / draws.size
    assert np.allclose(freq, it.rates, atol=0.01)
    # an epoch of a single task visits every row once before repeating
    one = batching.Batches("flexmix_mini.humor", "train", 4, 64, small["dir"], seed=0)
    n = int(one.num_rows[0])
    tokens = [tuple(r) for _ in range((n + 3) // 4) for r in next(one)["decoder_target_tokens"]][:n]
    rows = one.rows[0]["decoder_target_tokens"]
    assert sorted(tokens) == sorted(tuple(r) for r in np.asarray(rows))


# --------------------------------------------------------------------------------- owners' data
def test_register_owner_files(small, tmp_path):
    files = tmp_path / "notes"
    files.mkdir()
    for i in range(12):
        (files / f"note{i}.txt").write_text(f"Patient note {i}: rested well, temperature {36 + i / 10:.1f} C.\n" * 3)
    (files / "note_dup.txt").write_text((files / "note3.txt").read_text())
    (files / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    logs = []
    man = D.register("hospital_notes", str(files / "*.txt"), small["dir"], progress=False, log=logs.append)
    assert man["read"]["non_utf8_files"] == 1 and man["duplicates"] == 1
    assert sum(r["docs"] for r in man["splits"].values()) == 12
    assert all(man["splits"][s]["docs"] >= 1 for s in D.SPLITS)
    assert any("non-UTF-8" in m and "latin1.txt" in m for m in logs)
    assert "hospital_notes" in D.register_tasks(small["dir"])
    b = next(D.batches("hospital_notes", "train", 2, 64, small["dir"]))
    _segments_ok(b)
    ev = list(D.eval_batches("hospital_notes", "validation", 2, 64, small["dir"]))
    assert sum(int(x["decoder_loss_weights"].sum()) for x in ev) == man["splits"]["validation"]["tokens"]
    # same files again: nothing to do; other files under the same name: refused unless overwrite
    logs.clear()
    D.register("hospital_notes", str(files / "*.txt"), small["dir"], progress=False, log=logs.append)
    assert "nothing to do" in logs[-1]
    jl = tmp_path / "more.jsonl"
    jl.write_text("\n".join([json.dumps({"body": f"record {i} " * 5}) for i in range(8)]
                            + [json.dumps({"other": 1}), "not json", json.dumps({"body": 7})]) + "\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        D.register("hospital_notes", str(jl), small["dir"], format="jsonl", text_key="body", progress=False)
    logs.clear()
    man = D.register("hospital_notes", str(jl), small["dir"], format="jsonl", text_key="body", overwrite=True,
                     progress=False, log=logs.append)
    assert man["read"]["lines_without_key"] == 2 and man["read"]["bad_json_lines"] == 1
    assert any("without a string 'body' field" in m and "more.jsonl:9" in m for m in logs)
    assert sum(r["docs"] for r in man["splits"].values()) == 8
    assert D.split_stats("hospital_notes", "train", small["dir"])["docs"] == man["splits"]["train"]["docs"]


def test_register_errors(small, tmp_path):
    d = small["dir"]
    with pytest.raises(FileNotFoundError, match="no files match"):
        D.register("owner_a", str(tmp_path / "missing" / "*.txt"), d, progress=False)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="non-UTF-8"):
        D.register("owner_b", str(bad), d, progress=False)
    jl = tmp_path / "x.jsonl"
    jl.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ValueError, match="without a string 'text' field.*x.jsonl:1"):
        D.register("owner_c", str(jl), d, format="jsonl", progress=False)
    good = tmp_path / "good.txt"
    good.write_text("some text")
    with pytest.raises(ValueError, match="clashes with FlexMix-mini"):
        D.register("flexmix_mini.code", str(good), d, progress=False)
    import seqio
    seqio.TaskRegistry.add("someone_elses_task", source=seqio.FunctionDataSource(lambda split, shuffle_files: None,
                                                                                  splits=["train"]),
                           output_features={})
    try:
        with pytest.raises(ValueError, match="clashes with a seqio task"):
            D.register("someone_elses_task", str(good), d, progress=False)
    finally:
        seqio.TaskRegistry.remove("someone_elses_task")
    with pytest.raises(ValueError, match="invalid name"):
        D.register("Bad Name", str(good), d, progress=False)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        D.register("owner_d", str(good), tmp_path / "empty_data_dir", progress=False)


# ------------------------------------------------------------------------------------------- CLI
def _cli(argv):
    """Run through flexmoe's CLI when it has `data`, else through an equivalent parser."""
    from flexmoe_jax import cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        parser = cli.build_parser()
        has_data = any("data" in getattr(a, "choices", {}) or {} for a in parser._actions
                       if isinstance(a, argparse._SubParsersAction))
        if has_data:
            rc = cli.main(argv)
        else:
            from flexmoe_jax.cli.data import add_data_commands
            p = argparse.ArgumentParser(prog="flexmoe")
            add_data_commands(p.add_subparsers(dest="command"))
            args = p.parse_args(argv)
            try:
                args.fn(args)
                rc = 0
            except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
                print(f"flexmoe {args.command}: error: {e}", file=sys.stderr)
                rc = 2
    return rc, out.getvalue(), err.getvalue()


def test_cli_data_build_cached_and_register_errors(small, tmp_path):
    rc, out, err = _cli(["data", "build", "--data_dir", str(small["dir"]), "--max_docs_per_domain", str(MAX_DOCS),
                         "--vocab_size", str(VOCAB), "--no_progress"])
    assert rc == 0 and "nothing to do" in out
    rc, out, err = _cli(["data", "register", "--name", "x1", "--files", str(tmp_path / "none*.txt"),
                         "--data_dir", str(small["dir"]), "--no_progress"])
    assert rc == 2 and "no files match" in err and len(err.strip().splitlines()) == 1
    rc, out, err = _cli(["data", "build", "--data_dir", str(tmp_path / "y"), "--domains", "nope"])
    assert rc == 2 and "unknown FlexMix-mini domain" in err


def test_public_replay_mixture_rates(small_data_dir):
    from flexmoe_jax.data import tasks

    name = tasks.register_replay_mixture("flexmix_mini.humor", D.PUBLIC_MIXTURE, 0.3, small_data_dir)
    names, rates = tasks._tasks_and_rates(name, small_data_dir)
    share = dict(zip(names, rates))
    assert share["flexmix_mini.humor"] == pytest.approx(0.7)
    assert sum(v for k, v in share.items() if k.startswith("flexmix_mini.public_")) == pytest.approx(0.3)
    b = next(iter(D.batches(name, "train", 4, 32, small_data_dir)))
    assert b["decoder_target_tokens"].shape == (4, 32)
    with pytest.raises(ValueError, match="public_share"):
        tasks.register_replay_mixture("flexmix_mini.humor", D.PUBLIC_MIXTURE, 1.0, small_data_dir)


def test_share_packed_rows_links_equal_datasets_only(small_data_dir, tmp_path):
    import os

    from flexmoe_jax import demo
    from flexmoe_jax.data import packing

    SEQ = 24  # a row length no other test packs, so only what this test packs is in the cache
    owner = demo.owner_data_dir(small_data_dir, "humor", tmp_path / "owner")
    wordnet, humor = "flexmix_mini.public_wordnet", "flexmix_mini.humor"
    D.register_tasks(small_data_dir)
    want = packing.packed_rows(wordnet, "train", SEQ, small_data_dir)  # packed (or cached) in the source dir
    shared = packing.share_packed_rows(small_data_dir, owner, [wordnet, humor], "train", SEQ)
    assert shared == [wordnet]  # humor: not packed there
    src = layout.cache_dir(small_data_dir) / "packed" / wordnet / f"train-L{SEQ}"
    dst = layout.cache_dir(owner) / "packed" / wordnet / f"train-L{SEQ}"
    assert all(os.path.samefile(src / f"{f}.npy", dst / f"{f}.npy") for f in packing.FEATURES)  # links, not copies
    D.register_tasks(owner)
    got = packing.packed_rows(wordnet, "train", SEQ, owner)  # served from the shared rows
    assert isinstance(got[packing.FEATURES[0]], np.memmap)
    for f in packing.FEATURES:
        np.testing.assert_array_equal(got[f], want[f])
    assert packing.share_packed_rows(small_data_dir, owner, [wordnet], "train", SEQ) == []  # already there
    # Other content under the same name (a rebuilt source) is never adopted.
    meta = json.loads((src / "meta.json").read_text())
    (src / "meta.json").write_text(json.dumps({**meta, "key": meta["key"] + "x"}))
    try:
        owner2 = demo.owner_data_dir(small_data_dir, "humor", tmp_path / "owner2")
        assert packing.share_packed_rows(small_data_dir, owner2, [wordnet], "train", SEQ) == []
        assert not (layout.cache_dir(owner2) / "packed" / wordnet).exists()
    finally:
        (src / "meta.json").write_text(json.dumps(meta))


def test_packed_cache_publication_tolerates_a_race(tmp_path):
    """Two processes packing the same rows: a complete cache with the same key is kept, a stale one is
    replaced whole, and nothing half-deleted is ever in place."""
    import json as _json

    from flexmoe_jax.data import packing

    def make(path, key, marker):
        path.mkdir(parents=True)
        (path / "meta.json").write_text(_json.dumps({"key": key}))
        (path / "x.npy").write_text(marker)

    d = tmp_path / "train-L64"
    make(tmp_path / "a.tmp1", "k", "first")
    packing._publish_cache(tmp_path / "a.tmp1", d, "k")
    assert (d / "x.npy").read_text() == "first" and not (tmp_path / "a.tmp1").exists()
    make(tmp_path / "a.tmp2", "k", "second")  # lost the race: the published one stays
    packing._publish_cache(tmp_path / "a.tmp2", d, "k")
    assert (d / "x.npy").read_text() == "first" and not (tmp_path / "a.tmp2").exists()
    make(tmp_path / "a.tmp3", "k2", "newer")  # new content: the stale cache is replaced whole
    packing._publish_cache(tmp_path / "a.tmp3", d, "k2")
    assert (d / "x.npy").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["train-L64"]
