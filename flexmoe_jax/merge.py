"""Merging independently trained experts into one FlexOlmo (``flexmoe merge``).

:func:`merge` stacks the anchor's shared tensors and public slot plus each owner's slot-1 FFN,
router row and bias on the expert axis, in the order given, and publishes the result atomically
as a merged model (kind ``"merged"``: one array directory per expert, a manifest with every
checksum). Every input is checked first (:mod:`flexmoe_jax.merge_inputs`, :mod:`flexmoe_jax.merge_slots`);
a failure raises :class:`MergeError` naming the expert and the fix, and leaves nothing behind.
Load the result with :func:`flexmoe_jax.loading.load`. Layout, the bias, the public router row and
how reads and writes are scheduled: docs/merge.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flexmoe_jax import checkpoint, checksums, expert, loading, merge_inputs, merge_slots, model, storage
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.merge_inputs import Input, MergeError
from flexmoe_jax.merge_slots import FFN_LEAVES

log = logging.getLogger(__name__)

EXPERTS_DIR = "experts"
STATS_DIR = "routing_stats"
# At small sizes every tree of a merge is in flight at once (see merge); the budget never goes below this.
MIN_MEMORY_BUDGET = 1 << 30


def merge(anchor: str | os.PathLike | tuple[ModelConfig, model.Params], experts: Sequence[str | os.PathLike],
          out: str | os.PathLike, *, top_k: int | None = None, names: Sequence[str] | None = None,
          keep_bias: bool = True, public_router: Any = None, progress: bool = False,
          routing_stats: Mapping[str, str | os.PathLike] | None = None, routing: str = "top_k") -> Path:
    """Merge experts trained against ``anchor`` into one MoE at ``out``; returns its absolute path.

    ``anchor``: the dense public checkpoint, an anchor kit, or an in-memory ``(config, params)``.
    ``experts``: in slot order, each an expert deliverable, a run directory (``WORKDIR/expert``;
    ``WORKDIR/model`` supplies the public router row) or a full 2-expert model (checked against
    the anchor bit for bit). ``names`` renames them. ``top_k`` defaults to 2, capped at the number
    of experts. ``keep_bias=False`` drops the learned biases. ``public_router``: an ``[L, d]``
    array, ``"zeros"`` or a checkpoint to take row 0 from (default: from the inputs).
    ``routing_stats``: ``{merged name or "public": FILE}``, overriding the stats found beside each
    input. ``routing``: the merged config's default routing mode. ``out`` appears, complete, only
    if every check passed.
    """
    from tqdm import tqdm

    if isinstance(experts, (str, os.PathLike)):
        experts = [experts]
    if not experts:
        raise MergeError("give at least one expert to merge")
    out_path = storage.resolve(out)
    plan = _plan(anchor, experts, out_path, top_k, names, keep_bias, public_router, routing_stats, routing)

    bar = tqdm(total=2 + len(plan.inputs), desc="merge", unit="step", disable=not progress)
    bar.set_postfix_str("anchor")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    checked = _read_anchor(plan)
    timings["read anchor"] = time.perf_counter() - t
    L, d = plan.anchor_config.n_layers, plan.anchor_config.d_model
    pdtype = plan.anchor_params["layers"]["mlp"]["gate"].dtype
    if plan.public_router is not None:
        row0, row0_desc = merge_inputs.router_row0(plan.public_router, L, d, pdtype)
    else:
        row0, row0_desc = merge_inputs.auto_router_row0(plan.inputs, L, d, pdtype)
    bar.update()

    with checkpoint.writing(out_path, kind=checkpoint.MERGED_KIND) as tmp:
        entries, anchor_sums = _write_trees(tmp, plan, row0, row0_desc, checked, bar, timings)
        _write_manifest(tmp, plan, entries, anchor_sums, row0_desc)
        t = time.perf_counter()
    timings["publish (fsync, rename)"] = time.perf_counter() - t
    log.info("merged %s in phases (s): %s", out_path, {k: round(v, 2) for k, v in timings.items()})
    bar.close()
    return out_path


# ----------------------------------------------------------------------------
# 1. Plan: everything that needs only JSON
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class _Plan:
    """A merge's checked inputs and the merged config (no expert array read yet)."""

    inputs: list[Input]
    anchor_config: ModelConfig
    anchor_params: Any          # given in memory, or read by _read_anchor; released once written
    anchor_desc: dict           # the manifest's "anchor": path, fingerprint, kit
    config: ModelConfig         # the merged model's
    with_bias: bool
    public_router: Any
    stats_files: dict


