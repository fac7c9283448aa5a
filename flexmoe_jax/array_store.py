"""Array trees on disk, every chunk carrying a crc32c that every read verifies.

Every array the project writes (models, anchors, dense experts, expert deliverables, merged models,
anchor kits, trainer states) goes through :func:`write_arrays` or :func:`checkpointer`: an Orbax PyTree
checkpoint in zarr v3 whose chunk codecs end in ``crc32c``. TensorStore computes the code when it
encodes a chunk and checks it whenever it decodes one, on any storage it reads (local disk, GCS) and
into any sharding (each process verifies exactly the chunks it reads). A flipped bit, an overwritten
byte or a cut file therefore fails the read itself, with nothing extra to hash: TensorStore's
hardware crc32c runs at memory speed (``bench/bench_integrity.py`` measures what it costs).

Orbax 0.12 writes zarr v3 with a crc32c on each shard's *index* only, not on the chunk data, and has
no option for more; :func:`_with_chunk_crc32c` appends the codec to the chunk codecs Orbax builds (a
tested, version-pinned hook: ``tests/test_integrity.py`` reads the stored codecs back). Reading needs
no hook: the codecs are stored with each array. Checkpoints written before this (zarr v2, no codes)
still load; :func:`has_codes` tells them apart for a one-line warning.

A failed read becomes a :class:`IntegrityError` naming the checkpoint, the damaged array(s) and the
fix; :func:`damaged_arrays` reads arrays one by one to list every damaged one (``flexmoe verify``).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import io
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flexmoe_jax.errors import UserError
from flexmoe_jax.storage import resolve

CODE = "crc32c"

# Orbax's OCDBT store gathers the encoded chunks of a write into data files of this size
# before writing them, and chunks no array beyond it. At Orbax's default (2 GiB) a 1 GB
# array is one chunk: writing it holds a second, compressed copy in memory and encodes on
# one thread, and reading it back decodes the whole chunk beside the output array. At 64
# MiB both directions stream in chunks on every core (measured on an 822 MB array: write
# transient 730 -> 370 MB, read peak 2x -> ~1x the array). Arrays below it are unchanged;
# checkpoints written with any size read back alike.
DATA_FILE_BYTES = 64 << 20


class CheckpointError(UserError):
    """A directory that is not a complete flexmoe checkpoint, or one whose parts disagree."""


class IntegrityError(CheckpointError):
    """Stored array bytes that fail their integrity code (or are cut short): the copy is damaged."""

    def __init__(self, message: str, arrays: tuple[str, ...] = ()):
        super().__init__(message)
        self.arrays = arrays


@functools.cache
def _with_chunk_crc32c() -> None:
    """Make Orbax's zarr v3 chunks end in a crc32c codec (once per process)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as tu

    build = tu._build_zarr3_metadata

    @functools.wraps(build)
    def with_crc(*args, **kwargs):
        meta = build(*args, **kwargs)
        for codec in meta.get("codecs", []):
            inner = codec.get("configuration", {}).get("codecs") if codec.get("name") == "sharding_indexed" else None
            target = inner if inner is not None else meta["codecs"]
            if not any(c.get("name") == CODE for c in target):
                target.append({"name": CODE})
            break
        return meta

    tu._build_zarr3_metadata = with_crc


def pytree_handler(**kwargs):
    """Orbax's PyTree handler writing zarr v3 with chunk crc32c (reads any format)."""
    import orbax.checkpoint as ocp

    _with_chunk_crc32c()
    return ocp.PyTreeCheckpointHandler(use_zarr3=True, **kwargs)


def write_arrays(directory: str | Path, tree: Any) -> None:
    """One Orbax PyTree checkpoint of ``tree`` (jax or numpy arrays) at ``directory``; returns when on disk."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    leaves = jax.tree.leaves(tree)
    if leaves and all(type(x) is np.ndarray for x in leaves):
        # Orbax deep-copies host numpy arrays before writing them, to protect an *async* save from
        # the caller changing them meanwhile. This save is synchronous, so the copy would only double
        # the host memory and add a full memcpy (for a merge: the whole output once more).
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.ArrayHandler()))  # unused here; Orbax warns without one
        handler = pytree_handler(type_handler_registry=registry)
    else:
        handler = pytree_handler()
    # Synchronous: returns only after every array is on disk and Orbax has committed.
    ocp.Checkpointer(handler).save(resolve(directory), args=ocp.args.PyTreeSave(
        tree, ocdbt_target_data_file_size=DATA_FILE_BYTES))


def stored_metadata(directory: str | Path, what: str | None = None) -> Any:
    """Orbax's per-array metadata tree (shape, dtype), read without touching the data."""
    import orbax.checkpoint as ocp

    directory = resolve(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{what or directory}: the array directory {directory} is missing; the checkpoint "
                              "is incomplete (re-copy or rebuild it)")
    try:
        return ocp.PyTreeCheckpointer().metadata(directory).item_metadata.tree
    except Exception as e:  # noqa: BLE001 - Orbax raises many kinds; the path is what helps
        raise CheckpointError(f"{what or directory}: cannot read the array metadata in {directory} "
                              f"(re-copy the checkpoint from its source): {e}") from e


