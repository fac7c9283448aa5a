"""A data directory in a bucket, staged to local disk once per machine.

SentencePiece and the tfds / seqio readers open a data directory's files locally, and a pod's
workers each have their own disk. So a ``gs://`` data directory is copied to
``$FLEXMOE_DATA_CACHE`` (default ``~/.cache/flexmoe/data``) the first time a process on a machine
reads it, under a name made from the URL and its ``manifest.json`` (a rebuilt bucket copy is
staged afresh), and later processes reuse that copy. The copy is published by one rename: a crash
mid-copy leaves nothing that looks staged, and two processes staging at once both end up reading
one complete copy. Every command that reads ``--data_dir`` (and ``RunConfig.data_dir``) stages it;
building or registering data writes a local directory, which is then copied up as a whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from flexmoe_jax import storage
from flexmoe_jax.data.manifest import MANIFEST
from flexmoe_jax.errors import UserError


def cache_root() -> Path:
    return Path(os.environ.get("FLEXMOE_DATA_CACHE") or Path.home() / ".cache" / "flexmoe" / "data")


def stage(data_dir, log: Callable[[str], None] | None = print) -> str:
    """``data_dir`` as a local directory: itself when local, else its staged copy (made if missing)."""
    if not storage.is_remote(data_dir):
        return str(data_dir)
    url = str(data_dir).rstrip("/")
    src = storage.resolve(url)
    try:
        manifest = (src / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise UserError(f"--data_dir {url}: no {MANIFEST} there, so it is not a FlexMix-mini data directory; "
                        "build one with `flexmoe data build` and copy the whole directory up") from None
    key = hashlib.sha256(url.encode() + b"\0" + manifest).hexdigest()[:16]
    dst = cache_root() / key
    if (dst / MANIFEST).is_file():
        return str(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=dst.parent))
    try:
        total = 0
        for f in storage.files(src):
            rel = str(f)[len(str(src)):].lstrip("/")
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            data = f.read_bytes()
            out.write_bytes(data)
            total += len(data)
        try:
            os.rename(tmp, dst)
        except OSError:  # another process published it first: use that copy
            if not (dst / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"staged {url} -> {dst} ({total / 2**20:.1f} MiB, {time.perf_counter() - t:.1f} s)")
    return str(dst)