def _plan(anchor, experts, out_path: Path, top_k, names, keep_bias, public_router, routing_stats,
          routing) -> _Plan:
    """Resolve every input and check names, paths and configs, before any array is read."""
    inputs = [merge_inputs.resolve(e) for e in experts]
    merge_inputs.check_names(inputs, names)
    merge_inputs.check_out(out_path, anchor, inputs, public_router)
    stats_files = merge_inputs.stats_files(anchor, inputs, routing_stats)
    kit = merge_inputs.check_kits(anchor, inputs)
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
    norm = merge_inputs.check_experts(anchor_config, inputs)
    n_experts = 1 + len(inputs)
    if top_k is None:
        top_k = min(2, n_experts)
    if not 1 <= top_k <= n_experts:
        raise MergeError(f"top_k={top_k} must be between 1 and the {n_experts} merged experts")
    with_bias = keep_bias and any(inp.config.expert_bias for inp in inputs)
    config = anchor_config.replace(num_experts=n_experts, top_k=top_k, norm_topk_prob=norm,
                                   expert_names=("public", *(inp.name for inp in inputs)), expert_bias=with_bias,
                                   routing=routing)
    return _Plan(inputs, anchor_config, anchor_params, anchor_desc, config, with_bias, public_router, stats_files)


# ----------------------------------------------------------------------------
# 2. The anchor
# ----------------------------------------------------------------------------

def _read_anchor(plan: _Plan) -> bool:
    """Read the anchor's arrays into ``plan`` (as host arrays); returns whether they were checked.

    The full check traces the whole model, so it runs only when some input records no fingerprint
    or the FFN to slice is not as configured; a matching fingerprint proves the same (docs/merge.md).
    """
    if plan.anchor_params is None:
        path = plan.anchor_desc["path"]
        plan.anchor_params = checkpoint.read_arrays(checkpoint.directory(path) / checkpoint.PARAMS_DIR,
                                                    what=f"anchor {path}")
    else:
        import jax

        plan.anchor_params = jax.tree.map(lambda x: np.ascontiguousarray(np.asarray(x)), plan.anchor_params)
    checked = not all(inp.manifest.get("anchor_fingerprint") for inp in plan.inputs) \
        or not _ffn_as_configured(plan.anchor_config, plan.anchor_params)
    if checked:
        _check_anchor(plan, plan.anchor_params)
    return checked


def _check_anchor(plan: _Plan, params: model.Params) -> None:
    """The anchor's arrays match its config (CheckpointError when read from disk, else ValueError)."""
    path = plan.anchor_desc["path"]
    what, error = (f"arrays of anchor {path}", checkpoint.CheckpointError) if path else ("anchor params", ValueError)
    try:
        model.check_params(plan.anchor_config, params, what=what)
    except ValueError as e:
        raise error(str(e)) from None


def _ffn_as_configured(config: ModelConfig, params: model.Params) -> bool:
    """Whether the anchor's FFN (what the merge slices into the public slot) has the config's shapes and one dtype."""
    L, d, h = config.n_layers, config.d_model, config.mlp_hidden
    want = {"gate": (L, d, h), "up": (L, d, h), "down": (L, h, d)}
    try:
        mlp = params["layers"]["mlp"]
        return all(np.shape(mlp[k]) == s for k, s in want.items()) and len({mlp[k].dtype for k in want}) == 1
    except (KeyError, TypeError, AttributeError):
        return False


def _check_fingerprint(plan: _Plan, fingerprint: str, unchecked: model.Params | None) -> None:
    """Every expert was trained against this anchor. On a mismatch the ``unchecked`` anchor params (if
    any) are checked first: a damaged anchor is named as such rather than the expert blamed."""
    for inp in plan.inputs:
        theirs = inp.manifest.get("anchor_fingerprint")
        if theirs is not None and theirs != fingerprint:
            if unchecked is not None:
                _check_anchor(plan, unchecked)
            raise MergeError(f"expert {inp.name!r} ({inp.arg}) was trained against another anchor: it "
                             f"records anchor_fingerprint {str(theirs)[:16]}..., this anchor's is "
                             f"{fingerprint[:16]}...; merge it with the anchor it was trained on, or "
                             "retrain it against this one")


