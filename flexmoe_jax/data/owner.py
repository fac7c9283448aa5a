"""``flexmoe data register``: a data owner's own files -> tfds ``flexmix_owner/NAME:1.0.0`` and seqio
task ``NAME``, on the owner's machine only.

``txt``: one document per file; ``jsonl``: one per line, from its ``text_key`` field. Unreadable files
and bad lines are skipped, counted and the first named; nothing usable left is a :class:`UserError`.
The documents get FlexMix-mini's hygiene (:mod:`flexmoe_jax.data.splits`) and the anchor's tokenizer,
a copy of which is kept next to the manifest ``DATA_DIR/owners/NAME.json``. The same name with the
same documents is a no-op; with other documents a ``FileExistsError`` unless ``overwrite``; a name
clashing with a seqio task or mixture or FlexMix-mini's is a :class:`UserError`. See docs/data.md.
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

from flexmoe_jax.data import layout as L, splits
from flexmoe_jax.data.doc import Doc
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
            if p.is_dir():
                out.update(q for q in p.rglob("*") if q.is_file())
            else:
                out.add(p)
    return sorted(out)


def read_documents(paths: list[Path], fmt: str, text_key: str, progress: bool = False) -> tuple[list[Doc], dict]:
    """Read the files; returns (documents, counts of what was read and skipped)."""
    from tqdm.auto import tqdm

    stats = {"files": len(paths), "files_read": 0, "unreadable_files": 0, "non_utf8_files": 0,
             "documents": 0, "bad_json_lines": 0, "lines_without_key": 0}
    first: dict[str, str] = {}
    docs: list[Doc] = []
    for p in tqdm(paths, desc="read files", unit="file", disable=not progress, file=sys.stderr):
        try:
            raw = p.read_bytes()
        except OSError:
            stats["unreadable_files"] += 1
            first.setdefault("unreadable_files", str(p))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats["non_utf8_files"] += 1
            first.setdefault("non_utf8_files", str(p))
            continue
        stats["files_read"] += 1
        if fmt == "txt":
            docs.append(Doc(text=text, id=str(p), source=p.name))
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                stats["bad_json_lines"] += 1
                first.setdefault("bad_json_lines", f"{p}:{i}")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                stats["lines_without_key"] += 1
                first.setdefault("lines_without_key", f"{p}:{i}")
                continue
            docs.append(Doc(text=obj[text_key], id=f"{p}:{i}", source=p.name))
    stats["documents"] = len(docs)
    stats["first"] = first
    return docs, stats


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


def register(name: str, files, data_dir, format: str = "txt", text_key: str = "text", vocab=None,
             overwrite: bool = False, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Register an owner's files as tfds ``flexmix_owner/NAME:1.0.0`` + seqio task ``NAME``.

    Returns the owner's manifest (documents, bytes and tokens per split, what was skipped).
    """
    log = log or (lambda msg: print(msg, flush=True))
    if format not in ("txt", "jsonl"):
        raise UserError(f"--format must be txt or jsonl, not '{format}'")
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
    docs, stats = read_documents(paths, format, text_key, progress=progress)
    skipped = _skips(stats, text_key)
    if not docs:
        why = "; ".join(skipped) or "the files are empty"
        raise UserError(f"no documents found in {len(paths)} file(s) matching {shown}: {why}")
    dstats: dict[str, int] = {}
    unique = splits.dedup(docs, dstats)
    if not unique:
        raise UserError(f"all {len(docs)} document(s) are empty after normalization")
    by_split = splits.assign_splits(unique)
    key = hashlib.sha256(json.dumps({"docs": sorted(unique), "vocab": hashlib.sha256(
        vocab_path.read_bytes()).hexdigest(), "format": 1}).encode()).hexdigest()[:16]

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

    from flexmoe_jax.data import tokenizer as T
    sp = T.processor(vocab_path)
    split_rows = {}
    for s, items in by_split.items():
        texts = [d.text for _, d in items]
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        ntok = sum(T.count_tokens(sp, texts))
        split_rows[s] = {"docs": len(texts), "bytes": nbytes, "tokens": ntok}

    _write_tfds(data_dir, name, by_split, key)
    own = L.owners_dir(data_dir) / name
    own.mkdir(parents=True, exist_ok=True)
    if vocab_path.resolve() != (own / "spm.model").resolve():
        shutil.copyfile(vocab_path, own / "spm.model.tmp")
        os.replace(own / "spm.model.tmp", own / "spm.model")
    manifest = {"name": name, "key": key, "task": name, "tfds": L.tfds_name(L.OWNER_NAME, name),
                "files": [str(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)],
                "format": format,
                "text_key": text_key if format == "jsonl" else None,
                "vocab": str(vocab_path.resolve()), "read": {k: v for k, v in stats.items() if k != "first"},
                "duplicates": dstats.get("duplicates", 0), "empty": dstats.get("empty", 0), "splits": split_rows}
    write_json(man_path, manifest)

    from flexmoe_jax.data import tasks
    tasks.register_tasks(data_dir)
    for msg in skipped:
        log(f"warning: {msg}")
    for s in ("validation", "test"):
        if not split_rows[s]["docs"]:
            log(f"warning: only {len(unique)} distinct document(s): no {s} split")
    n = split_rows
    log(f"registered '{name}': {len(unique)} documents ({n['train']['docs']} train / {n['validation']['docs']} "
        f"validation / {n['test']['docs']} test, {sum(r['tokens'] for r in n.values()):,} tokens) from "
        f"{stats['files_read']} file(s) as seqio task '{name}' (tfds {manifest['tfds']} in {L.tfds_dir(data_dir)})")
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
