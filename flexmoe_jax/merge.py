"""Merging independently trained experts into one FlexOlmo, and taking experts out again.

- :func:`merge` (``flexmoe merge``): the anchor's shared tensors and public slot plus each owner's
  slot-1 FFN, router row and bias, stacked on the expert axis in the order given; every input is
  checked (anchor fingerprint, architecture, names, shapes, dtypes, checksums) before the output is
  published atomically. Raises :class:`MergeError` naming the expert and the fix.
- :func:`load`: a merged model with ``include`` / ``exclude`` applied at load (an excluded expert's
  array directory is never opened); :func:`include` / :func:`exclude` do the same on params in memory.
- :func:`read_manifest`, :func:`read_routing_stats`: the merged format's manifest and each kept
  expert's token counts for domain routing.

Why the bias is kept, where the public router row comes from, the on-disk layout and how reads
and writes are scheduled: docs/merge.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flexmoe_jax import checkpoint, model, selection, storage
from flexmoe_jax.config import ModelConfig, arch_diff
from flexmoe_jax.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
EXPERTS_DIR = "experts"
STATS_DIR = "routing_stats"
MERGED_FORMAT = "flexmoe_jax.merged"
FFN_LEAVES = ("gate", "up", "down")


class MergeError(UserError):
    """Experts that cannot be merged as given; the message names the expert and the fix."""


# ----------------------------------------------------------------------------
# Opt-in / opt-out on params in memory
# ----------------------------------------------------------------------------

def exclude(config: ModelConfig, params: model.Params, names: Sequence[str | int] | str,
            top_k: int | None = None) -> tuple[ModelConfig, model.Params]:
    """Physically remove the named experts (names or slot indices; see :mod:`flexmoe_jax.selection`)."""
    return selection.select(config, params, exclude=names, top_k=top_k)


def include(config: ModelConfig, params: model.Params, names: Sequence[str | int] | str,
            top_k: int | None = None) -> tuple[ModelConfig, model.Params]:
    """Keep only the named experts (the opt-in form of :func:`exclude`)."""
    return selection.select(config, params, include=names, top_k=top_k)


# ----------------------------------------------------------------------------
# Merge inputs
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class _Input:
    """One ``--expert`` argument, resolved (JSON only; no arrays read yet)."""

    arg: str                  # as given, for messages
    path: Path                # the deliverable dir, or the full model dir
    is_deliverable: bool
    config: ModelConfig       # the owner's 2-expert config
    manifest: dict            # deliverable manifest, or the model's metadata
    model_path: Path | None   # a full 2-expert model that carries router row 0, if any
    name: str = ""


def _is_flexmoe(p: Path) -> bool:
    return (p / checkpoint.MARKER_NAME).is_file()


def _resolve(arg: str | os.PathLike) -> _Input:
    """A deliverable dir, a run dir (``WORKDIR/expert`` preferred, else ``WORKDIR/model``) or a full model."""
    from flexmoe_jax import expert

    p = storage.resolve(arg)
    hint = ("give the expert's deliverable (WORKDIR/expert, written by flexmoe train-expert), its run "
            "directory WORKDIR, or its full model WORKDIR/model")
    if not p.exists():
        raise FileNotFoundError(f"expert {arg}: no such directory; {hint}")
    model_path = None
    if _is_flexmoe(p):
        target = p
    elif _is_flexmoe(p / "expert") or _is_flexmoe(p / "model"):  # a run directory
        target = p / "expert" if _is_flexmoe(p / "expert") else p / "model"
        if _is_flexmoe(p / "model") and checkpoint.kind(p / "model") == "model":
            model_path = p / "model"
    else:
        raise MergeError(f"expert {arg} is not an expert: it has no {checkpoint.MARKER_NAME} and no expert/ or "
                         f"model/ inside; {hint}")
    k = checkpoint.kind(target)
    if k == expert.DELIVERABLE_KIND:
        f = checkpoint.directory(target) / expert.MANIFEST_NAME
        try:
            manifest = json.loads(f.read_text())
            config = ModelConfig.from_dict(manifest["expert_config"])
        except FileNotFoundError:
            raise checkpoint.CheckpointError(f"expert {arg}: {f} is missing; the deliverable is incomplete "
                                             "(re-copy it from its owner)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise checkpoint.CheckpointError(f"expert {arg}: {f} is not a valid expert manifest ({e}); "
                                             "re-copy the deliverable from its owner") from None
        inp = _Input(str(arg), target, True, config, manifest, model_path)
        inp.name = str(manifest.get("name") or config.names[-1])
        return inp
    if k == checkpoint.MERGED_KIND:
        raise MergeError(f"expert {arg} is already a merged model; merge the original experts "
                         "(their deliverables or run directories) instead")
    if k != "model":
        raise MergeError(f"expert {arg} holds a {k!r} directory, not an expert; {hint}")
    config = checkpoint.load_config(target)
    if config.num_experts != 2:
        what = "a dense model" if not config.is_moe else f"a model with {config.num_experts} experts"
        raise MergeError(f"expert {arg} is {what}; an expert is the 2-expert (public + own) model that "
                         f"flexmoe train-expert writes; {hint}")
    inp = _Input(str(arg), target, False, config, checkpoint.load_metadata(target), target)
    inp.name = config.names[1]
    return inp


def _check_out(out: Path, anchor: Any, inputs: list[_Input], public_router: Any = None) -> None:
    """The output must not overlap an input: publishing it would replace or delete that input."""
    inside = [storage.resolve(anchor)] if not isinstance(anchor, tuple) else []
    if isinstance(public_router, (str, os.PathLike)) and public_router != "zeros":
        inside.append(storage.resolve(public_router))
    for inp in inputs:
        inside += [inp.path] + ([inp.model_path] if inp.model_path else [])
    for p in inside:
        if out == p or out in p.parents or p in out.parents:
            raise MergeError(f"--out {out} overlaps the input {p}: writing it would replace that input; "
                             "choose a new output directory")


def _check_config(anchor_config: ModelConfig, inp: _Input) -> None:
    diff = arch_diff(inp.config, anchor_config)
    if diff:
        raise MergeError(f"expert {inp.name!r} ({inp.arg}) has another architecture than the anchor: "
                         + ", ".join(f"{k}={a} vs anchor {b}" for k, (a, b) in diff.items())
                         + "; merge it with the anchor it was trained from, or retrain it against this one")
    if inp.config.num_experts != 2 or inp.config.names[0] != "public":
        raise MergeError(f"expert {inp.name!r} ({inp.arg}) was saved with experts {list(inp.config.names)}; "
                         "an expert is a 2-expert model (public, own) from flexmoe train-expert")


def _router_row0(source: Any, L: int, d: int, dtype) -> tuple[np.ndarray, str]:
    """``public_router`` given by the caller -> ([L, d] array, description for the manifest)."""
    if isinstance(source, str) and source == "zeros":
        return np.zeros((L, d), dtype), "zeros"
    if isinstance(source, (str, os.PathLike)):
        p = storage.resolve(source)
        if not _is_flexmoe(p) and _is_flexmoe(p / "model"):
            p = p / "model"
        if not p.exists():
            raise FileNotFoundError(f"public_router {source}: no such checkpoint; give a 2-expert model, a run "
                                    "directory, a merged model, or 'zeros'")
        cfg = checkpoint.load_config(p)
        if not cfg.is_moe or cfg.names[0] != "public":
            raise MergeError(f"public_router {source} has no public router row (experts {list(cfg.names)}); "
                             "give a 2-expert model, a run directory, a merged model, or 'zeros'")
        if checkpoint.kind(p) == checkpoint.MERGED_KIND:
            m = read_manifest(p)
            tree = checkpoint.read_arrays(checkpoint.directory(p) / m["experts"][0]["dir"],
                                          what=f"public_router {source}")
            row = np.asarray(tree["layers"]["moe"]["router"])[:, 0]
        else:
            row = np.asarray(checkpoint.load_subtree(p, "layers/moe/router")["layers"]["moe"]["router"])[:, 0]
        arr, desc = row, f"row 0 of {p}"
    else:
        arr, desc = np.asarray(source), "given as an array"
    if arr.shape != (L, d):
        raise MergeError(f"public_router ({desc}) has shape {arr.shape}; the public router row is [layers, "
                         f"d_model] = {(L, d)}")
    return np.ascontiguousarray(arr.astype(dtype)), desc


def _auto_router_row0(inputs: list[_Input], L: int, d: int, dtype) -> tuple[np.ndarray, str]:
    """The public row from the inputs that carry one (all must agree), else zeros if every owner used zeros."""
    found: list[tuple[np.ndarray, _Input]] = []
    for inp in inputs:
        if inp.model_path is not None:
            router = checkpoint.load_subtree(inp.model_path, "layers/moe/router")["layers"]["moe"]["router"]
            found.append((np.asarray(router)[:, 0], inp))
    for row, inp in found[1:]:
        if row.shape != found[0][0].shape or not _same_bits(row, found[0][0]):
            raise MergeError(f"experts {found[0][1].name!r} and {inp.name!r} were trained with different public "
                             "router rows (router row 0); choose one with public_router= (CLI --public_router): "
                             "a run directory or model whose row to use, or 'zeros'")
    if found:
        row, inp = found[0]
        _router_shape(row, L, d, inp)
        return np.ascontiguousarray(row.astype(dtype)), f"row 0 of {inp.model_path}"
    if inputs and all(inp.manifest.get("router_init") == "zeros" for inp in inputs):
        return np.zeros((L, d), dtype), "zeros (every expert was initialized with router_init=zeros)"
    raise MergeError("the public expert's router row is in none of the inputs: an expert deliverable carries "
                     "only its owner's row. Pass public_router= (CLI --public_router): any owner's run "
                     "directory or 2-expert model (WORKDIR/model) to take row 0 from, or 'zeros'; or give "
                     "run directories instead of bare deliverables")


def _router_shape(row: np.ndarray, L: int, d: int, inp: _Input) -> None:
    if row.shape != (L, d):
        raise MergeError(f"expert {inp.name!r} ({inp.arg}): router row 0 has shape {row.shape}, expected {(L, d)}")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality (NaN-safe, -0.0 != 0.0): what "frozen" means."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.reshape(-1).view(np.uint8),
                                                                        b.reshape(-1).view(np.uint8))


def _expert_dirname(slot: int, name: str) -> str:
    return f"{EXPERTS_DIR}/{slot:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:64]}"


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one expert slot's leaves: the 2-expert model's shapes with E = 1."""
    L, d, h = config.n_layers, config.d_model, config.mlp_hidden
    return {"gate": (L, 1, d, h), "up": (L, 1, d, h), "down": (L, 1, h, d), "router": (L, 1, d), "bias": (L, 1)}


