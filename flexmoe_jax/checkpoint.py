"""Checkpoints of ``(config, params)``: Orbax arrays plus the config, written atomically.

A checkpoint is a directory holding ``flexmoe_checkpoint.json`` (the marker: format, version, kind,
integrity), ``config.json``, optional ``metadata.json``, ``params/`` (Orbax, crc32c on every chunk)
and optional ``checksums.json`` (sha256 of every array, :mod:`flexmoe_jax.checksums`).
:func:`save` / :func:`save_tree` / :func:`writing` write one atomically (:mod:`flexmoe_jax.atomic_dir`);
:func:`load`, :func:`load_tree`, :func:`load_subtree`, :func:`load_config`, :func:`load_metadata`
read one onto any mesh, verifying what it records. Errors: :class:`CheckpointError` (not a checkpoint,
damaged, incomplete), :class:`IntegrityError`, :class:`CheckpointWriteError`. This module reads one
model tree; a merged model (kind ``"merged"``) loads with :func:`flexmoe_jax.loading.load`.
Layout, crash and integrity guarantees: docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from flexmoe_jax import restore_targets, storage
from flexmoe_jax.array_store import CheckpointError, IntegrityError, read_arrays, write_arrays  # noqa: F401
from flexmoe_jax.atomic_dir import (  # noqa: F401  (the write-failure API is checkpoint's too)
    CheckpointWriteError,
    _abs,
    _barrier,
    _current_generation_dir,
    _fsync_tree,
    _is_ours,
    _is_primary,
    _old_path,
    _recover_interrupted,
    _swap_into_place,
    _tmp_path,
    _write_failure,
    _write_json,
    _writing_generation,
    io_error,
    io_fix,
    remove_leftovers,
)
from flexmoe_jax.checksums import array_checksums, check_checksums
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from jax.sharding import Mesh

log = logging.getLogger(__name__)

FORMAT = "flexmoe_jax.checkpoint"
VERSION = 1
MARKER_NAME = "flexmoe_checkpoint.json"
CONFIG_NAME = "config.json"
METADATA_NAME = "metadata.json"
PARAMS_DIR = "params"
CHECKSUMS_NAME = "checksums.json"
MERGED_KIND = "merged"  # written by flexmoe_jax.merge, read by flexmoe_jax.loading
INTEGRITY = "zarr3-crc32c"  # every array chunk carries it, checked on every read (flexmoe_jax.array_store)


# ----------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------

def save(path: str | os.PathLike, config: ModelConfig, params: Any, *,
         metadata: dict[str, Any] | None = None, checksums: bool = False) -> Path:
    """Write ``params`` (sharded ``jax.Array``s or host numpy arrays) and ``config`` at ``path``, atomically.

    Replaces an older flexmoe checkpoint there only once the new one is complete; refuses to
    replace anything else (an empty directory is fine). In a multi-host job every process calls
    it with the same arguments. ``checksums=True`` also records a sha256 of every array, verified
    by :func:`load`. Returns the absolute path.
    """
    from flexmoe_jax import model as model_lib

    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    model_lib.check_params(config, params, what="params to save")
    meta_text = None
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            meta_text = json.dumps(metadata, indent=2, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise UserError(f"metadata must be JSON-serializable: {e}") from None

    files = {CONFIG_NAME: config.to_json()}
    if meta_text is not None:
        files[METADATA_NAME] = meta_text
    return save_tree(path, params, files, checksums=checksums)


def save_tree(path: str | os.PathLike, tree: Any, files: dict[str, Any], kind: str = "model",
              checksums: bool | None = None) -> Path:
    """Atomically write any array tree plus JSON files (name -> str or JSON-able) at ``path``.

    ``kind`` is recorded in the marker (so an expert deliverable is never mistaken for a model).
    ``checksums`` records a sha256 of every array; by default for every kind but ``"model"``.
    """
    if checksums is None:
        checksums = kind != "model"
    sums = array_checksums(tree) if checksums else None  # every process: gathering may be collective
    with writing(path, kind) as tmp:
        write_arrays(tmp / PARAMS_DIR, tree)
        if _is_primary():
            for name, content in files.items():
                _write_json(tmp / name, content)
            if sums is not None:
                _write_json(tmp / CHECKSUMS_NAME, {"algorithm": "sha256", "arrays": sums})
    return _abs(path)


def _marker(kind: str) -> dict[str, Any]:
    """What makes a directory ours: format, version, kind and how its arrays are checked."""
    return {"format": FORMAT, "version": VERSION, "kind": kind, "integrity": INTEGRITY}


@contextlib.contextmanager
def writing(path: str | os.PathLike, kind: str = "model") -> Iterator[Path]:
    """Build a flexmoe directory atomically: yields a hidden temporary directory to fill.

    On a normal exit the marker is written, everything fsynced and the directory renamed into
    place at ``path``. If the block raises, nothing is left behind and ``path`` is as it was; a
    write the filesystem refused (disk full, quota, permissions) becomes :class:`CheckpointWriteError`.
    Refuses to replace anything that is not a flexmoe directory. Every process of a multi-host
    job enters it; only process 0 touches the filesystem outside Orbax.
    """
    path = _abs(path)
    if path.name in ("", ".", ".."):
        raise UserError(f"cannot save a checkpoint at {path}: give a directory name")
    if storage.is_remote(path):
        with _writing_generation(path, _marker(kind)) as tmp:
            yield tmp
        return
    primary = _is_primary()
    _prepare(path, primary)
    tmp = _tmp_path(path)
    try:
        if primary:
            tmp.mkdir()
        _barrier("created")
        yield tmp
        if primary:
            _write_json(tmp / MARKER_NAME, _marker(kind))
            _fsync_tree(tmp)
            _swap_into_place(tmp, path)
    except BaseException as failure:
        _fail(path, tmp, failure, primary)
        raise
    _barrier("published")


def _prepare(path: Path, primary: bool) -> None:
    """Settle ``path`` (finish an interrupted save) and check it may be replaced."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save to {path}: parent directory {path.parent} does not exist")
    if primary:
        _recover_interrupted(path)
    _barrier("prepared")  # every process now sees the same, settled directory
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"refusing to overwrite {path}: it is a file, not a checkpoint directory")
    if path.is_dir() and any(path.iterdir()) and not _is_ours(path):
        raise FileExistsError(f"refusing to overwrite {path}: it is not a flexmoe checkpoint "
                              f"(no {MARKER_NAME}); choose another path or remove it yourself")