def has_codes(directory: str | Path) -> bool:
    """Whether the arrays at ``directory`` were written with integrity codes (zarr v3, chunk crc32c)."""
    import json

    f = resolve(directory) / "_METADATA"
    try:
        return bool(json.loads(f.read_text()).get("use_zarr3"))
    except (OSError, ValueError):
        return False


_ARRAY_IN_MESSAGE = re.compile(r'"([^"/]+)/c[/.]')
# What TensorStore says when stored bytes are not what was written: a failed crc32c ("Digest
# mismatch", DATA_LOSS), a file cut short (OUT_OF_RANGE, "Error reading"), a chunk that no longer
# decodes ("corrupt"). (Codec names would match every error: the TensorStore spec lists them.)
_DAMAGE = re.compile(r"DATA_LOSS|Digest mismatch|OUT_OF_RANGE|Error reading|corrupt|Unexpected end|truncat",
                     re.IGNORECASE)


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_damage(e: BaseException) -> bool:
    return any(_DAMAGE.search(str(x)) for x in _chain(e))


def _damage_error(e: BaseException, what: str, directory: Path, arrays: tuple[str, ...] = ()) -> IntegrityError:
    # Orbax wraps TensorStore's error ("DATA_LOSS: ... Digest mismatch ...") in a generic one: report the cause.
    cause = next((x for x in reversed(_chain(e)) if _DAMAGE.search(str(x))), e)
    if not arrays:
        arrays = tuple(m.replace(".", "/") for m in dict.fromkeys(_ARRAY_IN_MESSAGE.findall(str(cause))))
    where = f"array {', '.join(arrays)}" if arrays else "its arrays"
    detail = " ".join(str(cause).split())[:240]
    e = cause
    return IntegrityError(f"{what}: {where} in {directory} failed the integrity check (damaged, cut short or "
                          f"changed since it was written: {type(e).__name__}: {detail}); re-copy the checkpoint from "
                          "its source, or rerun the command that wrote it", arrays)


def restore(directory: str | Path, args: Any, what: str | None = None) -> Any:
    """Orbax restore of ``directory`` whose failures name the checkpoint and the damaged array."""
    import orbax.checkpoint as ocp

    directory = resolve(directory)
    what = what or str(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{what}: the array directory {directory} is missing; the checkpoint is "
                              "incomplete (re-copy or rebuild it)")
    # A failed read leaves Orbax's other reads in flight: they then fail against its closed event loop
    # (tracebacks printed from TensorStore's callback threads) and their coroutines are dropped
    # unawaited ("Exception ignored in: <coroutine ...>"). That is noise under the one error that
    # matters, so Python's stderr is held while reading: replayed if the read succeeds, dropped with
    # the noise if it fails (and file descriptor 2, which C++ writes to, is muted while it settles).
    with _Quiet() as quiet:
        try:
            return ocp.PyTreeCheckpointer().restore(directory, args=args)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - tensorstore/Orbax raise many kinds; what matters is which array
            quiet.failed()
            _settle()
            if _is_damage(e):
                err: CheckpointError = _damage_error(e, what, directory, _failing(directory, e))
            else:
                err = CheckpointError(f"{what}: cannot read the arrays in {directory} (files missing or "
                                      f"unreadable; re-copy them from the source): {type(e).__name__}: "
                                      f"{' '.join(str(e).split())[:300]}")
        gc.collect()
        _settle()
    raise err