# ----------------------------------------------------------------------------
# 3. Write: the arrays on worker threads, within a byte budget
# ----------------------------------------------------------------------------

class _Stopped(Exception):
    """A worker gave up because the merge already failed elsewhere (never reaches the caller)."""


class _Budget:
    """At most ``limit`` bytes of merge inputs in host memory at once (read, not yet written).

    An item larger than the whole budget still runs, alone. Waiting ends with :class:`_Stopped`
    once ``stop`` is set. Why a byte budget: docs/merge.md.
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


def _expert_dirname(slot: int, name: str) -> str:
    return f"{EXPERTS_DIR}/{slot:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:64]}"


class _SlotWriter:
    """Reads, verifies and writes each owner's slot (on worker threads) within the byte budget;
    no slot is written before :attr:`fingerprint_ok` is set."""

    def __init__(self, plan: _Plan, pdtype: np.dtype, anchor_bytes: int):
        self.plan, self.pdtype = plan, pdtype
        self.anchor_sums: Callable[[], dict] | None = None  # waits for the anchor's checksums
        self.stop, self.fingerprint_ok = threading.Event(), threading.Event()
        self.slot_bytes = merge_slots.slot_nbytes(plan.anchor_config, pdtype)
        self.budget = _Budget(max(anchor_bytes, 2 * self.slot_bytes, MIN_MEMORY_BUDGET), self.stop)
        self.budget.take(anchor_bytes)  # already read

    def __call__(self, slot: int, inp: Input, tmp: Path) -> dict:
        """Write one owner's slot into ``tmp``; returns its manifest entry."""
        # A full-model input is read whole: budget all of it.
        n = self.slot_bytes if inp.is_deliverable else inp.config.num_params() * self.pdtype.itemsize
        self.budget.take(n)
        try:
            return self._write(slot, inp, tmp)  # its arrays are freed on return, before the bytes are given back
        finally:
            self.budget.give(n)

    def _write(self, slot: int, inp: Input, tmp: Path) -> dict:
        with_bias = self.plan.with_bias
        arrays, known = merge_slots.load_slot(inp, self.plan.anchor_config, self.pdtype, self.anchor_sums)
        bias_kept = "bias" in arrays and with_bias
        if not with_bias:
            arrays.pop("bias", None)
        elif "bias" not in arrays:
            arrays["bias"] = np.zeros((self.plan.anchor_config.n_layers, 1), self.pdtype)
        entry = {"name": inp.name, "slot": slot, "dir": _expert_dirname(slot, inp.name),
                 "source": str(inp.path), "kind": "deliverable" if inp.is_deliverable else "model",
                 "bias": "kept" if bias_kept else ("dropped" if inp.config.expert_bias else "none"),
                 "manifest": inp.manifest, "checksums": merge_slots.slot_sums(arrays, known)}
        while not self.fingerprint_ok.wait(0.05):
            if self.stop.is_set():
                raise _Stopped()
        checkpoint.write_arrays(tmp / entry["dir"], {"layers": {"moe": arrays}})
        return entry