def _fail(path: Path, tmp: Path, failure: BaseException, primary: bool) -> None:
    """After a failed write: leave the old checkpoint (or nothing) at ``path`` and no temporaries.

    Returns for the caller to re-raise ``failure``; raises :class:`CheckpointWriteError` instead
    when the filesystem refused the write.
    """
    io = _write_failure(failure, tmp)
    if primary:
        def remove() -> bool:
            found = _tmp_path(path).exists() or _old_path(path).exists()
            _recover_interrupted(path)
            return found

        try:
            if io is None:
                _recover_interrupted(path)
            else:  # Orbax's other writers may still be finishing theirs
                remove_leftovers(remove)
        except OSError as e:
            log.warning("could not clean up after the failed save to %s: %s", path, e)
    if io is None:
        return
    code, reason = io
    before = (f"the previous checkpoint at {path} is unchanged" if _is_ours(path)
              else f"nothing was written at {path}")
    err = CheckpointWriteError(f"cannot write the checkpoint {path}: {reason}; the partial write was "
                               f"removed and {before}. To fix: {io_fix(code, path.parent)}, then rerun "
                               "the same command")
    err.errno = code
    raise err from failure


# ----------------------------------------------------------------------------
# Find and describe
# ----------------------------------------------------------------------------

def _checkpoint_dir(path: str | os.PathLike) -> Path:
    """The directory to read for ``path``, or a clear error saying what is wrong with it."""
    p = _abs(path)
    if storage.is_remote(p):
        d = _current_generation_dir(p)
        _warn_if_uncoded(d)
        return d
    if p.is_dir() and _is_ours(p):
        _warn_if_uncoded(p)
        return p
    if not p.exists():
        old = _old_path(p)
        if old.is_dir() and _is_ours(old):
            # A crash between the two renames of a non-atomic replace: the previous
            # checkpoint is complete, just parked beside the path.
            log.warning("%s is missing; loading the previous checkpoint from %s "
                        "(a save was interrupted; the next save to %s restores it)", p, old, p)
            _warn_if_uncoded(old)
            return old
        if _tmp_path(p).exists():
            raise FileNotFoundError(f"no checkpoint at {p}: a save to it was interrupted before it "
                                    f"completed (only the temporary {_tmp_path(p)} exists)")
        raise FileNotFoundError(f"no checkpoint at {p}: the directory does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file, not a flexmoe checkpoint directory")
    entries = sorted(e.name for e in p.iterdir())
    if not entries:
        raise CheckpointError(f"{p} is an empty directory, not a flexmoe checkpoint")
    if all("tmp" in e for e in entries):
        raise CheckpointError(f"{p} holds only temporary files {entries} from an interrupted save; "
                              "it is not a complete checkpoint")
    if CONFIG_NAME in entries and any(e.endswith(".safetensors") or e.endswith(".safetensors.index.json")
                                      for e in entries):
        raise CheckpointError(f"{p} looks like a Hugging Face checkpoint, not a flexmoe one; "
                              "convert it with `flexmoe import-hf SRC OUT`")
    raise CheckpointError(f"{p} is not a flexmoe checkpoint (no {MARKER_NAME}); it contains {entries[:8]}")