def _slot_nbytes(config: ModelConfig, dtype: np.dtype) -> int:
    """Host bytes of one expert slot (with its bias): what the merge holds per expert in flight."""
    return sum(int(np.prod(s)) for s in _expected_shapes(config).values()) * np.dtype(dtype).itemsize


def _load_slot(inp: _Input, anchor_config: ModelConfig, dtype: np.dtype,
               anchor_sums: Callable[[], dict]) -> tuple[dict[str, np.ndarray], dict | None]:
    """The owner's slot as host arrays ``{gate, up, down, router[, bias]}`` (each ``[L, 1, ...]``).

    Also returns checksums already computed while verifying (keyed by leaf), so
    the merge does not hash the same bytes twice. ``anchor_sums()`` returns the
    anchor's per-array checksums (waiting for them): a full-model input's frozen
    tensors are compared with those rather than with the anchor's arrays, so the
    anchor need not stay in memory while experts are read.
    """
    where = f"expert {inp.name!r} ({inp.path})"
    if inp.is_deliverable:
        recorded = checkpoint.recorded_checksums(inp.path)
        tree = checkpoint.read_arrays(checkpoint.directory(inp.path) / checkpoint.PARAMS_DIR, what=where)
        flat = _flat(tree)
        if recorded is None:
            log.warning("%s has no recorded checksums (written by an older flexmoe_jax): a damaged array "
                        "cannot be detected", where)
            sums = None
        else:
            sums = checkpoint.array_checksums(tree)
            checkpoint.check_checksums(sums, recorded, where)
        expected = {f"layers/moe/{k}" for k in _expected_shapes(anchor_config)}
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
        want = _expected_shapes(anchor_config)[k]
        if v.shape != want:
            raise MergeError(f"{where}: layers/moe/{k} has shape {list(v.shape)}, the anchor needs {list(want)} "
                             "(layers, 1 expert, ...); it was trained for another model; "
                             "retrain it against this anchor")
        if v.dtype != dtype:
            raise MergeError(f"{where}: layers/moe/{k} is {v.dtype}, the anchor is {dtype}; experts must be "
                             "stored in the anchor's dtype")
    return slot, sums


