"""Reading an owner's files as a stream of documents, whatever form the owner keeps them in.

Formats (``FORMATS``; ``auto``, the default, picks one per file from its name):

==========  =====================================================  =====================================
format      files                                                  one document is
==========  =====================================================  =====================================
``txt``     anything else (``.txt``, ``.md``, ...)                 a whole file
``jsonl``   ``.jsonl``/``.json``/``.ndjson``, also ``.gz``/``.zst``  a line's ``text_key`` field
``parquet`` ``.parquet``                                           a row's ``text_key`` column
``csv``     ``.csv``/``.tsv`` (also ``.gz``/``.zst``)              a row's ``text_key`` column
``hf``      a Hugging Face ``datasets`` directory (``save_to_disk``) a row's ``text_key`` column
==========  =====================================================  =====================================

A directory is read recursively; one holding ``state.json`` or ``dataset_dict.json`` is a Hugging
Face dataset (every split of a ``DatasetDict``), and a Dolma-style tree (``documents/*.json.gz``
shards) is just JSON lines in compressed files. Everything streams: gzip and zstandard are
decompressed incrementally, parquet and Arrow files are read a record batch at a time, so memory
does not grow with a file's size. What could not be read is counted in ``stats`` (and the first
instance named in ``stats["first"]``), never raised, so one bad shard does not stop a registration;
an explicit format that does not fit a file (``--format jsonl`` on a parquet file) is counted the
same way and named by :func:`flexmoe_jax.data.owner.register`'s warnings.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from pathlib import Path
from typing import Iterator

from flexmoe_jax.data.doc import Doc

FORMATS = ("auto", "txt", "jsonl", "parquet", "csv", "hf")
_JSON = (".jsonl", ".json", ".ndjson")
_CSV = (".csv", ".tsv")
_COMPRESSED = (".gz", ".zst", ".zstd")
HF_MARKERS = ("state.json", "dataset_dict.json")

STAT_KEYS = ("files", "files_read", "unreadable_files", "non_utf8_files", "documents", "bad_json_lines",
             "lines_without_key", "rows_without_key")


def new_stats() -> dict:
    return {**{k: 0 for k in STAT_KEYS}, "first": {}}


def _note(stats: dict, key: str, where: str) -> None:
    stats[key] += 1
    stats["first"].setdefault(key, where)


def _strip_compression(name: str) -> tuple[str, str | None]:
    low = name.lower()
    for ext in _COMPRESSED:
        if low.endswith(ext):
            return low[: -len(ext)], ext
    return low, None


def format_of(path: Path) -> str:
    """The format ``auto`` reads ``path`` as (a file, or a Hugging Face dataset directory)."""
    if path.is_dir():
        return "hf"
    base, _ = _strip_compression(path.name)
    if base.endswith(_JSON):
        return "jsonl"
    if base.endswith(_CSV):
        return "csv"
    if base.endswith(".parquet"):
        return "parquet"
    return "txt"


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in HF_MARKERS)


def _open_binary(path: Path):
    """A binary stream of ``path``, decompressed incrementally if it is ``.gz`` or ``.zst``."""
    _, comp = _strip_compression(path.name)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp in (".zst", ".zstd"):
        import zstandard

        raw = open(path, "rb")
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return open(path, "rb")


def _text_lines(path: Path) -> Iterator[str]:
    with _open_binary(path) as f:
        yield from io.TextIOWrapper(f, encoding="utf-8", newline="")


def _jsonl(path: Path, text_key: str, stats: dict) -> Iterator[Doc]:
    for i, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            _note(stats, "bad_json_lines", f"{path}:{i}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
            _note(stats, "lines_without_key", f"{path}:{i}")
            continue
        yield Doc(text=obj[text_key], id=str(obj.get("id", f"{path}:{i}")), source=path.name)


def _csv(path: Path, text_key: str, stats: dict) -> Iterator[Doc]:
    csv.field_size_limit(sys.maxsize)
    base, _ = _strip_compression(path.name)
    reader = csv.DictReader(_text_lines(path), delimiter="\t" if base.endswith(".tsv") else ",")
    if reader.fieldnames is None or text_key not in reader.fieldnames:
        _note(stats, "rows_without_key", f"{path} (columns: {', '.join(reader.fieldnames or []) or 'none'})")
        return
    for i, row in enumerate(reader, 2):
        text = row.get(text_key)
        if not isinstance(text, str):
            _note(stats, "rows_without_key", f"{path}:{i}")
            continue
        yield Doc(text=text, id=f"{path}:{i}", source=path.name)


def _record_batches(batches, text_key: str, where: str, stats: dict) -> Iterator[Doc]:
    n = 0
    for batch in batches:
        if text_key not in batch.schema.names:
            _note(stats, "rows_without_key", f"{where} (columns: {', '.join(batch.schema.names)})")
            return
        for text in batch.column(text_key).to_pylist():
            n += 1
            if not isinstance(text, str):
                _note(stats, "rows_without_key", f"{where}:row {n}")
                continue
            yield Doc(text=text, id=f"{where}:{n}", source=Path(where).name)


def _parquet(path: Path, text_key: str, stats: dict) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if text_key not in f.schema_arrow.names:
        _note(stats, "rows_without_key", f"{path} (columns: {', '.join(f.schema_arrow.names)})")
        return
    yield from _record_batches(f.iter_batches(columns=[text_key], batch_size=1024), text_key, str(path), stats)


def hf_arrow_files(path: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` dataset (``state.json``) or of every split of a DatasetDict."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        return [f for s in splits for f in hf_arrow_files(path / s)]
    state = json.loads((path / "state.json").read_text())
    return [path / d["filename"] for d in state.get("_data_files", [])]


def _hf(path: Path, text_key: str, stats: dict) -> Iterator[Doc]:
    import pyarrow as pa

    for f in hf_arrow_files(path):
        with pa.memory_map(str(f)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            yield from _record_batches(batches, text_key, str(f), stats)


def iter_documents(paths: list[Path], fmt: str = "auto", text_key: str = "text",
                   stats: dict | None = None) -> Iterator[Doc]:
    """Every document of ``paths`` (files, and Hugging Face dataset directories), streamed, in order;
    what was read and skipped is counted into ``stats`` (:func:`new_stats`)."""
    stats = stats if stats is not None else new_stats()
    stats["files"] += len(paths)
    for p in paths:
        kind = format_of(p) if fmt == "auto" else fmt
        before = stats["documents"]
        try:
            if kind == "txt":
                try:
                    text = p.read_bytes().decode("utf-8")
                except UnicodeDecodeError:
                    _note(stats, "non_utf8_files", str(p))
                    continue
                stats["files_read"] += 1
                stats["documents"] += 1
                yield Doc(text=text, id=str(p), source=p.name)
                continue
            reader = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet, "hf": _hf}[kind]
            for doc in reader(p, text_key, stats):
                stats["documents"] += 1
                yield doc
            stats["files_read"] += 1
        except UnicodeDecodeError:
            _note(stats, "non_utf8_files", f"{p} (after {stats['documents'] - before} documents)")
        except (OSError, EOFError, ValueError, KeyError) as e:  # truncated gzip, bad parquet/arrow, ...
            _note(stats, "unreadable_files", f"{p} ({type(e).__name__}: {str(e)[:120]})")
