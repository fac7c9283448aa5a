"""``flexmoe data register``: a data owner's own files -> tfds ``flexmix_owner/NAME:1.0.0`` and seqio
task ``NAME``, on the owner's machine only.

The files are read by :mod:`flexmoe_jax.data.readers` (``txt``, JSON lines plain or ``.gz`` /
``.zst``, parquet, CSV, Hugging Face datasets saved to disk, Dolma-style shard directories; ``auto``
picks per file) as a stream, deduplicated and split on the way into per-split spool files
(:mod:`flexmoe_jax.data.spool`), so memory holds one digest per distinct document, not the corpus.
Unreadable files and bad lines are skipped, counted and the first named; nothing usable left is a
:class:`UserError` that names the format and the flag to change. The documents get FlexMix-mini's
hygiene (:mod:`flexmoe_jax.data.splits`) and the anchor's tokenizer, a copy of which is kept next to
the manifest ``DATA_DIR/owners/NAME.json``. The same name with the same documents is a no-op; with
other documents a ``FileExistsError`` unless ``overwrite``; a name clashing with a seqio task or
mixture or FlexMix-mini's is a :class:`UserError`. See docs/data.md.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

from flexmoe_jax.data import layout as L, readers, splits
from flexmoe_jax.data.sources import CONFIGS
from flexmoe_jax.errors import UserError
from flexmoe_jax.storage import write_json

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _expand(files: str | Sequence[str]) -> list[Path]:
    patterns = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    out: set[Path] = set()
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        hits = _glob.glob(pat, recursive=True)
        if not hits and os.path.exists(pat):
            hits = [pat]
        for h in hits:
            p = Path(h)
            if readers.is_hf_dataset(p):
                out.add(p)
            elif p.is_dir():
                for root, dirs, names in os.walk(p):
                    keep = []
                    for d in sorted(dirs):
                        (out.add(Path(root) / d) if readers.is_hf_dataset(Path(root) / d) else keep.append(d))
                    dirs[:] = [d for d in keep if not d.startswith(".")]
                    out.update(Path(root) / n for n in names if not n.startswith("."))
            else:
                out.add(p)
    return sorted(out)


def _skips(stats: dict, text_key: str) -> list[str]:
    msgs = []
    first = stats.get("first", {})
    if stats["unreadable_files"]:
        msgs.append(f"{stats['unreadable_files']} unreadable file(s) skipped (first: {first['unreadable_files']})")
    if stats["non_utf8_files"]:
        msgs.append(f"{stats['non_utf8_files']} non-UTF-8 file(s) skipped (first: {first['non_utf8_files']})")
    if stats["bad_json_lines"]:
        msgs.append(f"{stats['bad_json_lines']} line(s) that are not JSON skipped (first: {first['bad_json_lines']})")
    if stats["lines_without_key"]:
        msgs.append(f"{stats['lines_without_key']} jsonl line(s) without a string '{text_key}' field skipped "
                    f"(first: {first['lines_without_key']})")
    if stats.get("rows_without_key"):
        msgs.append(f"{stats['rows_without_key']} row(s) or table(s) without a string '{text_key}' column skipped "
                    f"(first: {first['rows_without_key']}); pass --text_key with the column that holds the text")
    return msgs


def check_name(name: str, data_dir) -> None:
    """Raise ValueError if ``name`` is invalid or clashes with a registered task/mixture."""
    from flexmoe_jax.data import tasks

    if name.startswith(L.TASK_PREFIX.rstrip(".")) or name in CONFIGS or name in (
            L.PUBLIC_MIXTURE, L.ALL_MIXTURE):
        raise UserError(f"name '{name}' clashes with FlexMix-mini's tasks; pick another name")
    if not NAME_RE.match(name):
        raise UserError(f"invalid name '{name}': use lowercase letters, digits and '_', starting with a letter")
    owners = tasks.owner_manifests(data_dir)
    if name not in owners and name not in tasks._REGISTERED:
        if tasks._clash(name):
            raise UserError(f"name '{name}' clashes with a seqio task or mixture already registered; "
                            f"pick another name")


def register(name: str, files, data_dir, format: str = "auto", text_key: str = "text", vocab=None,
             overwrite: bool = False, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Register an owner's files as tfds ``flexmix_owner/NAME:1.0.0`` + seqio task ``NAME``.

    ``format``: one of :data:`flexmoe_jax.data.readers.FORMATS` (``auto``: by each file's name).
    Returns the owner's manifest (documents, bytes and tokens per split, what was skipped).
    """
    import tempfile

    from tqdm.auto import tqdm

    from flexmoe_jax.data import tokenizer as T
    from flexmoe_jax.data.spool import Spool

    log = log or (lambda msg: print(msg, flush=True))
    if format not in readers.FORMATS:
        raise UserError(f"--format must be one of {', '.join(readers.FORMATS)}, not '{format}'")
    data_dir = Path(data_dir)
    check_name(name, data_dir)
    vocab_path = Path(vocab) if vocab else L.tokenizer_path(data_dir)
    if not vocab_path.exists():
        raise FileNotFoundError(
            f"no tokenizer at {vocab_path}: pass --vocab with the anchor's spm.model "
            f"(or run `flexmoe data build --data_dir {data_dir}` first)")
    paths = _expand(files)
    shown = ", ".join(repr(str(f)) for f in ([files] if isinstance(files, (str, os.PathLike)) else files))
    if not paths:
        raise FileNotFoundError(f"no files match {shown}")
    sp = T.processor(vocab_path)
    stats = readers.new_stats()
    L.cache_dir(data_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"register-{name}-", dir=L.cache_dir(data_dir)) as tmp:
        spool = Spool(tmp, sp)
        bar = tqdm(desc=f"register {name}", unit="doc", disable=not progress, file=sys.stderr)
        for i, d in enumerate(readers.iter_documents(paths, format, text_key, stats), 1):
            spool.add(d)
            bar.update(1)
            if i % 1000 == 0:
                mb = sum(r["bytes"] for r in spool.rows.values()) / 1e6
                bar.set_postfix_str(f"{mb:,.1f} MB kept, {spool.dropped['duplicates']:,} duplicates, "
                                    f"{stats['files_read']}/{len(paths)} files")
        bar.close()
        by_split = spool.finish()
        skipped = _skips(stats, text_key)
        if not stats["documents"]:
            why = "; ".join(skipped) or "the files are empty"
            hint = (f" (read as {format}; pass --format with the files' format, one of "
                    f"{', '.join(f for f in readers.FORMATS if f != 'auto')})")
            raise UserError(f"no documents found in {len(paths)} file(s) matching {shown}: {why}{hint}")
        if not spool.unique:
            raise UserError(f"all {stats['documents']} document(s) are empty after normalization")
        key = hashlib.sha256(json.dumps({"docs": spool.key(), "vocab": hashlib.sha256(
            vocab_path.read_bytes()).hexdigest(), "format": 2}).encode()).hexdigest()[:16]

        man_path = L.owners_dir(data_dir) / f"{name}.json"
        if man_path.exists() and L.dataset_ready(data_dir, L.OWNER_NAME, name):
            old = json.loads(man_path.read_text())
            if old.get("key") == key:
                log(f"'{name}' is already registered in {data_dir} with the same documents: nothing to do")
                from flexmoe_jax.data import tasks
                tasks.register_tasks(data_dir)
                return old
            if not overwrite:
                raise FileExistsError(f"'{name}' is already registered in {data_dir} from other documents; "
                                      f"pass --overwrite to replace it")
        split_rows = {s: dict(spool.rows[s]) for s in splits.SPLITS}
        _write_tfds(data_dir, name, by_split, key)
    own = L.owners_dir(data_dir) / name
    own.mkdir(parents=True, exist_ok=True)
    if vocab_path.resolve() != (own / "spm.model").resolve():
        shutil.copyfile(vocab_path, own / "spm.model.tmp")
        os.replace(own / "spm.model.tmp", own / "spm.model")
    manifest = {"name": name, "key": key, "task": name, "tfds": L.tfds_name(L.OWNER_NAME, name),
                "files": [str(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)],
                "format": format,
                "text_key": text_key if format != "txt" else None,
                "vocab": str(vocab_path.resolve()), "read": {k: v for k, v in stats.items() if k != "first"},
                "duplicates": spool.dropped["duplicates"], "empty": spool.dropped["empty"], "splits": split_rows}
    write_json(man_path, manifest)

    from flexmoe_jax.data import tasks
    tasks.register_tasks(data_dir)
    for msg in skipped:
        log(f"warning: {msg}")
    for s in ("validation", "test"):
        if not split_rows[s]["docs"]:
            log(f"warning: only {spool.unique} distinct document(s): no {s} split")
    n = split_rows
    dropped = [f"{spool.dropped[k]:,} {k}" for k in ("duplicates", "empty") if spool.dropped[k]]
    log(f"registered '{name}': {spool.unique:,} documents ({n['train']['docs']:,} train / "
        f"{n['validation']['docs']:,} validation / {n['test']['docs']:,} test, "
        f"{sum(r['tokens'] for r in n.values()):,} tokens) from {stats['documents']:,} read in "
        f"{stats['files_read']} of {len(paths)} file(s)" + (f", {' and '.join(dropped)} dropped" if dropped else "")
        + f" as seqio task '{name}' (tfds {manifest['tfds']} in {L.tfds_dir(data_dir)})")
    return manifest


def _write_tfds(data_dir, name: str, by_split, key: str) -> None:
    from flexmoe_jax.data.tfds_io import quiet_tf
    quiet_tf()
    import tensorflow_datasets as tfds

    from flexmoe_jax.data import builder as B

    tfds.disable_progress_bar()
    target = L.dataset_dir(data_dir, L.OWNER_NAME, name)
    if target.exists():
        shutil.rmtree(target)
    shutil.rmtree(L.cache_dir(data_dir) / "packed" / name, ignore_errors=True)
    b = B.FlexmixOwner(config=tfds.core.BuilderConfig(name=name), data_dir=str(L.tfds_dir(data_dir)),
                       selection=by_split, metadata={"key": key})
    b.download_and_prepare(download_dir=str(L.cache_dir(data_dir) / "downloads"),
                           download_config=B.download_config())
