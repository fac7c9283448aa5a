"""Writing a checkpoint directory so that a crash never leaves a mix of old and new.

On a filesystem the directory is built in a hidden sibling (same parent, same filesystem),
fsynced, and renamed into place; replacing an existing one swaps the two in one
``renameat2(RENAME_EXCHANGE)`` call on Linux, elsewhere the old one is first renamed to a hidden
``.NAME.flexmoe-old`` sibling that loading falls back to and the next save puts back. On object
storage (``gs://``, no rename) a checkpoint is a pointer to its current generation (below). Write
failures become :class:`CheckpointWriteError` naming the cause and the fix (disk full, quota).
Used by :mod:`flexmoe_jax.checkpoint` (the format) and the merge and anchor-kit writers.
"""


from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from flexmoe_jax import storage
from flexmoe_jax.array_store import DATA_FILE_BYTES, CheckpointError, IntegrityError, read_arrays, write_arrays  # noqa: F401
from flexmoe_jax.errors import FlexmoeError

if TYPE_CHECKING:  # pragma: no cover
    pass

log = logging.getLogger(__name__)


MARKER_NAME = "flexmoe_checkpoint.json"
_TMP_SUFFIX = ".flexmoe-tmp"
_OLD_SUFFIX = ".flexmoe-old"


class CheckpointWriteError(FlexmoeError, OSError):
    """Writing a checkpoint failed (disk full, quota, size limit, permissions...).

    Raised only after the partial write was removed: whatever was at the path
    before (an older checkpoint, or nothing) is still there, intact. ``errno``
    is the operating system's error code when one is known.
    """


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def io_error(e: BaseException) -> tuple[int | None, str] | None:
    """``(errno, reason)`` when ``e`` (or what caused it) is a failed filesystem operation, else None.

    Python raises ``OSError``; tensorstore (under Orbax) raises ``ValueError`` with
    a status text ending in ``[os_error_code='28']``, so both are recognized.
    """
    import re

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            return e.errno, e.strerror or str(e)
        m = re.search(r"os_error_code='?(\d+)", str(e))
        if m:
            code = int(m.group(1))
            return code, os.strerror(code)
        e = e.__cause__ or e.__context__
    return None


def _write_failure(e: BaseException, tmp: Path) -> tuple[int | None, str] | None:
    """``io_error(e)`` if ``e`` is a failure to write under ``tmp`` (not, say, an input that cannot be read)."""
    if not isinstance(e, Exception) or isinstance(e, CheckpointError):
        return None
    io = io_error(e)
    if io is None:
        return None
    if io[0] in _DISK_FULL + (errno.EFBIG, errno.EROFS) or str(tmp) in str(e):
        return io
    return None


def remove_leftovers(remove: Callable[[], bool], *, quiet: float = 0.3, timeout: float = 30.0) -> None:
    """Clean up after a failed Orbax write: call ``remove`` until it has found nothing for ``quiet`` s.

    ``remove`` deletes the partial write and says whether there was any. A failed
    Orbax save raises at its first failed write while its other writers (Orbax's
    threads, which are waited for here, and tensorstore's own I/O threads, which
    cannot be) may still be creating files for a moment; what they leave must not
    outlive the cleanup. ``OSError`` from ``remove`` (a directory that filled up
    again while being deleted) counts as "found" and is retried until ``timeout``.
    """
    import threading
    import time

    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax."):
            try:
                t.join(max(deadline - time.monotonic(), 0))
            except Exception:  # noqa: BLE001 - Orbax's threads re-raise their own write error on join
                pass
    calm_since = time.monotonic()
    while True:
        try:
            found = remove()
        except OSError:
            if time.monotonic() > deadline:
                raise
            found = True
        now = time.monotonic()
        if found:
            calm_since = now
        elif now - calm_since >= quiet or now > deadline:
            return
        time.sleep(0.05)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def io_fix(code: int | None, where: str | os.PathLike) -> str:
    """What the user should do about a failed write under ``where`` (a sentence fragment)."""
    where = os.fspath(where)
    if code in _DISK_FULL:
        try:
            free = f" ({_human_bytes(shutil.disk_usage(where).free)} free now)"
        except OSError:
            free = ""
        return f"free space on the filesystem of {where}{free}"
    if code == errno.EFBIG:
        return (f"a file under {where} hit the file-size limit (`ulimit -f`) or the filesystem's largest "
                "file; raise the limit or use another filesystem")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {where} writable or use another directory"
    return f"fix the problem with {where}"


# ----------------------------------------------------------------------------
# Paths and small filesystem helpers
# ----------------------------------------------------------------------------

def _abs(path: str | os.PathLike) -> Path:
    # abspath (not resolve) so a symlinked checkpoint is replaced at the link's location; an
    # object-storage URL stays one (an etils.epath.Path).
    return storage.resolve(path)


def _tmp_path(path: Path) -> Path:
    # Deterministic (not random) so every process of a multi-host job agrees on it
    # and a leftover from a crash is found and removed by the next save.
    return path.parent / f".{path.name}{_TMP_SUFFIX}"


def _old_path(path: Path) -> Path:
    return path.parent / f".{path.name}{_OLD_SUFFIX}"


