"""One owner's expert slot, read and verified as host arrays for a merge.

:func:`load_slot` reads a deliverable (checked against its recorded checksums) or cuts slot 1 out of
a full 2-expert model (whose shared tensors and public slot must be the anchor's, bit for bit);
:func:`slot_sums` gives the checksums the merged manifest records. Failures are :class:`MergeError`
or :class:`~flexmoe_jax.checkpoint.CheckpointError`, naming the expert.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from flexmoe_jax import checkpoint, checksums, model
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.merge_inputs import Input, MergeError

log = logging.getLogger(__name__)

FFN_LEAVES = ("gate", "up", "down")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one expert slot's leaves: the 2-expert model's shapes with E = 1."""
    L, d, h = config.n_layers, config.d_model, config.mlp_hidden
    return {"gate": (L, 1, d, h), "up": (L, 1, d, h), "down": (L, 1, h, d), "router": (L, 1, d), "bias": (L, 1)}


def slot_nbytes(config: ModelConfig, dtype: np.dtype) -> int:
    """Host bytes of one expert slot (with its bias): what the merge holds per expert in flight."""
    return sum(int(np.prod(s)) for s in expected_shapes(config).values()) * np.dtype(dtype).itemsize


def load_slot(inp: Input, anchor_config: ModelConfig, dtype: np.dtype,
               anchor_sums: Callable[[], dict]) -> tuple[dict[str, np.ndarray], dict | None]:
    """(the owner's slot as host arrays ``{gate, up, down, router[, bias]}``, each ``[L, 1, ...]``,
    the checksums computed while verifying them, keyed by leaf, or None).

    ``anchor_sums()`` returns (waiting for them) the anchor's per-array checksums, which a
    full-model input's frozen tensors are compared with (docs/merge.md).
    """
    where = f"expert {inp.name!r} ({inp.path})"
    if inp.is_deliverable:
        recorded = checkpoint.recorded_checksums(inp.path)
        tree = checkpoint.read_arrays(checkpoint.directory(inp.path) / checkpoint.PARAMS_DIR, what=where)
        flat = flat_tree(tree)
        if recorded is None:
            log.warning("%s has no recorded checksums (written by an older flexmoe_jax): a damaged array "
                        "cannot be detected", where)
            sums = None
        else:
            sums = checksums.array_checksums(tree)
            checksums.check_checksums(sums, recorded, where)
        expected = {f"layers/moe/{k}" for k in expected_shapes(anchor_config)}
        unexpected = sorted(set(flat) - expected)
        if unexpected:
            raise MergeError(f"{where} holds tensors an expert does not train: {unexpected}; only "
                             f"{sorted(expected)} belong in a deliverable")
        slot = {k.rsplit("/", 1)[1]: v for k, v in flat.items()}
        sums = {k.rsplit("/", 1)[1]: v for k, v in sums.items()} if sums else None
    else:
        tree = checkpoint.read_arrays(checkpoint.directory(inp.path) / checkpoint.PARAMS_DIR, what=where)
        slot, sums = _model_slot(inp, tree, anchor_sums, where)
        del tree
    missing = [k for k in ("gate", "up", "down", "router") if k not in slot]
    if missing:
        raise MergeError(f"{where} is missing layers/moe/{missing}; the deliverable is incomplete "
                         "(re-copy it from its owner)")
    for k, v in slot.items():
        want = expected_shapes(anchor_config)[k]
        if v.shape != want:
            raise MergeError(f"{where}: layers/moe/{k} has shape {list(v.shape)}, the anchor needs {list(want)} "
                             "(layers, 1 expert, ...); it was trained for another model; "
                             "retrain it against this anchor")
        if v.dtype != dtype:
            raise MergeError(f"{where}: layers/moe/{k} is {v.dtype}, the anchor is {dtype}; experts must be "
                             "stored in the anchor's dtype")
    return slot, sums


def _model_slot(inp: Input, tree: dict, anchor_sums: Callable[[], dict],
                where: str) -> tuple[dict[str, np.ndarray], dict]:
    """A full 2-expert model input: checked (every shared tensor and the public slot the anchor's, bit
    for bit, by sha256), and its slot 1 cut out with the slot's checksums."""
    recorded = checkpoint.recorded_checksums(inp.path)  # a model saved with checksums=True
    try:
        model.check_params(inp.config, tree, what=f"arrays of {where}")
    except ValueError as e:
        if recorded is None:
            raise MergeError(str(e)) from None
        # Damage is the likelier cause: let the checksums say which array.
        checksums.check_checksums(checksums.array_checksums(tree), recorded, where)
        raise MergeError(str(e)) from None
    flat = flat_tree(tree)
    moe = {k.rsplit("/", 1)[1]: v for k, v in flat.items() if k.startswith("layers/moe/")}
    slot = {k: np.ascontiguousarray(v[:, 1:2]) for k, v in moe.items()}
    todo = {k: v for k, v in flat.items() if recorded is not None or not k.startswith("layers/moe/")}
    todo.update({f"slot0/{k}": np.ascontiguousarray(v[:, 0]) for k, v in moe.items() if k in FFN_LEAVES})
    todo.update({f"slot1/{k}": v for k, v in slot.items()})
    sums = checksums.array_checksums(todo)
    del todo
    if recorded is not None:
        checksums.check_checksums({k: v for k, v in sums.items() if k in flat}, recorded, where)
    for k, want in anchor_sums().items():
        if k.startswith("layers/mlp/"):
            leaf = k.rsplit("/", 1)[1]
            if f"slot0/{leaf}" not in sums or not checksums.same_checksum(sums[f"slot0/{leaf}"], want):
                raise MergeError(f"{where}: its public expert slot 0 (layers/moe/{leaf}[:, 0]) differs from the "
                                 "anchor's FFN; slot 0 must stay frozen. It was trained with slot 0 unfrozen or "
                                 "against another anchor: retrain it with flexmoe train-expert on this anchor")
        elif k not in sums or not checksums.same_checksum(sums[k], want):
            raise MergeError(f"{where}: the shared tensor {k} differs from the anchor's; shared tensors must stay "
                             "frozen (bit-identical). Retrain it with flexmoe train-expert against this anchor")
    bias = moe.get("bias")
    if bias is not None and np.any(bias[:, 0] != 0):
        raise MergeError(f"{where}: the public slot's bias (layers/moe/bias[:, 0]) is not zero; slot 0 must stay "
                         "frozen. Retrain it with flexmoe train-expert against this anchor")
    return slot, {k: sums[f"slot1/{k}"] for k in slot}


def flat_tree(tree: Any) -> dict[str, Any]:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep="/")


def _prefixed(sums: dict, prefix: str) -> dict:
    return {f"{prefix}/{k}": v for k, v in sums.items()}


def slot_sums(slot: dict[str, np.ndarray], known: dict | None) -> dict:
    """Checksums of a slot's stored leaves (``layers/moe/<leaf>``), reusing the ``known`` ones (by leaf;
    only their recorded shape and dtype are adjusted to the slot's)."""
    known = known or {}
    todo = {k: v for k, v in slot.items() if k not in known}
    out = {k: dict(v) for k, v in checksums.array_checksums(todo).items()} if todo else {}
    for k, v in known.items():
        if k in slot:
            out[k] = {**v, "shape": list(slot[k].shape), "dtype": str(slot[k].dtype)}
    return _prefixed(out, "layers/moe")