def directory(path: str | os.PathLike) -> Path:
    """Where a checkpoint's files are: ``path`` itself locally, its current generation on object storage."""
    return _checkpoint_dir(path)


_WARNED_UNCODED: set[str] = set()


def _warn_if_uncoded(d: Path) -> None:
    """One warning per checkpoint written before integrity codes: damage to it cannot be detected."""
    if str(d) in _WARNED_UNCODED:
        return
    try:
        coded = json.loads((d / MARKER_NAME).read_text()).get("integrity") == INTEGRITY
    except (OSError, ValueError, AttributeError):
        return  # _read_config reports a damaged marker
    if not coded:
        _WARNED_UNCODED.add(str(d))
        log.warning("%s was written before checkpoints carried integrity codes: damage to its arrays cannot be "
                    "detected; load it and save it again with this version to add them", d)


def _read_config(d: Path) -> ModelConfig:
    try:
        marker = json.loads((d / MARKER_NAME).read_text())
    except ValueError as e:
        raise CheckpointError(f"{d / MARKER_NAME} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("version"), int):
        raise CheckpointError(f"{d / MARKER_NAME} does not describe a flexmoe checkpoint: {marker}")
    if marker["version"] > VERSION:
        raise CheckpointError(f"{d} was written by a newer flexmoe_jax (format version {marker['version']}, "
                              f"this one reads up to {VERSION}); upgrade flexmoe_jax")
    cfg = d / CONFIG_NAME
    if not cfg.is_file():
        raise CheckpointError(f"{d} is an incomplete flexmoe checkpoint: {CONFIG_NAME} is missing")
    try:
        return ModelConfig.from_json(cfg.read_text())
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg} is not a valid model config: {e}") from None


def kind(path: str | os.PathLike) -> str:
    """What a flexmoe directory holds: "model" (:func:`load`), "expert", "merged", "anchor_kit"."""
    marker = json.loads((_checkpoint_dir(path) / MARKER_NAME).read_text())
    return marker.get("kind", "model")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored with a checkpoint (reads only JSON; no arrays, no Orbax)."""
    return _read_config(_checkpoint_dir(path))


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` dict given to :func:`save` (``{}`` when none was given)."""
    f = _checkpoint_dir(path) / METADATA_NAME
    return json.loads(f.read_text()) if f.is_file() else {}


def recorded_checksums(path: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """The checksums recorded with a :func:`save_tree` directory, or None if it has none."""
    f = _checkpoint_dir(path) / CHECKSUMS_NAME
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
        return dict(data["arrays"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f} is not a valid checksum file ({e}); the checkpoint is damaged") from None


# ----------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------

def load_tree(path: str | os.PathLike, *, verify: bool = True, as_numpy: bool = False) -> tuple[dict[str, Any], Any]:
    """(JSON files by name, array tree) of anything :func:`save_tree` wrote.

    Arrays land on the first local device, or stay host numpy arrays with ``as_numpy=True``.
    ``verify`` checks them against the recorded checksums where the directory has them.
    """
    import jax

    d = _checkpoint_dir(path)
    recorded = recorded_checksums(d) if verify else None
    if as_numpy:
        tree = read_arrays(d / PARAMS_DIR, what=str(d))
    else:
        stored = _stored_arrays(d)
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), stored)
        tree = restore_targets.restore(d / PARAMS_DIR, target, str(d))
    if recorded is not None:
        check_checksums(array_checksums(tree), recorded, str(d))
    files = {f.name: json.loads(f.read_text()) for f in sorted(d.glob("*.json"))
             if f.name not in (MARKER_NAME, CHECKSUMS_NAME)}
    return files, tree


