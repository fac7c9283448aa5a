"""Loading any checkpoint kind as ``(config, params)``, with experts opted in or out at load.

- :func:`load`: a plain (trainer-written or dense) checkpoint, or a merged model, with ``include`` /
  ``exclude`` / ``top_k`` (the rule is :mod:`flexmoe_jax.selection`'s). A merged model's excluded
  experts are never opened: their arrays are neither read nor verified.
- :func:`read_manifest`, :func:`read_routing_stats`: a merged model's manifest and the routing
  stats of its kept experts (checked against their sha256).

Errors: :class:`~flexmoe_jax.checkpoint.CheckpointError` for a damaged or incomplete checkpoint,
:class:`~flexmoe_jax.errors.UserError` for a selection the model does not allow. The merged
layout: docs/merge.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flexmoe_jax import checkpoint, checksums, model, restore_targets, selection, storage
from flexmoe_jax.checkpoint import CheckpointError
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError

MANIFEST_NAME = "manifest.json"
MERGED_FORMAT = "flexmoe_jax.merged"


def run_checkpoint(path: str | os.PathLike, *names: str) -> Path | None:
    """``path`` if it is a checkpoint, else the first ``path/<name>`` that is (a training run's
    ``model/``, an owner's ``expert/``), else None: the one "run directory -> checkpoint" rule."""
    p = storage.resolve(path)
    return next((c for c in (p, *(p / n for n in names)) if (c / checkpoint.MARKER_NAME).is_file()), None)


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a merged model (anchor, each expert's own manifest, checksums)."""
    d = checkpoint.directory(path)
    f = d / MANIFEST_NAME
    if checkpoint.kind(d) != checkpoint.MERGED_KIND:
        raise CheckpointError(f"{d} is not a merged model (kind {checkpoint.kind(d)!r})")
    try:
        m = json.loads(f.read_text())
        if m.get("format") != MERGED_FORMAT or not isinstance(m.get("experts"), list):
            raise UserError(f"format {m.get('format')!r}")
        return m
    except FileNotFoundError:
        raise CheckpointError(f"{d} is an incomplete merged model: {MANIFEST_NAME} is missing") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{f} is not a valid merged-model manifest ({e}); the checkpoint is "
                              "damaged") from None


def disclosures(path: str | os.PathLike) -> list[str]:
    """Warnings about what a merged model's manifest gives away of owners' data: routing stats
    released without a DP mechanism (exact counts: a membership oracle for the owner's strings) and
    the owner-side paths / counts older merges recorded. ``[]`` for any other checkpoint."""
    d = checkpoint.directory(path)
    if checkpoint.kind(d) != checkpoint.MERGED_KIND:
        return []
    out = []
    for e in read_manifest(d)["experts"]:
        rs = e.get("routing_stats")
        if not rs or e.get("name") == "public":
            continue
        if (rs.get("release") or {}).get("mechanism", "exact") == "exact":
            out.append(f"expert {e['name']!r} carries EXACT routing stats ({rs['file']}): anyone holding this model "
                       "can tell which strings (names, addresses, identifiers) its owner's data holds; re-merge "
                       "with privately released stats (flexmoe routing-stats, docs/privacy.md)")
        leaked = sorted(k for k in ("copied_from", "tokens") if k in rs)
        if leaked or {"documents", "tokens"} & set(rs.get("source") or {}):
            out.append(f"expert {e['name']!r}: the manifest records owner-side details of its routing stats "
                       f"({', '.join(leaked + sorted({'documents', 'tokens'} & set(rs.get('source') or {})))}); "
                       "re-merge with this version, which records none")
    return out


def read_routing_stats(path: str | os.PathLike, names: Sequence[str]) -> dict:
    """The routing stats a merged model carries for the experts ``names`` (those it has), each checked
    against its sha256; ``{}`` for any other checkpoint."""
    from flexmoe_jax import routing

    d = checkpoint.directory(path)
    if checkpoint.kind(d) != checkpoint.MERGED_KIND:
        return {}
    out = {}
    for e in read_manifest(d)["experts"]:
        rs = e.get("routing_stats")
        if e.get("name") not in names or not rs:
            continue
        f = d / rs["file"]
        try:
            data = f.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{d}: routing stats of expert {e['name']!r} ({rs['file']}) are "
                                  "missing; the checkpoint is damaged (re-copy it)") from None
        if hashlib.sha256(data).hexdigest() != rs.get("sha256"):
            raise CheckpointError(f"{d}: routing stats of expert {e['name']!r} ({rs['file']}) do not "
                                  "match their recorded sha256; the checkpoint is damaged (re-copy it)")
        out[e["name"]] = routing.Stats.load(f)
    return out


