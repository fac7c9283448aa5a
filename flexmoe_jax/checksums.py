"""sha256 checksums of arrays: computing them and comparing them with recorded ones.

A record is ``{"sha256", "dtype", "shape"}`` per array, keyed by its ``a/b/c`` path in the tree.
Checkpoints store them in ``checksums.json``, merged models in their manifest (docs/checkpoints.md).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from flexmoe_jax.array_store import CheckpointError


def _host(x: Any) -> Any:
    """A C-contiguous host numpy copy (or view) of an array; gathers a multi-host jax.Array."""
    import numpy as np

    if hasattr(x, "is_fully_addressable") and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.ascontiguousarray(np.asarray(x))


def array_sha256(x: Any) -> str:
    """sha256 of an array's raw bytes (C order); dtype and shape are recorded beside it."""
    arr = _host(x)
    return hashlib.sha256(arr.reshape(-1).view("uint8")).hexdigest()


def array_checksum(x: Any) -> dict[str, Any]:
    """The record of one array: ``{"sha256", "dtype", "shape"}``."""
    arr = _host(x)
    return {"sha256": array_sha256(arr), "dtype": str(arr.dtype), "shape": list(arr.shape)}


def array_checksums(tree: Any) -> dict[str, dict[str, Any]]:
    """``{"a/b/c": {"sha256", "dtype", "shape"}}`` for every array of a nested dict (hashed in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    from flax import traverse_util

    flat = {k: _host(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
    with ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 1)) as pool:
        futures = {k: pool.submit(array_checksum, v) for k, v in flat.items()}
        return {k: f.result() for k, f in sorted(futures.items())}


def same_checksum(a: dict, b: dict) -> bool:
    """Two records of the same bytes, dtype and shape."""
    return (a["sha256"], a["dtype"], list(a["shape"])) == (b["sha256"], b["dtype"], list(b["shape"]))


def check_checksums(sums: dict[str, dict[str, Any]], recorded: dict[str, dict[str, Any]], what: str) -> None:
    """Compare :func:`array_checksums` of what was read with the recorded ones.

    Raises a :class:`CheckpointError` naming the first array that is missing,
    extra, or whose dtype, shape or bytes differ.
    """
    missing = sorted(set(recorded) - set(sums))
    extra = sorted(set(sums) - set(recorded))
    if missing or extra:
        raise CheckpointError(f"{what}: the stored arrays do not match the recorded checksums "
                              f"(missing {missing[:4]}, unexpected {extra[:4]}); the checkpoint was changed "
                              "after it was written: re-copy it from its source")
    for k in sorted(recorded):
        want, have = recorded[k], sums[k]
        if [want.get("dtype"), list(want.get("shape", []))] != [have["dtype"], have["shape"]]:
            raise CheckpointError(f"{what}: array {k} is {have['dtype']}{have['shape']} but was written as "
                                  f"{want.get('dtype')}{want.get('shape')}; re-copy the checkpoint from its source")
        if want.get("sha256") != have["sha256"]:
            raise CheckpointError(f"{what}: array {k} is damaged or was modified after it was written "
                                  f"(sha256 {have['sha256'][:16]}... != recorded {str(want.get('sha256'))[:16]}...); "
                                  "re-copy the checkpoint from its source")