def _stored_arrays(d: Path) -> Any:
    """Orbax's per-array metadata tree (shape, dtype), read without touching the data."""
    from flexmoe_jax import array_store

    if not (d / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{d} is an incomplete flexmoe checkpoint: {PARAMS_DIR}/ is missing")
    return array_store.stored_metadata(d / PARAMS_DIR, str(d))


def _checked(path: str | os.PathLike) -> tuple[Path, ModelConfig, Any]:
    """Checkpoint dir, its config, and its stored array metadata, verified to agree."""
    from flexmoe_jax import model as model_lib

    d = _checkpoint_dir(path)
    if kind(d) == MERGED_KIND:
        raise CheckpointError(f"{d} is a merged model (one array directory per expert); load it with "
                              "flexmoe_jax.loading.load (which can also leave experts out)")
    if kind(d) != "model":
        raise CheckpointError(f"{d} holds a {kind(d)!r}, not a full model: an expert deliverable has only the "
                              "tensors its owner trained; merge it with its anchor, or read it with "
                              "checkpoint.load_tree")
    config = _read_config(d)
    stored = _stored_arrays(d)
    try:
        model_lib.check_params(config, stored, what="stored arrays")
    except ValueError as e:
        raise CheckpointError(f"checkpoint {d}: {CONFIG_NAME} and the arrays in {PARAMS_DIR}/ disagree "
                              f"(was {CONFIG_NAME} edited or copied from another model?): {e}") from None
    return d, config, stored


def load(path: str | os.PathLike, *, mesh: Mesh | None = None, shardings: Any = None,
         dtype: Any = None, verify: bool = True) -> tuple[ModelConfig, Any]:
    """``(config, params)`` of a checkpoint written by :func:`save`, restored straight into its layout.

    Placement: with ``mesh``, ``model.param_shardings(config, mesh)``; with ``shardings``, that tree
    (or one Sharding for all); otherwise the first local device. ``dtype`` casts every array (the
    config's ``param_dtype`` follows); by default a round trip is bit-identical. ``verify`` checks
    recorded checksums where there are any. A merged model raises :class:`CheckpointError`: load it
    (or any other kind) with :func:`flexmoe_jax.loading.load`.
    """
    from flexmoe_jax import model as model_lib

    d, config, stored = _checked(path)
    recorded = recorded_checksums(d) if verify else None
    if recorded is not None:
        # Verify the stored bytes (before any dtype cast), then restore into the wanted layout.
        check_checksums(array_checksums(read_arrays(d / PARAMS_DIR, what=str(d))), recorded, str(d))
    config, target = restore_targets.targets(config, stored, mesh, shardings, dtype)
    params = restore_targets.restore(d / PARAMS_DIR, target, str(d))
    model_lib.check_params(config, params, what=f"params restored from {d}")
    return config, params


def load_subtree(path: str | os.PathLike, keys: Iterable[str | Sequence[str]], *,
                 mesh: Mesh | None = None, shardings: Any = None, dtype: Any = None) -> dict:
    """Restore only some parameter subtrees, e.g. ``["embed", "layers/moe"]``; the rest is never read.

    Returns a nested dict of just those subtrees (same paths as in the full tree). ``mesh`` and
    ``dtype`` as in :func:`load`; ``shardings`` is a full tree (or one Sharding), pruned the same way.
    """
    if isinstance(keys, str):
        keys = [keys]
    key_paths = [restore_targets.key_path(k) for k in keys]
    if not key_paths:
        raise UserError("load_subtree needs at least one key")
    d, config, stored = _checked(path)
    _, target = restore_targets.targets(config, stored, mesh, shardings, dtype)
    return restore_targets.restore(d / PARAMS_DIR, restore_targets.prune(target, key_paths), str(d), partial=True)