def _model_slot(inp: _Input, tree: dict, anchor_sums: Callable[[], dict],
                where: str) -> tuple[dict[str, np.ndarray], dict]:
    """A full 2-expert model input: checked, and its slot 1 (with the slot's checksums) cut out.

    Every shared tensor and the public slot must be the anchor's, bit for bit.
    They are compared by sha256 with the anchor's checksums (which the merged
    manifest records anyway), and everything is hashed in one parallel pass:
    the shared tensors, slot 0 and slot 1 (whose sums the manifest reuses), plus
    the whole stored leaves if the model recorded checksums to verify.
    """
    recorded = checkpoint.recorded_checksums(inp.path)  # a model saved with checksums=True
    try:
        model.check_params(inp.config, tree, what=f"arrays of {where}")
    except ValueError as e:
        if recorded is None:
            raise MergeError(str(e)) from None
        # Damage is the likelier cause: let the checksums say which array.
        checkpoint.check_checksums(checkpoint.array_checksums(tree), recorded, where)
        raise MergeError(str(e)) from None
    flat = _flat(tree)
    moe = {k.rsplit("/", 1)[1]: v for k, v in flat.items() if k.startswith("layers/moe/")}
    slot = {k: np.ascontiguousarray(v[:, 1:2]) for k, v in moe.items()}
    todo = {k: v for k, v in flat.items() if recorded is not None or not k.startswith("layers/moe/")}
    todo.update({f"slot0/{k}": np.ascontiguousarray(v[:, 0]) for k, v in moe.items() if k in FFN_LEAVES})
    todo.update({f"slot1/{k}": v for k, v in slot.items()})
    sums = checkpoint.array_checksums(todo)
    del todo
    if recorded is not None:
        checkpoint.check_checksums({k: v for k, v in sums.items() if k in flat}, recorded, where)
    for k, want in anchor_sums().items():
        if k.startswith("layers/mlp/"):
            leaf = k.rsplit("/", 1)[1]
            if f"slot0/{leaf}" not in sums or not _same_sum(sums[f"slot0/{leaf}"], want):
                raise MergeError(f"{where}: its public expert slot 0 (layers/moe/{leaf}[:, 0]) differs from the "
                                 "anchor's FFN; slot 0 must stay frozen. It was trained with slot 0 unfrozen or "
                                 "against another anchor: retrain it with flexmoe train-expert on this anchor")
        elif k not in sums or not _same_sum(sums[k], want):
            raise MergeError(f"{where}: the shared tensor {k} differs from the anchor's; shared tensors must stay "
                             "frozen (bit-identical). Retrain it with flexmoe train-expert against this anchor")
    bias = moe.get("bias")
    if bias is not None and np.any(bias[:, 0] != 0):
        raise MergeError(f"{where}: the public slot's bias (layers/moe/bias[:, 0]) is not zero; slot 0 must stay "
                         "frozen. Retrain it with flexmoe train-expert against this anchor")
    return slot, {k: sums[f"slot1/{k}"] for k in slot}


