"""The forms an owner's data really comes in (flexmoe_jax.data.readers) and the streaming spool behind
`flexmoe data register` (flexmoe_jax.data.spool): every format read back document for document."""

import gzip
import json

import pytest

from flexmoe_jax.data import readers, splits
from flexmoe_jax.data.doc import Doc
from flexmoe_jax.data.spool import Spool

TEXTS = [f"Record {i}: the patient in bed {i} slept {i % 7} hours.\nNurse: {'ok ' * (i % 5)}" for i in range(40)]


def _write_all(d):
    """One small file (or directory) of each format holding TEXTS[a:b], a different slice each."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d.mkdir(parents=True, exist_ok=True)
    lines = lambda rows: "".join(json.dumps({"text": t, "id": f"x{i}"}) + "\n" for i, t in rows)  # noqa: E731
    (d / "plain.jsonl").write_text(lines(enumerate(TEXTS[0:5])))
    with gzip.open(d / "shard.jsonl.gz", "wt") as f:
        f.write(lines(enumerate(TEXTS[5:10])))
    (d / "shard.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(enumerate(TEXTS[10:15])).encode()))
    pq.write_table(pa.table({"text": TEXTS[15:20], "n": list(range(5))}), d / "table.parquet", row_group_size=2)
    with open(d / "sheet.csv", "w", newline="") as f:
        import csv

        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([(i, t) for i, t in enumerate(TEXTS[20:25])])
    dolma = d / "dolma" / "documents"
    dolma.mkdir(parents=True)
    for k in range(2):
        with gzip.open(dolma / f"part-{k}.json.gz", "wt") as f:
            f.write(lines(enumerate(TEXTS[25 + 3 * k: 28 + 3 * k])))
    (d / "one_document.txt").write_text(TEXTS[31])
    return {"plain.jsonl": 5, "shard.jsonl.gz": 5, "shard.jsonl.zst": 5, "table.parquet": 5, "sheet.csv": 5,
            "dolma": 6, "one_document.txt": 1}


@pytest.fixture
def owner_dir(small_data_dir, tmp_path):
    """A data directory holding only the anchor's tokenizer (registrations here touch no shared data dir)."""
    import shutil

    from flexmoe_jax.data import layout as L

    d = tmp_path / "data"
    shutil.copytree(L.tokenizer_path(small_data_dir).parent, L.tokenizer_path(d).parent)
    return str(d)


def _hf_dataset(path, texts):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": texts, "k": list(range(len(texts)))}).save_to_disk(str(path))


def test_every_format_streams_every_document(tmp_path):
    from flexmoe_jax.data import owner

    expected = _write_all(tmp_path / "in")
    _hf_dataset(tmp_path / "in" / "hf_ds", TEXTS[32:40])
    paths = owner._expand(str(tmp_path / "in"))
    assert tmp_path / "in" / "hf_ds" in paths  # a Hugging Face dataset is one input, not its files
    assert not any("hf_ds" in str(p) and p != tmp_path / "in" / "hf_ds" for p in paths)
    stats = readers.new_stats()
    docs = list(readers.iter_documents(paths, "auto", "text", stats))
    assert sorted(d.text for d in docs) == sorted(TEXTS[:32] + TEXTS[32:40])
    assert stats["documents"] == sum(expected.values()) + 8 and stats["files_read"] == len(paths)
    assert {readers.format_of(p) for p in paths} == {"jsonl", "parquet", "csv", "txt", "hf"}
    by_source = {}
    for doc in docs:
        by_source[doc.source] = by_source.get(doc.source, 0) + 1
    assert by_source["table.parquet"] == 5 and by_source["sheet.csv"] == 5


