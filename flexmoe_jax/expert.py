"""Coordinated independent expert training: upcycling the public anchor.

An owner starts from the public dense model (the anchor) and upcycles it into
a 2-expert MoE: slot 0 is the public FFN, slot 1 the owner's new expert, both
exact copies of the public FFN; router row 0 is the public domain embedding and
row 1 the owner's. Only slot 1's FFN, its router row and its bias train (see
:data:`TRAINABLE`); everything else stays bit-identical to the anchor, which is
what lets the model builder merge experts trained apart.
"""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np

from flexmoe_jax import checkpoint, model, optim, train
from flexmoe_jax.config import INFERENCE_FIELDS, ModelConfig
from flexmoe_jax.errors import UserError

# Expert training updates slot 1 only (its FFN, router row and bias): the trainer's rule, one place.
TRAINABLE = train.split_for("expert")


def upcycle(anchor_config: ModelConfig, anchor_params: model.Params, name: str,
            router_rows: np.ndarray | None = None, expert_bias: bool = True,
            bias_init: float = 0.0) -> tuple[ModelConfig, model.Params]:
    """Dense anchor -> 2-expert FlexOlmo (public, ``name``), top-2 of 2.

    ``router_rows`` is ``[L, 2, d]`` (row 0 public, row 1 this domain; see
    ``flexmoe_jax.router_init``); default zeros, which gives equal weights. ``bias_init``: the new
    expert's router bias (<= 0; the public slot's stays 0).
    """
    if bias_init > 0 or (bias_init and not expert_bias):
        raise UserError(f"bias_init={bias_init} must be <= 0, and needs expert_bias")
    if anchor_config.is_moe:
        raise UserError(f"the anchor must be a dense model (num_experts=0); this one has experts "
                        f"{list(anchor_config.names)}")
    if name == "public":
        raise UserError("the new expert cannot be called 'public': that name is the anchor's slot")
    model.check_params(anchor_config, anchor_params, "anchor params")
    config = anchor_config.replace(num_experts=2, top_k=2, expert_names=("public", name), expert_bias=expert_bias)
    L, d = anchor_config.n_layers, anchor_config.d_model
    if router_rows is None:
        router_rows = np.zeros((L, 2, d), np.dtype(anchor_config.param_dtype))
    if router_rows.shape != (L, 2, d):
        raise UserError(f"router_rows must be [layers, 2, d_model] = {(L, 2, d)}, got {router_rows.shape}")
    bias = None
    if expert_bias:
        bias = np.zeros((L, 2), np.asarray(router_rows).dtype)
        bias[:, 1] = bias_init
    params = model.upcycle_params(anchor_params, config, router_rows, bias)
    return config, params


def fingerprint(config: ModelConfig, params: model.Params) -> str:
    """sha256 of the config (without :data:`INFERENCE_FIELDS`, how a model routes at inference, so
    fingerprints recorded before those fields existed still match) and every parameter's path,
    dtype, shape and bytes."""
    desc = {k: v for k, v in config.to_dict().items() if k not in INFERENCE_FIELDS}
    h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode())
    for path, leaf in sorted(optim.flatten(params).items()):
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{path}|{arr.dtype}|{arr.shape}".encode())
        # A uint8 view of the contiguous array: the same bytes as ``tobytes()`` without copying them
        # (this hashes every anchor array at each merge).
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    return h.hexdigest()


DELIVERABLE_KIND = "expert"
MANIFEST_NAME = "manifest.json"


def save_deliverable(path, config: ModelConfig, trainable: optim.Flat, manifest: dict):
    """What an owner sends back: only the trained tensors (slot 1) plus a manifest.

    Arrays are stored under their model paths without the slot suffix
    (``layers/moe/gate`` is ``[L, 1, d, h]``); the manifest says which anchor
    (fingerprint) they were trained against, on what, and for how long.
    """
    keys = {k: optim.parse_slot_key(k) for k in trainable}
    if {slot for _, slot in keys.values()} != {1}:
        raise UserError(f"an expert deliverable holds slot 1 only; got {sorted(trainable)}")
    tree = optim.unflatten({base: trainable[k] for k, (base, _) in keys.items()})
    files = {MANIFEST_NAME: {**manifest, "name": config.names[1], "expert_config": config.to_dict(),
                             "trained": sorted(base for base, _ in keys.values())}}
    return checkpoint.save_tree(path, tree, files, kind=DELIVERABLE_KIND)


def load_deliverable(path) -> tuple[dict, model.Params]:
    """(manifest, trained tensors) of an expert deliverable."""
    if checkpoint.kind(path) != DELIVERABLE_KIND:
        raise UserError(f"{path} is a {checkpoint.kind(path)!r} checkpoint, not an expert deliverable")
    files, tree = checkpoint.load_tree(path)
    return files[MANIFEST_NAME], tree