class _Quiet:
    """The noise filter around reads, shared by every thread reading at once (a merge reads several
    checkpoints in parallel): the first reader in swaps Python's stderr for a buffer and installs a
    hook that drops unawaited-coroutine reports, the last one out puts both back and replays the
    buffer unless some read failed. After a failure, file descriptor 2 (which C++ threads write to
    directly) is muted until the last reader leaves."""

    _lock = threading.Lock()
    _depth = 0
    _saved: tuple = ()
    _buffer: io.StringIO | None = None
    _failed = False
    _fd: tuple = ()

    def __enter__(self) -> "_Quiet":
        with _Quiet._lock:
            if _Quiet._depth == 0:
                _Quiet._saved = (sys.stderr, sys.unraisablehook)
                _Quiet._buffer, _Quiet._failed, _Quiet._fd = io.StringIO(), False, ()
                sys.stderr = _Quiet._buffer
                sys.unraisablehook = _quiet_coroutines(_Quiet._saved[1])
            _Quiet._depth += 1
        return self

    def failed(self) -> None:
        with _Quiet._lock:
            _Quiet._failed = True
            if not _Quiet._fd:
                _Quiet._saved[0].flush()
                saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                _Quiet._fd = (saved, null)

    def __exit__(self, *exc) -> None:
        with _Quiet._lock:
            _Quiet._depth -= 1
            if _Quiet._depth:
                return
            real, hook = _Quiet._saved
            sys.stderr, sys.unraisablehook = real, hook
            if _Quiet._fd:
                saved, null = _Quiet._fd
                os.dup2(saved, 2)
                os.close(saved)
                os.close(null)
            if not _Quiet._failed and _Quiet._buffer.getvalue():
                real.write(_Quiet._buffer.getvalue())
            _Quiet._buffer, _Quiet._fd = None, ()


def _settle(timeout: float = 2.0) -> None:
    """Wait (briefly) for the reads a failed restore left running to finish."""
    deadline = time.monotonic() + timeout
    time.sleep(0.05)
    while time.monotonic() < deadline and any(t.name.startswith(("ThreadPoolExecutor", "asyncio"))
                                              and t.is_alive() and t is not threading.current_thread()
                                              for t in threading.enumerate()):
        time.sleep(0.05)


def _quiet_coroutines(hook):
    def quiet(unraisable):
        if not asyncio.iscoroutine(unraisable.object):
            hook(unraisable)
    return quiet


def read_arrays(directory: str | Path, what: str | None = None) -> Any:
    """Every array of the Orbax PyTree checkpoint at ``directory``, as verified host numpy arrays.

    No device copy: for tools that only move and check bytes (merging, hashing). A missing
    directory, a cut or damaged file is a :class:`CheckpointError` naming ``what`` (default: the
    directory) and, when damaged, the array.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    stored = stored_metadata(directory, what)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
    return restore(directory, ocp.args.PyTreeRestore(restore_args=args), what)


def state_error(e: BaseException, step_dir: Path) -> IntegrityError | None:
    """The error for a training state that fails its integrity check on resume (None: not damage)."""
    if isinstance(e, MemoryError) or not _is_damage(e):
        return None
    err = _damage_error(e, f"training state {step_dir}", step_dir / "state")
    return IntegrityError(str(err).replace("re-copy the checkpoint from its source, or rerun the command that wrote "
                                           "it", f"delete {step_dir} to resume from the step saved before it, or "
                                           "start the run again in a new directory"), err.arrays)


def _leaves(stored: Any) -> list[tuple[str, Any]]:
    """('a/b/0/c', metadata) for every stored array of an Orbax metadata tree (any containers)."""
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(stored)
    return [("/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path), leaf)
            for path, leaf in flat]


def array_names(directory: str | Path) -> list[str]:
    """The names ('a/b/c') of every array stored at ``directory``."""
    return [name for name, _ in _leaves(stored_metadata(directory))]


def damaged_arrays(directory: str | Path) -> list[str]:
    """Every array under ``directory`` whose stored bytes cannot be read back verified ('a/b/c' names).

    Reads the arrays one at a time (the others are Orbax placeholders, never read), so one damaged
    array does not hide another.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    directory = resolve(directory)
    stored = stored_metadata(directory)
    flat, treedef = jax.tree_util.tree_flatten(stored)
    names = [name for name, _ in _leaves(stored)]
    bad = []
    for i, name in enumerate(names):
        item = jax.tree_util.tree_unflatten(treedef, [m if j == i else ocp.PLACEHOLDER for j, m in enumerate(flat)])
        args = jax.tree_util.tree_unflatten(treedef, [ocp.RestoreArgs(restore_type=np.ndarray) if j == i
                                                      else ocp.PLACEHOLDER for j in range(len(flat))])
        try:
            ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(item=item, restore_args=args))
        except Exception:  # noqa: BLE001 - any failure to read it back verified is damage
            bad.append(name)
    return bad


def _failing(directory: Path, e: BaseException) -> tuple[str, ...]:
    """The damaged arrays: named by TensorStore's message when it does, else found one by one."""
    if any(_ARRAY_IN_MESSAGE.search(str(x)) for x in _chain(e)):
        return ()
    try:
        return tuple(damaged_arrays(directory))
    except Exception:  # noqa: BLE001 - the metadata itself is damaged: the caller's message says so
        return ()