def _is_ours(path: Path) -> bool:
    return (path / MARKER_NAME).is_file()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` so the rename publishes durable data.

    The flushes run concurrently: each fsync waits for a journal commit (a few ms
    even for a file already flushed), and concurrent ones share commits. One at a
    time, the ~10 files of every Orbax tree cost tens of milliseconds each tree
    (a merged model has one per expert); together, about one commit. Every file is
    flushed before the directories, and all of it before the caller renames.
    """
    from concurrent.futures import ThreadPoolExecutor

    dirs: list[str] = []
    files: list[str] = []
    for dirpath, _, names in os.walk(root):
        dirs.append(dirpath)
        files += [os.path.join(dirpath, f) for f in names]
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(files)))) as pool:
        list(pool.map(_fsync_file, files))
        list(pool.map(lambda d: _fsync_dir(Path(d)), dirs))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text((obj if isinstance(obj, str) else json.dumps(obj, indent=2, sort_keys=True)) + "\n")


def _remove(path: Path) -> None:
    # A checkpoint path may be a symlink; swapping moves the link itself, and
    # rmtree refuses links.
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE).

    Returns False where the call is unavailable (other OS, old kernel or libc,
    a filesystem without support) so the caller falls back to two renames.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Publish the finished ``tmp`` directory at ``path``; old contents are deleted last."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        os.rename(tmp, path)  # rename onto a missing or empty directory is atomic
        _fsync_dir(path.parent)
        return
    if _exchange(tmp, path):
        leftover = tmp  # now holds the previous checkpoint
    else:
        leftover = _old_path(path)
        os.rename(path, leftover)
        os.rename(tmp, path)  # a crash just before this leaves the old one at leftover
    _fsync_dir(path.parent)  # the new checkpoint is durably in place before the old one goes
    _remove(leftover)


def _recover_interrupted(path: Path) -> None:
    """Undo what a crash during an earlier save left beside ``path``."""
    old, tmp = _old_path(path), _tmp_path(path)
    if old.exists():
        if not path.exists() and _is_ours(old):
            log.warning("restoring %s from %s (a previous save was interrupted)", path, old)
            os.rename(old, path)
        else:
            _remove(old)
    _remove(tmp)


def _is_primary() -> bool:
    import jax
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost
        multihost.sync_global_processes(f"flexmoe_checkpoint:{name}")


# ----------------------------------------------------------------------------
# Object storage: no rename, so a checkpoint is a pointer to its current generation
# ----------------------------------------------------------------------------
# gs://b/ckpt/flexmoe_checkpoint.json   the marker plus "generation": "g000002" (the pointer)
# gs://b/ckpt/g000002/...               the complete checkpoint, marker included
# A save writes the next generation in full, then replaces the pointer (one object write, which GCS
# and S3 publish all at once), then deletes the older generations. A crash at any point leaves the
# pointer naming a complete generation (or no pointer, and nothing that loads).

_GENERATION = re.compile(r"^g\d{6}$")


def _pointed_generation(path: Path) -> str | None:
    """The generation ``path``'s pointer names; "" for a marker without one (a generation itself, or
    a local checkpoint copied up as it is); None when there is no marker."""
    pointer = path / MARKER_NAME
    if not pointer.exists():
        return None
    try:
        gen = json.loads(pointer.read_text()).get("generation", "")
    except (ValueError, AttributeError):
        raise CheckpointError(f"{pointer} is not a valid checkpoint marker; the checkpoint is damaged") from None
    if gen != "" and not (isinstance(gen, str) and _GENERATION.match(gen)):
        raise CheckpointError(f"{pointer} names no valid generation ({gen!r}); the checkpoint is damaged")
    return gen


def _current_generation_dir(path: Path) -> Path:
    gen = _pointed_generation(path)
    if gen is None:
        entries = sorted(e.name for e in path.iterdir()) if path.exists() else []
        if not entries:
            raise FileNotFoundError(f"no checkpoint at {path}: nothing is stored there")
        if all(_GENERATION.match(e) for e in entries):
            raise FileNotFoundError(f"no checkpoint at {path}: a save to it was interrupted before it "
                                    f"completed (only the unpublished {entries} exist)")
        raise CheckpointError(f"{path} is not a flexmoe checkpoint (no {MARKER_NAME}); it contains {entries[:8]}")
    return path / gen if gen else path


@contextlib.contextmanager
def _writing_generation(path: Path, marker: dict) -> Iterator[Path]:
    """A checkpoint write on object storage: fill the next generation, then move the pointer to it
    (``marker``: what the pointer and the generation's own marker say, plus ``"generation"``)."""
    primary = _is_primary()
    _barrier("prepared")
    # Every process reads the same state before anyone writes (no process writes before "created").
    current = _pointed_generation(path)
    entries = [e.name for e in path.iterdir()] if path.exists() else []
    if current is None:
        alien = [e for e in entries if not _GENERATION.match(e)]
        if alien:
            raise FileExistsError(f"refusing to overwrite {path}: it is not a flexmoe checkpoint (no "
                                  f"{MARKER_NAME}; it holds {sorted(alien)[:8]}); choose another path")
    if current == "":
        raise FileExistsError(f"refusing to replace {path}: it is a checkpoint copied up without generations; "
                              "save to another path, or remove it first")
    # A new name every time, past any generation an interrupted save left: an object name is never
    # reused, so no reader can see a half-rewritten generation.
    gen = f"g{max([int(e[1:]) for e in entries if _GENERATION.match(e)], default=0) + 1:06d}"
    tmp = path / gen
    _barrier("created")
    try:
        yield tmp
        if primary:
            _write_json(tmp / MARKER_NAME, marker)
            storage.write_json(path / MARKER_NAME, {**marker, "generation": gen})
    except BaseException:
        if primary:
            try:
                storage.remove_tree(tmp)
            except OSError as e:
                log.warning("could not remove the unpublished %s: %s", tmp, e)
        raise
    if primary:
        for e in path.iterdir():
            if _GENERATION.match(e.name) and e.name != gen:
                try:
                    storage.remove_tree(e)
                except OSError as err:  # the new one is published; an old one left over only costs space
                    log.warning("could not remove the replaced %s: %s", e, err)
    _barrier("published")