def _place(config: ModelConfig, params: model.Params, mesh=None, shardings=None) -> model.Params:
    """Host arrays -> jax.Arrays in the final layout (works for multi-host shardings too).

    ``mesh``: ``model.param_shardings(config, mesh)``; ``shardings``: that tree or one Sharding for
    all; neither: the first local device.
    """
    import jax

    shard_tree = restore_targets.placement(config, params, mesh, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
                        params, shard_tree)


def load(path: str | os.PathLike, *, include: Sequence[str | int] | None = None,
         exclude: Sequence[str | int] | None = None, top_k: int | None = None, mesh=None, shardings=None,
         dtype: Any = None, verify: bool = True) -> tuple[ModelConfig, model.Params]:
    """``(config, params)`` of any model checkpoint with only the wanted experts.

    ``include`` keeps only the named experts (names or slot indices), ``exclude`` drops them;
    top-k is capped at the number kept unless ``top_k`` is given. Arrays are placed with
    ``model.param_shardings(config, mesh)`` (or ``shardings``, or the first local device); ``dtype``
    casts them. ``verify`` checks every array read against its recorded sha256. A merged model
    reads only the kept experts' directories; a plain checkpoint loads whole and is then sliced.
    """
    if checkpoint.kind(path) != checkpoint.MERGED_KIND:
        return _load_plain(path, include, exclude, top_k, mesh, shardings, dtype, verify)
    d = checkpoint.directory(path)
    full = checkpoint.load_config(d)
    manifest = read_manifest(d)
    entries = manifest["experts"]
    if [e.get("name") for e in entries] != list(full.names):
        raise CheckpointError(f"{d}: {MANIFEST_NAME} lists experts {[e.get('name') for e in entries]} "
                              f"but {checkpoint.CONFIG_NAME} has {list(full.names)}; the checkpoint is damaged")
    keep = selection.kept(full, include, exclude)
    config = selection.selected_config(full, keep, top_k)
    keep = keep if keep is not None else tuple(range(full.num_experts))
    params = _read(d, manifest["shared"]["dir"], manifest["shared"]["checksums"], f"{d} (shared tensors)", verify)
    params["layers"]["moe"] = _read_experts(d, config, [entries[slot] for slot in keep], verify)
    try:
        model.check_params(config, params, what=f"arrays of {d}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if dtype is not None:
        import jax
        import jax.numpy as jnp

        dt = jnp.dtype(dtype)
        params = jax.tree.map(lambda x: x.astype(dt), params)
        config = config.replace(param_dtype=dt.name)
    return config, _place(config, params, mesh, shardings)


def _load_plain(path, include, exclude, top_k, mesh, shardings, dtype, verify) -> tuple[ModelConfig, model.Params]:
    """A checkpoint :func:`flexmoe_jax.checkpoint.load` reads, then sliced to the kept experts."""
    import jax

    config, params = checkpoint.load(path, dtype=dtype, verify=verify)
    if include is None and exclude is None and top_k is None:
        if mesh is None and shardings is None:
            return config, params
        return config, _place(config, jax.tree.map(np.asarray, params), mesh, shardings)
    if not config.is_moe:
        raise UserError(f"{path} is a dense model (num_experts=0): there are no experts to include or exclude")
    config, params = selection.select(config, params, include, exclude, top_k)
    return config, _place(config, jax.tree.map(np.asarray, params), mesh, shardings)


def _read(d: Path, sub: str, recorded: dict, what: str, verify: bool) -> Any:
    """One array directory of a merged model as host arrays, checked against ``recorded`` if ``verify``."""
    tree = checkpoint.read_arrays(d / sub, what=what)
    if verify:
        checksums.check_checksums(checksums.array_checksums(tree), recorded, what)
    return tree


def _read_experts(d: Path, config: ModelConfig, entries: list[dict], verify: bool) -> dict[str, np.ndarray]:
    """The ``layers/moe`` tree of ``config`` from the experts' directories (``entries``, in slot order)."""
    shapes = model.param_shapes(config)["layers"]["moe"]
    moe = {k: np.empty(s.shape, s.dtype) for k, s in shapes.items()}  # filled one expert at a time
    for j, e in enumerate(entries):
        what = f"{d}: expert {e['name']!r} ({e['dir']})"
        piece = _read(d, e["dir"], e["checksums"], what, verify)["layers"]["moe"]
        if set(piece) != set(moe):
            raise CheckpointError(f"{what} holds {sorted(piece)}, the config wants {sorted(moe)}; "
                                  "the checkpoint is damaged")
        for k, v in piece.items():
            if v.shape[:1] + v.shape[2:] != moe[k].shape[:1] + moe[k].shape[2:] or v.shape[1] != 1 \
                    or v.dtype != moe[k].dtype:
                raise CheckpointError(f"{what}: layers/moe/{k} is {v.dtype}{list(v.shape)}, the config "
                                      f"wants one slot of {moe[k].dtype}{list(moe[k].shape)}; the "
                                      "checkpoint is damaged")
            moe[k][:, j] = v[:, 0]
        del piece
    return moe
