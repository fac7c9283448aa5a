"""Packed rows: every document of a task's split, tokenized, cut and packed by seqio into
``[rows, seq_len]`` int32 arrays of the five decoder :data:`FEATURES`, cached in the data directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from flexmoe_jax.data import layout as L
from flexmoe_jax.errors import UserError

# flexmoe_jax.data re-exports FEATURES, so this module imports tasks (and seqio) only inside functions.
FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")


def _cache_key(name: str) -> str | None:
    from flexmoe_jax.data.tasks import _REGISTERED

    return None if name not in _REGISTERED else "/".join(_REGISTERED[name])


def packed_rows(name: str, split: str, seq_len: int, data_dir) -> dict[str, np.ndarray]:
    """Every document of a task's split, tokenized, split and packed by seqio into ``[rows, seq_len]``.

    Cached under ``DATA_DIR/cache/packed/<task>/<split>-L<seq_len>/`` (memory-mapped on load).
    """
    from flexmoe_jax.data import tasks

    tasks._provider(name, data_dir)
    key = _cache_key(name)
    d = L.cache_dir(data_dir) / "packed" / name / f"{split}-L{seq_len}"
    meta = d / "meta.json"
    if key is not None and meta.exists() and json.loads(meta.read_text()).get("key") == key:
        return {f: np.load(d / f"{f}.npy", mmap_mode="r") for f in FEATURES}
    rows = _pack(name, split, seq_len)
    if key is not None:
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in FEATURES:
            np.save(tmp / f"{f}.npy", rows[f])
        (tmp / "meta.json").write_text(json.dumps({"key": key, "rows": int(len(rows[FEATURES[0]]))}))
        _publish_cache(tmp, d, key)
    return rows


def _publish_cache(tmp: Path, d: Path, key: str) -> None:
    """Move a finished cache directory into place. Two processes packing the same rows may race: a
    complete cache with the same key is kept (ours is dropped), a stale one is first renamed aside (so
    no reader ever sees a half-deleted directory), and losing the final rename is not an error."""
    def current() -> bool:
        try:
            return json.loads((d / "meta.json").read_text()).get("key") == key
        except (OSError, ValueError):
            return False

    if not current():
        if d.exists():
            aside = d.with_name(d.name + f".old{os.getpid()}")
            try:
                os.replace(d, aside)
            except OSError:
                aside = None
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(tmp, d)
            return
        except OSError:  # another process published first
            pass
    shutil.rmtree(tmp, ignore_errors=True)


def share_packed_rows(src_dir, dst_dir, names: Sequence[str], split: str, seq_len: int) -> list[str]:
    """Hard-link ``src_dir``'s packed rows of ``names`` into ``dst_dir``'s cache wherever ``dst_dir``
    holds the same dataset (equal content key), so a data directory made of links to another's
    datasets (an owner's, see ``flexmoe_jax.demo.owner_data_dir``) does not pack the same text
    again: packing the public sources took each owner process ~40 s on one core. Rows already
    cached in ``dst_dir``, missing in ``src_dir`` or packed from other content are left alone
    (``dst_dir`` then packs its own). Returns the names shared."""
    from flexmoe_jax.data.tasks import _REGISTERED, register_tasks

    register_tasks(dst_dir)
    src_root, dst_root = Path(src_dir).resolve(), Path(dst_dir).resolve()
    shared = []
    for name in names:
        ident = _REGISTERED.get(name)
        if ident is None or ident[0] != str(dst_root):
            continue
        src = L.cache_dir(src_root) / "packed" / name / f"{split}-L{seq_len}"
        dst = L.cache_dir(dst_root) / "packed" / name / f"{split}-L{seq_len}"
        try:
            meta = json.loads((src / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if meta.get("key") != f"{src_root}/{ident[1]}" or (dst / "meta.json").exists():
            continue
        tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in FEATURES:
            try:
                os.link(src / f"{f}.npy", tmp / f"{f}.npy")
            except OSError:  # another file system: copy
                shutil.copy2(src / f"{f}.npy", tmp / f"{f}.npy")
        (tmp / "meta.json").write_text(json.dumps({**meta, "key": "/".join(ident)}))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        shared.append(name)
    return shared


def _pack(name: str, split: str, seq_len: int) -> dict[str, np.ndarray]:
    import seqio
    import tensorflow_datasets as tfds

    task = seqio.get_mixture_or_task(name)
    if split not in task.splits:
        raise UserError(f"task '{name}' has no split '{split}' (it has {', '.join(task.splits)})")
    ds = task.get_dataset({"targets": seq_len}, split=split, shuffle=False, num_epochs=1, use_cached=False,
                          seed=0)
    ds = seqio.DecoderFeatureConverter(pack=True)(ds, {"targets": seq_len})
    parts = {f: [] for f in FEATURES}
    for b in tfds.as_numpy(ds.batch(1024)):
        for f in FEATURES:
            parts[f].append(np.asarray(b[f], np.int32))
    if not parts[FEATURES[0]]:
        raise UserError(f"task '{name}' split '{split}' is empty")
    return {f: np.concatenate(v) for f, v in parts.items()}