def test_a_dataset_dict_reads_every_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": TEXTS[:6]}),
                               "test": datasets.Dataset.from_dict({"body": TEXTS[6:9]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    docs = list(readers.iter_documents([tmp_path / "dd"], "auto", "body"))
    assert sorted(d.text for d in docs) == sorted(TEXTS[:9])


def test_bad_inputs_are_counted_and_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in TEXTS[:50]))
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])  # a truncated shard
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "t.parquet")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n{"other": 1}\n')
    stats = readers.new_stats()
    paths = sorted(tmp_path.iterdir())
    docs = list(readers.iter_documents(paths, "auto", "text", stats))
    assert stats["unreadable_files"] == 1 and "cut.jsonl.gz" in stats["first"]["unreadable_files"]
    assert stats["rows_without_key"] == 1 and "columns: body" in stats["first"]["rows_without_key"]
    assert stats["bad_json_lines"] == 1 and stats["lines_without_key"] == 1
    assert "fine" in [d.text for d in docs]
    # a forced format that does not fit: parquet bytes read as JSON lines are not UTF-8 / not JSON
    forced = readers.new_stats()
    assert not list(readers.iter_documents([tmp_path / "t.parquet"], "jsonl", "text", forced))
    assert forced["non_utf8_files"] + forced["bad_json_lines"] >= 1


def test_spool_dedups_splits_by_hash_and_keys_the_set_not_the_order(tmp_path):
    docs = [Doc(t, str(i), "s") for i, t in enumerate(TEXTS)]
    docs += [Doc(TEXTS[3] + "\n\n", "dup", "s"), Doc(" \n", "e", "s")]
    a = Spool(tmp_path / "a")
    for d in docs:
        a.add(d)
    out = a.finish()
    assert a.dropped == {"candidates": 42, "empty": 1, "duplicates": 1} and a.unique == 40
    got = {s: list(out[s]) for s in splits.SPLITS}
    assert sum(len(v) for v in got.values()) == 40
    for s, rows in got.items():
        assert len(out[s]) == len(rows) == a.rows[s]["docs"]
        for h, d in rows:
            assert splits.doc_hash(d.text) == h and d.text == splits.normalize(d.text)
    b = Spool(tmp_path / "b")
    for d in reversed(docs):
        b.add(d)
    b.finish()
    assert a.key() == b.key()
    c = Spool(tmp_path / "c")
    for d in docs[1:]:
        c.add(d)
    c.finish()
    assert c.key() != a.key()


def test_spool_of_three_documents_fills_every_split(tmp_path):
    sp = Spool(tmp_path)
    for t in ("alpha", "beta", "gamma"):
        sp.add(Doc(t, t, "s"))
    out = sp.finish()
    assert all(len(out[s]) >= 1 for s in splits.SPLITS)
    assert sorted(d.text for s in splits.SPLITS for _, d in out[s]) == ["alpha", "beta", "gamma"]


def test_register_every_format_in_one_directory(owner_dir, tmp_path):
    from flexmoe_jax import data as D

    expected = _write_all(tmp_path / "in")
    logs = []
    man = D.register("owner_formats", str(tmp_path / "in"), owner_dir, progress=False, log=logs.append)
    assert sum(r["docs"] for r in man["splits"].values()) == sum(expected.values())
    assert man["format"] == "auto" and man["read"]["files_read"] == 8  # 6 files + 2 Dolma shards
    assert "owner_formats" in D.register_tasks(owner_dir)
    from flexmoe_jax import eval as ev

    assert "owner_formats" in ev.default_tasks(owner_dir)  # `flexmoe eval` scores registered owners by default
    assert D.split_stats("owner_formats", "train", owner_dir)["docs"] == man["splits"]["train"]["docs"]
    # the same documents in another order and another format: the same registration, nothing to do
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "all.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[31::-1]))
    logs.clear()
    assert D.register("owner_formats", str(tmp_path / "again"), owner_dir, progress=False,
                      log=logs.append)["key"] == man["key"]
    assert "nothing to do" in logs[-1]


def test_register_says_what_was_dropped_and_how_to_fix_a_wrong_key(owner_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flexmoe_jax import data as D

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:10] * 2))
    logs = []
    D.register("owner_dups", str(tmp_path / "a.jsonl"), owner_dir, progress=False, log=logs.append)
    assert "10 duplicates dropped" in logs[-1] and "20 read" in logs[-1]
    pq.write_table(pa.table({"body": TEXTS[:4]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="without a string 'text' column.*--text_key"):
        D.register("owner_key", str(tmp_path / "t.parquet"), owner_dir, progress=False)
    with pytest.raises(ValueError, match="--format must be one of"):
        D.register("owner_key", str(tmp_path / "t.parquet"), owner_dir, format="xml", progress=False)
