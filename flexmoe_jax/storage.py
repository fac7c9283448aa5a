"""Where files live: local paths and object storage (``gs://``, ``s3://``) behind one small API.

Every storage path the framework takes goes through :func:`resolve`: a local path becomes an
absolute :class:`pathlib.Path`, a URL an :class:`etils.epath.Path` (the path type Orbax and tfds use).
Both support the pathlib operations the rest of the code uses (``/``, ``exists``, ``read_text``,
``iterdir``, ...), so callers do not branch; the few things that differ (atomic publication, removal)
are here.

Object storage is reached through fsspec (``gcsfs`` for ``gs://``, in the ``gcs`` extra), not through
TensorFlow's file system: the same backend everywhere, and one that can be pointed at a local
emulator (``STORAGE_EMULATOR_HOST``); TensorFlow's GCS client cannot be (its endpoint is fixed).
TensorStore, which reads and writes the arrays, has its own GCS client (``TENSORSTORE_GCS_HTTP_URL``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Union

# etils.epath picks TensorFlow's file system for gs:// when TF is importable; fsspec is the one
# backend every gs:// path here is tested with (set before any path is made; the user may override).
os.environ.setdefault("EPATH_USE_TF", "false")

REMOTE_SCHEMES = ("gs://", "s3://")

AnyPath = Union[Path, Any]  # pathlib.Path or etils.epath.Path


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-storage URLs (``gs://bucket/...``, ``s3://...``)."""
    return os.fspath(path).startswith(REMOTE_SCHEMES)


def resolve(path: str | os.PathLike) -> AnyPath:
    """An absolute local :class:`Path` (``abspath``: a symlink stays a link), or an epath for a URL."""
    if is_remote(path):
        from etils import epath

        _check_backend(os.fspath(path))
        return epath.Path(os.fspath(path))
    return Path(os.path.abspath(os.fspath(path)))


def _check_backend(url: str) -> None:
    if url.startswith("gs://"):
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            raise ImportError(f"{url}: gs:// paths need gcsfs; "
                              "install it with pip install 'flexmoe_jax[gcs]'") from None


def write_text(path: AnyPath, text: str) -> None:
    """Replace ``path``'s content with ``text`` atomically: a reader sees the old or the new file.

    Local: a temporary sibling, fsynced, renamed over ``path``. Object storage: one object write,
    which GCS and S3 make visible all at once."""
    _replace(path, text.encode("utf-8"))


def _replace(path: AnyPath, data: bytes) -> None:
    """``path``'s content becomes ``data`` in one step (local: temporary sibling, fsync, rename)."""
    if is_remote(path):
        path.write_bytes(data)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes(path: str | os.PathLike | AnyPath, data: bytes) -> AnyPath:
    """Write ``data`` to ``path`` (local: atomically, fsynced; object storage: one upload), creating
    the parent directory. Returns the resolved path."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, data)
    return path


def write_json(path: str | os.PathLike | AnyPath, obj: Any, *, sort_keys: bool = True) -> AnyPath:
    """:func:`write_text` of ``obj`` as indented JSON (a str is written as it is), creating the parent
    directory; the one JSON writer of the project. Returns the resolved path."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, (obj if isinstance(obj, str) else json.dumps(obj, indent=2, sort_keys=sort_keys)) + "\n")
    return path


def remove_tree(path: AnyPath) -> None:
    """Delete a directory (or, on object storage, every object under the prefix); missing is fine."""
    if is_remote(path):
        if path.exists():
            path.rmtree()
        return
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def files(root: AnyPath) -> list[AnyPath]:
    """Every file under ``root``, recursively (object storage refuses ``**`` globs: listed level by level)."""
    if not is_remote(root):
        return [p for p in Path(root).rglob("*") if p.is_file()]
    out, todo = [], [root]
    while todo:
        for p in todo.pop().iterdir():
            (todo if p.is_dir() else out).append(p)
    return out


def size(path: AnyPath) -> int:
    """Bytes of one file."""
    return path.stat().st_size if not is_remote(path) else path.stat().length