def _same_sum(a: dict, b: dict) -> bool:
    """Two :func:`checkpoint.array_checksum` records of the same bytes, dtype and shape."""
    return (a["sha256"], a["dtype"], list(a["shape"])) == (b["sha256"], b["dtype"], list(b["shape"]))


def _flat(tree: Any) -> dict[str, Any]:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep="/")


def _prefixed(sums: dict, prefix: str) -> dict:
    return {f"{prefix}/{k}": v for k, v in sums.items()}


def _slot_sums(slot: dict[str, np.ndarray], known: dict | None) -> dict:
    """Checksums of a slot's stored leaves (``layers/moe/<leaf>``), reusing ones already computed.

    A checksum covers bytes, dtype and shape: the bytes of ``x`` and of
    ``x[:, None]`` agree, so only the recorded shape is adjusted.
    """
    known = known or {}
    todo = {k: v for k, v in slot.items() if k not in known}
    out = {k: dict(v) for k, v in checkpoint.array_checksums(todo).items()} if todo else {}
    for k, v in known.items():
        if k in slot:
            out[k] = {**v, "shape": list(slot[k].shape), "dtype": str(slot[k].dtype)}
    return _prefixed(out, "layers/moe")


# At small sizes every tree of a merge is in flight at once (see merge); the budget never goes below this.
MIN_MEMORY_BUDGET = 1 << 30


class _Stopped(Exception):
    """A worker gave up because the merge already failed elsewhere (never reaches the caller)."""


