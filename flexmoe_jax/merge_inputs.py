"""The inputs of a merge, resolved and checked before any expert array is read.

Each ``--expert`` argument becomes an :class:`Input` (:func:`resolve`: a deliverable, a run directory
or a full 2-expert model); :func:`check_names`, :func:`check_out`, :func:`check_config`,
:func:`check_kits` and :func:`stats_files` check them from JSON alone; :func:`router_row0` /
:func:`auto_router_row0` find the public router row. Every failure is a :class:`MergeError` (or a
:class:`~flexmoe_jax.checkpoint.CheckpointError` for a damaged input) naming the expert and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from flexmoe_jax import checkpoint, expert, loading, storage
from flexmoe_jax.config import ModelConfig, arch_diff
from flexmoe_jax.errors import UserError


class MergeError(UserError):
    """Experts that cannot be merged as given; the message names the expert and the fix."""


@dataclasses.dataclass
class Input:
    """One ``--expert`` argument, resolved (JSON only; no arrays read yet)."""

    arg: str                  # as given, for messages
    path: Path                # the deliverable dir, or the full model dir
    is_deliverable: bool
    config: ModelConfig       # the owner's 2-expert config
    manifest: dict            # deliverable manifest, or the model's metadata
    model_path: Path | None   # a full 2-expert model that carries router row 0, if any
    name: str = ""


def is_flexmoe(p: Path) -> bool:
    return (p / checkpoint.MARKER_NAME).is_file()


def resolve(arg: str | os.PathLike) -> Input:
    """A deliverable dir, a run dir (``WORKDIR/expert`` preferred, else ``WORKDIR/model``) or a full model."""
    p = storage.resolve(arg)
    hint = ("give the expert's deliverable (WORKDIR/expert, written by flexmoe train-expert), its run "
            "directory WORKDIR, or its full model WORKDIR/model")
    if not p.exists():
        raise FileNotFoundError(f"expert {arg}: no such directory; {hint}")
    model_path = None
    target = loading.run_checkpoint(p, "expert", "model")  # a run directory: its deliverable, else its model
    if target is not None and target != p and is_flexmoe(p / "model") and checkpoint.kind(p / "model") == "model":
        model_path = p / "model"
    if target is None:
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
        inp = Input(str(arg), target, True, config, manifest, model_path)
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
    inp = Input(str(arg), target, False, config, checkpoint.load_metadata(target), target)
    inp.name = config.names[1]
    return inp


def check_names(inputs: list[Input], names: Sequence[str] | None) -> None:
    """Rename the inputs to ``names`` if given; each expert once, every name unique and not "public"."""
    if names is not None:
        names = list(names)
        if len(names) != len(inputs):
            raise MergeError(f"{len(names)} names for {len(inputs)} experts; give one name per expert")
        for inp, n in zip(inputs, names):
            inp.name = str(n)
    seen: dict[Path, Input] = {}
    for inp in inputs:
        if inp.path in seen:
            raise MergeError(f"expert {inp.path} is listed twice ({seen[inp.path].arg} and {inp.arg}); "
                             "give each expert once")
        seen[inp.path] = inp
    by_name: dict[str, Input] = {}
    for inp in inputs:
        if inp.name == "public":
            raise MergeError(f"expert {inp.arg} is named 'public', the anchor's slot; rename it with "
                             "names=[...] (CLI --names)")
        if inp.name in by_name:
            raise MergeError(f"two experts are named {inp.name!r}: {by_name[inp.name].arg} and {inp.arg}; "
                             "names must be unique: rename one with names=[...] (CLI --names)")
        by_name[inp.name] = inp


def check_out(out: Path, anchor: Any, inputs: list[Input], public_router: Any = None) -> None:
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


def check_config(anchor_config: ModelConfig, inp: Input) -> None:
    diff = arch_diff(inp.config, anchor_config)
    if diff:
        raise MergeError(f"expert {inp.name!r} ({inp.arg}) has another architecture than the anchor: "
                         + ", ".join(f"{k}={a} vs anchor {b}" for k, (a, b) in diff.items())
                         + "; merge it with the anchor it was trained from, or retrain it against this one")
    if inp.config.num_experts != 2 or inp.config.names[0] != "public":
        raise MergeError(f"expert {inp.name!r} ({inp.arg}) was saved with experts {list(inp.config.names)}; "
                         "an expert is a 2-expert model (public, own) from flexmoe train-expert")


def check_experts(anchor_config: ModelConfig, inputs: list[Input]) -> bool:
    """Every input fits the anchor and records its fingerprint; returns their common ``norm_topk_prob``."""
    for inp in inputs:
        check_config(anchor_config, inp)
        if inp.is_deliverable and not inp.manifest.get("anchor_fingerprint"):
            raise MergeError(f"expert {inp.name!r} ({inp.arg}) has no anchor_fingerprint in its manifest, so "
                             "nothing proves which anchor it was trained against; export it again with "
                             "flexmoe train-expert")
    norm = {inp.config.norm_topk_prob for inp in inputs}
    if len(norm) > 1:
        raise MergeError("the experts disagree on norm_topk_prob (" + ", ".join(
            f"{i.name}={i.config.norm_topk_prob}" for i in inputs) + "); they were trained with different routing")
    return norm.pop()


def check_kits(anchor: Any, inputs: list[Input]):
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


def stats_files(anchor: Any, inputs: list[Input], given: Mapping | None) -> dict[str, tuple[Path, set | None]]:
    """{merged name: (routing-stats file, the names it may carry or None)} for every slot that has one:
    given, or found beside the input (then it must be that expert's own, by name)."""
    from flexmoe_jax import routing

    given = dict(given or {})
    unknown = set(given) - {"public", *(i.name for i in inputs)}
    if unknown:
        raise MergeError(f"routing_stats for {sorted(unknown)}, which are not among the merged experts "
                         f"{['public', *(i.name for i in inputs)]}")
    found: dict[str, tuple[Path, set | None]] = {}
    places = {"public": ([] if isinstance(anchor, tuple) else [storage.resolve(anchor)], {"public"})}
    for inp in inputs:
        own = {inp.name, str(inp.manifest.get("name") or inp.config.names[-1])}
        places[inp.name] = ([storage.resolve(inp.arg), inp.path, inp.path.parent], own)
    for name, (dirs, own) in places.items():
        if name in given:
            f = storage.resolve(given[name])
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


def router_row0(source: Any, L: int, d: int, dtype) -> tuple[np.ndarray, str]:
    """``public_router`` given by the caller -> ([L, d] array, description for the manifest)."""
    if isinstance(source, str) and source == "zeros":
        return np.zeros((L, d), dtype), "zeros"
    if isinstance(source, (str, os.PathLike)):
        p = storage.resolve(source)
        if not is_flexmoe(p) and is_flexmoe(p / "model"):
            p = p / "model"
        if not p.exists():
            raise FileNotFoundError(f"public_router {source}: no such checkpoint; give a 2-expert model, a run "
                                    "directory, a merged model, or 'zeros'")
        cfg = checkpoint.load_config(p)
        if not cfg.is_moe or cfg.names[0] != "public":
            raise MergeError(f"public_router {source} has no public router row (experts {list(cfg.names)}); "
                             "give a 2-expert model, a run directory, a merged model, or 'zeros'")
        if checkpoint.kind(p) == checkpoint.MERGED_KIND:
            m = loading.read_manifest(p)
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


def auto_router_row0(inputs: list[Input], L: int, d: int, dtype) -> tuple[np.ndarray, str]:
    """The public row from the inputs that carry one (all must agree), else zeros if every owner used zeros."""
    found: list[tuple[np.ndarray, Input]] = []
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


def _router_shape(row: np.ndarray, L: int, d: int, inp: Input) -> None:
    if row.shape != (L, d):
        raise MergeError(f"expert {inp.name!r} ({inp.arg}): router row 0 has shape {row.shape}, expected {(L, d)}")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality (NaN-safe, -0.0 != 0.0): what "frozen" means."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.reshape(-1).view(np.uint8),
                                                                        b.reshape(-1).view(np.uint8))