def _write_trees(tmp: Path, plan: _Plan, row0: np.ndarray, row0_desc: str, checked: bool, bar,
                 timings: dict) -> tuple[list[dict], dict]:
    """Write the shared tensors, the public slot and every owner's slot into ``tmp``.

    Returns the manifest entries (slot order) and the anchor's checksums. The anchor (taken out of
    ``plan``) is freed once written and hashed, before the experts it would crowd out are read.
    """
    anchor_params, plan.anchor_params = plan.anchor_params, None
    L = plan.anchor_config.n_layers
    pdtype = anchor_params["layers"]["mlp"]["gate"].dtype
    shared = {k: v for k, v in anchor_params.items() if k != "layers"}
    shared["layers"] = {k: v for k, v in anchor_params["layers"].items() if k != "mlp"}
    public = {k: anchor_params["layers"]["mlp"][k][:, None] for k in FFN_LEAVES}
    public["router"] = row0[:, None]
    if plan.with_bias:
        public["bias"] = np.zeros((L, 1), pdtype)
    anchor_bytes = sum(np.asarray(v).nbytes for v in merge_slots.flat_tree(anchor_params).values())
    writer = _SlotWriter(plan, pdtype, anchor_bytes)

    (tmp / EXPERTS_DIR).mkdir()
    public_dir = _expert_dirname(0, "public")
    pool = ThreadPoolExecutor(max_workers=4 + min(len(plan.inputs), 4), thread_name_prefix="flexmoe-merge")
    try:
        t = time.perf_counter()
        fp_future = pool.submit(expert.fingerprint, plan.anchor_config, anchor_params)
        sums_future = pool.submit(checksums.array_checksums, anchor_params)
        writer.anchor_sums = sums_future.result
        anchor_writes = [pool.submit(checkpoint.write_arrays, tmp / checkpoint.PARAMS_DIR, shared),
                         pool.submit(checkpoint.write_arrays, tmp / public_dir, {"layers": {"moe": public}})]
        slots = [pool.submit(writer, slot, inp, tmp) for slot, inp in enumerate(plan.inputs, start=1)]
        fingerprint = fp_future.result()
        plan.anchor_desc["fingerprint"] = fingerprint
        _check_fingerprint(plan, fingerprint, None if checked else anchor_params)
        writer.fingerprint_ok.set()
        anchor_sums = sums_future.result()
        for w in anchor_writes:
            w.result()
        entries = [{"name": "public", "slot": 0, "dir": public_dir, "source": plan.anchor_desc["path"],
                    "manifest": {"role": "the public anchor's FFN", "anchor_fingerprint": fingerprint,
                                 "router_row": row0_desc},
                    "checksums": merge_slots.slot_sums(public, {k: anchor_sums[f"layers/mlp/{k}"]
                                                                for k in FFN_LEAVES})}]
        # Written and hashed: free the anchor to make room for the experts.
        del anchor_params, shared, public, fp_future, anchor_writes
        writer.budget.give(anchor_bytes)
        timings["anchor: hash, write"] = time.perf_counter() - t
        bar.update()
        for future, inp in zip(slots, plan.inputs):
            bar.set_postfix_str(inp.name)
            entries.append(future.result())
            bar.update()
        timings["experts: read, verify, write"] = time.perf_counter() - t - timings["anchor: hash, write"]
    except BaseException:
        writer.stop.set()  # workers waiting for memory or for the fingerprint give up
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # nothing writes into tmp once it is published or removed
    return entries, anchor_sums


# ----------------------------------------------------------------------------
# 4. The manifest and routing stats
# ----------------------------------------------------------------------------

def _write_manifest(tmp: Path, plan: _Plan, entries: list[dict], anchor_sums: dict, row0_desc: str) -> None:
    """Copy the routing stats and write ``config.json`` and the manifest (layout: docs/merge.md)."""
    inputs = plan.inputs
    manifest = {
        "format": loading.MERGED_FORMAT, "version": 1, "anchor": plan.anchor_desc, "top_k": plan.config.top_k,
        "bias": "kept" if plan.with_bias else ("dropped" if any(i.config.expert_bias for i in inputs) else "none"),
        "public_router": row0_desc,
        "shared": {"dir": checkpoint.PARAMS_DIR,
                   "checksums": {k: v for k, v in anchor_sums.items() if not k.startswith("layers/mlp/")}},
        "experts": entries,
    }
    for entry in entries:
        if entry["name"] in plan.stats_files:
            entry["routing_stats"] = _copy_stats(plan.stats_files[entry["name"]], entry["name"], tmp, plan.config)
    (tmp / checkpoint.CONFIG_NAME).write_text(plan.config.to_json() + "\n")
    (tmp / loading.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _copy_stats(src: tuple[Path, set | None], name: str, tmp: Path, config: ModelConfig) -> dict:
    """Copy one expert's routing stats into the merged model under its merged name; its manifest entry."""
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
    if stats.exact and name != routing.PUBLIC:
        warnings.warn(f"merging EXACT routing stats of {name!r} ({path}): anyone holding the merged model can tell "
                      "which strings its data holds; release them privately (flexmoe routing-stats) instead",
                      stacklevel=2)
    # What was counted and how it was released; no owner path, no document or token counts.
    return {"file": rel, "sha256": hashlib.sha256((tmp / rel).read_bytes()).hexdigest(),
            "source": {k: stats.source.get(k) for k in ("task", "split", "vocab_size")},
            "release": stats.release or {"mechanism": "exact"}}