class _Budget:
    """At most ``limit`` bytes of merge inputs in host memory at once (read, not yet written).

    Why: a small merge's time is mostly fixed costs per Orbax tree (setup,
    metadata, fsyncs: ~30-80 ms each, one tree per expert), which only running
    the trees' reads and writes side by side hides, while a large merge must not
    hold every expert at once. One byte budget gives both. An item larger than
    the whole budget still runs, alone. Waiting ends with :class:`_Stopped`
    once ``stop`` is set.
    """

    def __init__(self, limit: int, stop: threading.Event):
        self._limit, self._used, self._stop = limit, 0, stop
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        with self._cond:
            while self._used and self._used + n > self._limit and not self._stop.is_set():
                self._cond.wait(0.05)
            if self._stop.is_set():
                raise _Stopped()
            self._used += n

    def give(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()


def _ffn_as_configured(config: ModelConfig, params: model.Params) -> bool:
    """Whether the anchor's FFN (what the merge slices into the public slot) has the config's shapes and one dtype."""
    L, d, h = config.n_layers, config.d_model, config.mlp_hidden
    want = {"gate": (L, d, h), "up": (L, d, h), "down": (L, h, d)}
    try:
        mlp = params["layers"]["mlp"]
        return all(np.shape(mlp[k]) == s for k, s in want.items()) and len({mlp[k].dtype for k in want}) == 1
    except (KeyError, TypeError, AttributeError):
        return False


# ----------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------

def merge(anchor: str | os.PathLike | tuple[ModelConfig, model.Params], experts: Sequence[str | os.PathLike],
          out: str | os.PathLike, *, top_k: int | None = None, names: Sequence[str] | None = None,
          keep_bias: bool = True, public_router: Any = None, progress: bool = False,
          routing_stats: Mapping[str, str | os.PathLike] | None = None, routing: str = "top_k") -> Path:
    """Merge experts trained against ``anchor`` into one MoE at ``out``; returns its absolute path.

    ``anchor``: the dense public checkpoint (or an in-memory ``(config, params)``).
    ``experts``: in slot order, each an expert deliverable dir, a run dir
    (``WORKDIR/expert`` is used, ``WORKDIR/model`` supplies the public router row)
    or a full 2-expert model (its shared tensors and slot 0 are checked against
    the anchor bit for bit). ``names`` renames the experts (default: each one's
    own name). ``top_k`` defaults to 2 (public plus one, what every expert was
    trained with), capped at the number of experts. ``keep_bias=False`` drops
    the learned biases as the reference does. ``public_router``: see the module
    docstring. Names, paths and configs are checked before any array is read,
    arrays as they are read (the fingerprint before any expert is written);
    ``out`` appears, complete, only if every check passed, and nothing is left
    behind otherwise. ``routing_stats``: ``{merged name or "public": FILE}`` overriding the routing
    stats found next to each input (see the module docstring). ``routing``: the merged config's
    default routing mode (``ModelConfig.routing``).
    """
    from tqdm import tqdm

    if isinstance(experts, (str, os.PathLike)):
        experts = [experts]
    if not experts:
        raise MergeError("give at least one expert to merge")
    out_path = storage.resolve(out)

    # 1. Resolve and check everything that needs only JSON.
    inputs = [_resolve(e) for e in experts]
    if names is not None:
        names = list(names)
        if len(names) != len(inputs):
            raise MergeError(f"{len(names)} names for {len(inputs)} experts; give one name per expert")
        for inp, n in zip(inputs, names):
            inp.name = str(n)
    seen: dict[Path, _Input] = {}
    for inp in inputs:
        if inp.path in seen:
            raise MergeError(f"expert {inp.path} is listed twice ({seen[inp.path].arg} and {inp.arg}); "
                             "give each expert once")
        seen[inp.path] = inp
    by_name: dict[str, _Input] = {}
    for inp in inputs:
        if inp.name == "public":
            raise MergeError(f"expert {inp.arg} is named 'public', the anchor's slot; rename it with "
                             "names=[...] (CLI --names)")
        if inp.name in by_name:
            raise MergeError(f"two experts are named {inp.name!r}: {by_name[inp.name].arg} and {inp.arg}; "
                             "names must be unique: rename one with names=[...] (CLI --names)")
        by_name[inp.name] = inp
    _check_out(out_path, anchor, inputs, public_router)
    stats_files = _stats_files(anchor, inputs, routing_stats)
    kit = _check_kits(anchor, inputs)
    if kit is not None:  # the kit's anchor and, unless given, its public row
        anchor = kit.anchor
        if public_router is None:
            public_router = kit.public_row()
    if isinstance(anchor, tuple):
        anchor_config, anchor_params = anchor
        anchor_desc: dict[str, Any] = {"path": None}
    else:
        anchor_config = checkpoint.load_config(anchor)
        anchor_params = None
        anchor_desc = {"path": str(storage.resolve(anchor))}
        if kit is not None:
            anchor_desc["kit"] = {"path": str(kit.path), "id": kit.kit_id, "router_init": kit.meta["router_init"]}
    if anchor_config.is_moe:
        raise MergeError(f"the anchor must be the dense public model (num_experts=0); "
                         f"{anchor_desc['path'] or 'the given anchor'} has experts {list(anchor_config.names)}")
    for inp in inputs:
        _check_config(anchor_config, inp)
        if inp.is_deliverable and not inp.manifest.get("anchor_fingerprint"):
            raise MergeError(f"expert {inp.name!r} ({inp.arg}) has no anchor_fingerprint in its manifest, so "
                             "nothing proves which anchor it was trained against; export it again with "
                             "flexmoe train-expert")
    norm = {inp.config.norm_topk_prob for inp in inputs}
    if len(norm) > 1:
        raise MergeError("the experts disagree on norm_topk_prob (" + ", ".join(
            f"{i.name}={i.config.norm_topk_prob}" for i in inputs) + "); they were trained with different routing")
    n_experts = 1 + len(inputs)
    if top_k is None:
        top_k = min(2, n_experts)
    if not 1 <= top_k <= n_experts:
        raise MergeError(f"top_k={top_k} must be between 1 and the {n_experts} merged experts")
    with_bias = keep_bias and any(inp.config.expert_bias for inp in inputs)
    config = anchor_config.replace(num_experts=n_experts, top_k=top_k, norm_topk_prob=norm.pop(),
                                   expert_names=("public", *(inp.name for inp in inputs)), expert_bias=with_bias,
                                   routing=routing)
    L, d = anchor_config.n_layers, anchor_config.d_model

    # 2. The anchor (read once) and the public router row.
    bar = tqdm(total=2 + len(inputs), desc="merge", unit="step", disable=not progress)
    bar.set_postfix_str("anchor")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if anchor_params is None:
        what, error = f"arrays of anchor {anchor_desc['path']}", checkpoint.CheckpointError
        anchor_params = checkpoint.read_arrays(checkpoint.directory(anchor_desc["path"]) / checkpoint.PARAMS_DIR,
                                               what=f"anchor {anchor_desc['path']}")
    else:
        import jax

        what, error = "anchor params", ValueError
        anchor_params = jax.tree.map(lambda x: np.ascontiguousarray(np.asarray(x)), anchor_params)
    timings["read anchor"] = time.perf_counter() - t

    def check_anchor(params: model.Params) -> None:
        try:
            model.check_params(anchor_config, params, what=what)
        except ValueError as e:
            raise error(str(e)) from None

    # Checking the anchor's arrays against its config traces the whole model: the largest
    # fixed cost of a small merge. A matching fingerprint proves the same (each owner took
    # it, over the config and every path, shape, dtype and byte, from an anchor that
    # passed this check when it was loaded), so the check runs here only when some input
    # records no fingerprint or the FFN the merge slices is not as configured, and later
    # only to explain a fingerprint that does not match.
    checked = not all(inp.manifest.get("anchor_fingerprint") for inp in inputs) \
        or not _ffn_as_configured(anchor_config, anchor_params)
    if checked:
        check_anchor(anchor_params)
    pdtype = anchor_params["layers"]["mlp"]["gate"].dtype
    if public_router is not None:
        row0, row0_desc = _router_row0(public_router, L, d, pdtype)
    else:
        row0, row0_desc = _auto_router_row0(inputs, L, d, pdtype)
    bar.update()

    # 3. Write: the shared tensors and the public slot (the anchor's), then one tree per
    # expert. Everything runs on worker threads: hashing the anchor (fingerprint and
    # per-array checksums), writing its two trees, and reading, verifying and writing each
    # expert. No expert is written before the fingerprint matched, and nothing is published
    # unless everything passed. A byte budget bounds what is held in memory: at small sizes
    # every tree is in flight at once (so their fixed costs overlap); at large ones the
    # anchor is freed once written and hashed before any expert is read, and the experts
    # then stream through, as many at a time as the anchor's bytes allow.
    from flexmoe_jax import expert

    shared = {k: v for k, v in anchor_params.items() if k != "layers"}
    shared["layers"] = {k: v for k, v in anchor_params["layers"].items() if k != "mlp"}
    public = {k: anchor_params["layers"]["mlp"][k][:, None] for k in FFN_LEAVES}
    public["router"] = row0[:, None]
    if with_bias:
        public["bias"] = np.zeros((L, 1), pdtype)
    anchor_bytes = sum(np.asarray(v).nbytes for v in _flat(anchor_params).values())
    slot_bytes = _slot_nbytes(anchor_config, pdtype)
    stop, fingerprint_ok = threading.Event(), threading.Event()
    budget = _Budget(max(anchor_bytes, 2 * slot_bytes, MIN_MEMORY_BUDGET), stop)
    budget.take(anchor_bytes)  # already read

    def write_slot(slot: int, inp: _Input, tmp: Path) -> dict:
        """Read, verify and write one owner's slot (on a worker thread); returns its manifest entry."""
        arrays, known = _load_slot(inp, anchor_config, pdtype, sums_future.result)
        bias_kept = "bias" in arrays and with_bias
        if not with_bias:
            arrays.pop("bias", None)
        elif "bias" not in arrays:
            arrays["bias"] = np.zeros((L, 1), pdtype)
        entry = {"name": inp.name, "slot": slot, "dir": _expert_dirname(slot, inp.name),
                 "source": str(inp.path), "kind": "deliverable" if inp.is_deliverable else "model",
                 "bias": "kept" if bias_kept else ("dropped" if inp.config.expert_bias else "none"),
                 "manifest": inp.manifest, "checksums": _slot_sums(arrays, known)}
        while not fingerprint_ok.wait(0.05):
            if stop.is_set():
                raise _Stopped()
        checkpoint.write_arrays(tmp / entry["dir"], {"layers": {"moe": arrays}})
        return entry

    def expert_slot(slot: int, inp: _Input, tmp: Path) -> dict:
        # A full-model input is read whole: budget all of it.
        n = slot_bytes if inp.is_deliverable else inp.config.num_params() * pdtype.itemsize
        budget.take(n)
        try:
            return write_slot(slot, inp, tmp)  # its arrays are freed on return, before the bytes are given back
        finally:
            budget.give(n)

    with checkpoint.writing(out_path, kind=checkpoint.MERGED_KIND) as tmp:
        (tmp / EXPERTS_DIR).mkdir()
        public_dir = _expert_dirname(0, "public")
        pool = ThreadPoolExecutor(max_workers=4 + min(len(inputs), 4), thread_name_prefix="flexmoe-merge")
        try:
            t = time.perf_counter()
            fp_future = pool.submit(expert.fingerprint, anchor_config, anchor_params)
            sums_future = pool.submit(checkpoint.array_checksums, anchor_params)
            anchor_writes = [pool.submit(checkpoint.write_arrays, tmp / checkpoint.PARAMS_DIR, shared),
                             pool.submit(checkpoint.write_arrays, tmp / public_dir, {"layers": {"moe": public}})]
            slots = [pool.submit(expert_slot, slot, inp, tmp) for slot, inp in enumerate(inputs, start=1)]
            fingerprint = fp_future.result()
            anchor_desc["fingerprint"] = fingerprint
            for inp in inputs:
                theirs = inp.manifest.get("anchor_fingerprint")
                if theirs is not None and theirs != fingerprint:
                    if not checked:
                        check_anchor(anchor_params)  # a damaged anchor: say so rather than blame the expert
                    raise MergeError(f"expert {inp.name!r} ({inp.arg}) was trained against another anchor: it "
                                     f"records anchor_fingerprint {str(theirs)[:16]}..., this anchor's is "
                                     f"{fingerprint[:16]}...; merge it with the anchor it was trained on, or "
                                     "retrain it against this one")
            fingerprint_ok.set()
            anchor_sums = sums_future.result()
            for w in anchor_writes:
                w.result()
            entries = [{"name": "public", "slot": 0, "dir": public_dir, "source": anchor_desc["path"],
                        "manifest": {"role": "the public anchor's FFN", "anchor_fingerprint": fingerprint,
                                     "router_row": row0_desc},
                        "checksums": _slot_sums(public, {k: anchor_sums[f"layers/mlp/{k}"] for k in FFN_LEAVES})}]
            # Written and hashed: free the anchor (when it was read here) to make room for the experts.
            del anchor_params, shared, public, fp_future, anchor_writes
            budget.give(anchor_bytes)
            timings["anchor: hash, write"] = time.perf_counter() - t
            bar.update()
            for future, inp in zip(slots, inputs):
                bar.set_postfix_str(inp.name)
                entries.append(future.result())
                bar.update()
            timings["experts: read, verify, write"] = time.perf_counter() - t - timings["anchor: hash, write"]
        except BaseException:
            stop.set()  # workers waiting for memory or for the fingerprint give up
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # nothing writes into tmp once it is published or removed
        manifest = {
            "format": MERGED_FORMAT, "version": 1, "anchor": anchor_desc, "top_k": top_k,
            "bias": "kept" if with_bias else ("dropped" if any(i.config.expert_bias for i in inputs) else "none"),
            "public_router": row0_desc,
            "shared": {"dir": checkpoint.PARAMS_DIR,
                       "checksums": {k: v for k, v in anchor_sums.items() if not k.startswith("layers/mlp/")}},
            "experts": entries,
        }
        for entry in entries:
            if entry["name"] in stats_files:
                entry["routing_stats"] = _copy_stats(stats_files[entry["name"]], entry["name"], tmp, config)
        (tmp / checkpoint.CONFIG_NAME).write_text(config.to_json() + "\n")
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        t = time.perf_counter()
    timings["publish (fsync, rename)"] = time.perf_counter() - t
    log.info("merged %s in phases (s): %s", out_path, {k: round(v, 2) for k, v in timings.items()})
    bar.close()
    return out_path


def _check_kits(anchor: Any, inputs: list[_Input]):
    """The anchor kit merged against (None for a plain anchor); every expert must have been trained
    against the same kit (its id in the expert's manifest), so that all share one public row."""
    from flexmoe_jax import anchor_kit

    kit = anchor_kit.open_kit(anchor) if not isinstance(anchor, tuple) and anchor_kit.is_kit(anchor) else None
    ids = {inp.name: inp.manifest.get("anchor_kit") for inp in inputs}
    if kit is not None:
        wrong = {n: i for n, i in ids.items() if i != kit.kit_id}
        if wrong:
            raise MergeError(f"experts {sorted(wrong)} were not trained against anchor kit {kit.path} (kit "
                             f"{kit.kit_id[:16]}...; theirs: {sorted({str(i)[:16] for i in wrong.values()})}): their "
                             "public router row may differ. Retrain them with train-expert --anchor KIT, or merge "
                             "against the plain anchor")
    elif len({i for i in ids.values() if i is not None}) > 1:
        raise MergeError("the experts were trained against different anchor kits (" + ", ".join(
            f"{n}: {str(i)[:16]}..." for n, i in ids.items()) + "); merge experts of one kit")
    return kit


def _stats_files(anchor: Any, inputs: list[_Input], given: Mapping | None) -> dict[str, tuple[Path, set | None]]:
    """{merged name: (routing-stats file, the names it may carry or None)} for every slot that has one:
    given, or found beside the input (then it must be that expert's own, by name)."""
    from flexmoe_jax import routing

    given = dict(given or {})
    unknown = set(given) - {"public", *(i.name for i in inputs)}
    if unknown:
        raise MergeError(f"routing_stats for {sorted(unknown)}, which are not among the merged experts "
                         f"{['public', *(i.name for i in inputs)]}")
    found: dict[str, tuple[Path, set | None]] = {}
    places = {"public": ([] if isinstance(anchor, tuple) else [Path(os.fspath(anchor))], {"public"})}
    for inp in inputs:
        own = {inp.name, str(inp.manifest.get("name") or inp.config.names[-1])}
        places[inp.name] = ([Path(os.path.abspath(inp.arg)), inp.path, inp.path.parent], own)
    for name, (dirs, own) in places.items():
        if name in given:
            f = Path(os.fspath(given[name]))
            if not f.is_file():
                raise FileNotFoundError(f"routing stats for {name!r}: no such file {f}; write it with "
                                        "`flexmoe routing-stats`")
            found[name] = (f, None)
            continue
        for d in dirs:
            if (d / routing.STATS_FILE).is_file():
                found[name] = (d / routing.STATS_FILE, own)
                break
    return found


def _copy_stats(src: tuple[Path, set | None], name: str, tmp: Path, config: ModelConfig) -> dict:
    """Copy one expert's routing stats into the merged model under its merged name; its manifest entry."""
    import hashlib

    from flexmoe_jax import routing

    path, own = src
    stats = routing.Stats.load(path)
    if own is not None and stats.name not in own:
        raise MergeError(f"{path}, found beside expert {name!r}, holds the routing stats of {stats.name!r}; pass "
                         f"the right file with routing_stats={{{name!r}: FILE}} (CLI --routing_stats {name}=FILE)")
    if stats.counts.shape[0] > config.vocab_size:
        raise MergeError(f"routing stats {path} for {name!r} count {stats.counts.shape[0]} token ids, more than "
                         f"the anchor's vocabulary ({config.vocab_size}): count with the anchor's tokenizer")
    rel = f"{STATS_DIR}/{name}.npz"
    dataclasses.replace(stats, name=name).save(tmp / rel)
    return {"file": rel, "sha256": hashlib.sha256((tmp / rel).read_bytes()).hexdigest(), "tokens": stats.tokens,
            "source": stats.source, "copied_from": str(path)}


def read_routing_stats(path: str | os.PathLike, names: Sequence[str]) -> dict:
    """The routing stats a merged model carries for the experts ``names`` (those it has), each checked
    against its sha256; ``{}`` for any other checkpoint."""
    import hashlib

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
            raise checkpoint.CheckpointError(f"{d}: routing stats of expert {e['name']!r} ({rs['file']}) are "
                                             "missing; the checkpoint is damaged (re-copy it)") from None
        if hashlib.sha256(data).hexdigest() != rs.get("sha256"):
            raise checkpoint.CheckpointError(f"{d}: routing stats of expert {e['name']!r} ({rs['file']}) do not "
                                             "match their recorded sha256; the checkpoint is damaged (re-copy it)")
        out[e["name"]] = routing.Stats.load(f)
    return out


# ----------------------------------------------------------------------------
# Load with opt-in / opt-out
# ----------------------------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a merged model (anchor, each expert's own manifest, checksums)."""
    d = checkpoint.directory(path)
    f = d / MANIFEST_NAME
    if checkpoint.kind(d) != checkpoint.MERGED_KIND:
        raise checkpoint.CheckpointError(f"{d} is not a merged model (kind {checkpoint.kind(d)!r})")
    try:
        m = json.loads(f.read_text())
        if m.get("format") != MERGED_FORMAT or not isinstance(m.get("experts"), list):
            raise UserError(f"format {m.get('format')!r}")
        return m
    except FileNotFoundError:
        raise checkpoint.CheckpointError(f"{d} is an incomplete merged model: {MANIFEST_NAME} is missing") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise checkpoint.CheckpointError(f"{f} is not a valid merged-model manifest ({e}); the checkpoint is "
                                         "damaged") from None


def _place(config: ModelConfig, params: model.Params, mesh, shardings) -> model.Params:
    """Host arrays -> jax.Arrays in the final layout (works for multi-host shardings too)."""
    import jax
    from jax.sharding import Sharding, SingleDeviceSharding

    if mesh is not None and shardings is not None:
        raise UserError("give either mesh or shardings, not both")
    if mesh is not None:
        shard_tree = model.param_shardings(config, mesh)
    elif isinstance(shardings, Sharding):
        shard_tree = jax.tree.map(lambda _: shardings, params)
    elif shardings is not None:
        shard_tree = shardings
    else:
        shard_tree = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), params)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
                        params, shard_tree)


def load(path: str | os.PathLike, *, include: Sequence[str | int] | None = None,
         exclude: Sequence[str | int] | None = None, top_k: int | None = None, mesh=None, shardings=None,
         dtype: Any = None, verify: bool = True) -> tuple[ModelConfig, model.Params]:
    """``(config, params)`` of any model checkpoint with only the wanted experts.

    ``include`` keeps only the named experts (names or slot indices), ``exclude``
    drops them; top-k is capped at the number kept unless ``top_k`` is given.
    For a merged model an excluded expert's directory is never opened: its
    arrays are neither read nor verified, so a deleted or damaged expert does
    not stop the others from loading. The kept experts are concatenated on the
    expert axis on the host and placed with ``model.param_shardings(config,
    mesh)`` (or ``shardings``, or the first local device). ``verify`` checks
    every array read against the manifest's sha256. Dense and plain
    (trainer-written) checkpoints load whole through ``checkpoint.load`` and
    are then sliced.
    """
    import jax

    if checkpoint.kind(path) != checkpoint.MERGED_KIND:
        config, params = checkpoint.load(path, dtype=dtype, verify=verify)
        if include is None and exclude is None and top_k is None:
            if mesh is None and shardings is None:
                return config, params
            return config, _place(config, jax.tree.map(np.asarray, params), mesh, shardings)
        if not config.is_moe:
            raise UserError(f"{path} is a dense model (num_experts=0): there are no experts to include or exclude")
        config, params = selection.select(config, params, include, exclude, top_k)
        return config, _place(config, jax.tree.map(np.asarray, params), mesh, shardings)

    d = checkpoint.directory(path)
    full = checkpoint.load_config(d)
    manifest = read_manifest(d)
    entries = manifest["experts"]
    if [e.get("name") for e in entries] != list(full.names):
        raise checkpoint.CheckpointError(f"{d}: {MANIFEST_NAME} lists experts {[e.get('name') for e in entries]} "
                                         f"but {checkpoint.CONFIG_NAME} has {list(full.names)}; the checkpoint "
                                         "is damaged")
    keep = selection.kept(full, include, exclude)
    config = selection.selected_config(full, keep, top_k)
    keep = keep if keep is not None else tuple(range(full.num_experts))

    def read(sub: str, recorded: dict, what: str) -> Any:
        tree = checkpoint.read_arrays(d / sub, what=what)
        if verify:
            checkpoint.check_checksums(checkpoint.array_checksums(tree), recorded, what)
        return tree

    params = read(manifest["shared"]["dir"], manifest["shared"]["checksums"], f"{d} (shared tensors)")
    shapes = model.param_shapes(config)["layers"]["moe"]
    moe = {k: np.empty(s.shape, s.dtype) for k, s in shapes.items()}  # filled one expert at a time
    for j, slot in enumerate(keep):
        e = entries[slot]
        what = f"{d}: expert {e['name']!r} ({e['dir']})"
        piece = read(e["dir"], e["checksums"], what)["layers"]["moe"]
        if set(piece) != set(moe):
            raise checkpoint.CheckpointError(f"{what} holds {sorted(piece)}, the config wants {sorted(moe)}; "
                                             "the checkpoint is damaged")
        for k, v in piece.items():
            if v.shape[:1] + v.shape[2:] != moe[k].shape[:1] + moe[k].shape[2:] or v.shape[1] != 1 \
                    or v.dtype != moe[k].dtype:
                raise checkpoint.CheckpointError(f"{what}: layers/moe/{k} is {v.dtype}{list(v.shape)}, the config "
                                                 f"wants one slot of {moe[k].dtype}{list(moe[k].shape)}; the "
                                                 "checkpoint is damaged")
            moe[k][:, j] = v[:, 0]
        del piece
    params["layers"]["moe"] = moe
    try:
        model.check_params(config, params, what=f"arrays of {d}")
    except ValueError as e:
        raise checkpoint.CheckpointError(str(e)) from None
    if dtype is not None:
        import jax.numpy as jnp

        dt = jnp.dtype(dtype)
        params = jax.tree.map(lambda x: x.astype(dt), params)
        config = config.replace(param_dtype=dt.name)
    return config, _place(config, params, mesh, shardings)
