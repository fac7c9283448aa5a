"""The training loop behind ``flexmoe train`` and ``flexmoe train-expert``: :func:`run`, in named steps."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from flexmoe_jax import checkpoint, distributed, expert, flops, optim, storage, train
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.trainer import logs, state_store
from flexmoe_jax.trainer.run_config import RunConfig, TrainingError
from flexmoe_jax.trainer.start import initial_params


def run(workdir: str | os.PathLike, config: ModelConfig | None, rc: RunConfig,
        ocfg: optim.OptimConfig | None = None, loss_cfg: train.LossConfig | None = None,
        params: Any = None, progress: bool = True, gin_text: str = "") -> dict:
    """Train (or resume) into ``workdir``; returns the final metrics and the output path.

    ``config`` is the model to pretrain; for the expert and router phases the anchor
    defines the model, and a ``config`` given anyway must agree with it. Writes
    ``workdir/{state,model,metrics.jsonl}`` (and ``expert/`` for the expert phase); raises
    :class:`TrainingError` on a non-finite loss or a failed write. Resume semantics: docs/training.md.
    """
    rc, workdir, ocfg, loss_cfg = _settle(workdir, rc, ocfg, loss_cfg)
    train_task = _register_data(rc)  # an unknown task fails here, before anything is written
    _claim_run(workdir, rc)
    routed = loss_cfg.route_weight > 0
    provenance: dict = {}
    if params is None:
        config, params, provenance = initial_params(config, rc)
    mesh, tx, state, frozen, placed = _setup(config, params, rc, ocfg)
    # The whole state donated and pinned to its shardings (in and out): it stays put step to step.
    step_fn = train.jit_train_step(config, tx, loss_cfg, rc.grad_accum, mesh, *placed)
    mngr = state_store.manager(workdir, rc)
    state_dir = workdir / "state"
    start, state, batches = _resume_or_start(mngr, state_dir, state, placed[0], rc, train_task, routed)
    next_batch = _feeder(batches, rc, mesh, routed)

    tokens_per_step = rc.batch_size * rc.seq_len
    # MFU counts the FLOPs of the compiled step that runs (compiled once, on the first batch);
    # the 6N estimate is logged beside it.
    step_flops = {"6n": flops.flops_per_token(config, rc.seq_len) * tokens_per_step, "tokens": tokens_per_step}
    compiled = None
    bar = tqdm(total=rc.steps, initial=start, desc=f"{rc.phase}", unit="step",
               disable=not progress or jax.process_index() > 0)
    saving = functools.partial(state_store.guarded, mngr, state_dir, bar.close)
    writer = logs.writer(workdir)
    last: dict = {}
    t0, n0 = time.perf_counter(), start
    for step in range(start, rc.steps):
        batch = next_batch()
        if compiled is None:
            compiled = _compile(step_fn, state, frozen, batch, mesh, step_flops)
        state, metrics = compiled(state, frozen, batch)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            saving(mngr.wait_until_finished)
            bar.close()
            raise TrainingError(f"non-finite loss {loss} at step {step + 1}; stopped without saving it. "
                                f"The last good checkpoint is step {mngr.latest_step()} in {workdir / 'state'}; "
                                "lower the learning rate or check the data")
        done = step + 1
        if done % rc.log_every == 0 or done == rc.steps:
            elapsed = time.perf_counter() - t0
            tps = (done - n0) * tokens_per_step / max(elapsed, 1e-9)
            last = logs.scalars(metrics, ocfg, done, tps / tokens_per_step, step_flops, config)
            writer(done, last)
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:,.0f}")
            t0, n0 = time.perf_counter(), done
        if done % rc.checkpoint_every == 0 or done == rc.steps:
            saving(state_store.save, mngr, done, state, batches.state())
        bar.update()
    bar.close()
    saving(mngr.wait_until_finished)
    saving(mngr.close)
    if compiled is None:  # resumed after the last step: count the step all the same, for the metadata
        _compile(step_fn, state, frozen, next_batch(), mesh, step_flops)
    return _write_outputs(workdir, config, rc, state, frozen, last, step_flops, provenance, gin_text)


def _settle(workdir, rc: RunConfig, ocfg, loss_cfg):
    """(rc with a local data_dir, resolved and created workdir, ocfg with total_steps, checked loss_cfg)."""
    if storage.is_remote(rc.data_dir):  # SentencePiece and tfds read it locally: one staged copy per machine
        from flexmoe_jax.data import staging

        rc = dataclasses.replace(rc, data_dir=staging.stage(rc.data_dir))
    workdir = storage.resolve(workdir)  # a local directory or gs://... (created by _claim_run)
    loss_cfg = loss_cfg or train.LossConfig()
    if loss_cfg.route_weight < 0:
        raise UserError(f"LossConfig.route_weight must be >= 0, got {loss_cfg.route_weight}")
    if loss_cfg.route_weight > 0 and (rc.phase != "expert" or rc.public_replay <= 0):
        raise UserError("LossConfig.route_weight > 0 trains the router to tell the owner's text from public text: "
                        "it needs the expert phase with public replay (RunConfig.public_replay > 0)")
    ocfg = ocfg or optim.OptimConfig()
    if ocfg.total_steps is None:
        ocfg = dataclasses.replace(ocfg, total_steps=rc.steps)
    return rc, workdir, ocfg, loss_cfg


def _setup(config: ModelConfig, params, rc: RunConfig, ocfg: optim.OptimConfig):
    """(mesh, optimizer, initial train state, frozen params, (state shardings, frozen shardings)): the
    phase's split placed on the mesh, each optimizer-state leaf sharded like its parameter."""
    trainable, frozen = optim.split(params, train.split_for(rc.phase))
    tx = optim.make_optimizer(ocfg, trainable)
    mesh = train.resolve_mesh(rc.mesh)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if rc.batch_size % (replicas * rc.grad_accum):
        raise UserError(f"RunConfig.batch_size={rc.batch_size} must be divisible by grad_accum={rc.grad_accum} "
                        f"x the {replicas} batch shards of mesh {dict(mesh.shape)}; "
                        "change batch_size or RunConfig.mesh")
    trainable, frozen = train.place(config, trainable, mesh), train.place(config, frozen, mesh)
    state_sh = train.state_shardings(config, tx, trainable, mesh)
    state = train.init_sharded(trainable, tx, state_sh)
    return mesh, tx, state, frozen, (state_sh, train.shardings(config, frozen, mesh))


RUN_FILE = "run.json"  # what a run directory holds: its phase, task and expert (see _claim_run)


def _identity(rc: RunConfig) -> dict:
    return {"phase": rc.phase, "task": rc.task, "expert_name": rc.expert_name if rc.phase == "expert" else None}


def _claim_run(workdir, rc: RunConfig) -> None:
    """Create ``workdir`` for this run, or check that the run it holds is this one: a finished or
    interrupted run of another phase, task or expert is never resumed under a new label (its weights
    would be published as the new owner's). Runs from before ``run.json`` are checked by their model's
    metadata."""
    mine = _identity(rc)
    f = workdir / RUN_FILE
    theirs = None
    if f.exists():
        theirs = json.loads(f.read_text())
    elif (workdir / "model").exists():
        try:
            meta = checkpoint.load_metadata(workdir / "model")
        except Exception:  # noqa: BLE001 - an unreadable old model: nothing to compare with
            meta = {}
        if meta.get("phase") and meta.get("task"):
            theirs = {"phase": meta["phase"], "task": meta["task"], "expert_name": mine["expert_name"]}
    if theirs is not None and theirs != mine:
        diff = ", ".join(f"{k} {theirs.get(k)!r} (asked: {mine[k]!r})" for k in mine if theirs.get(k) != mine[k])
        raise UserError(f"{workdir} holds another run ({diff}); resuming it would label its weights as this "
                        "one's. Pass another --out/workdir, or delete it to start over")
    workdir.mkdir(parents=True, exist_ok=True)
    if theirs is None and jax.process_index() == 0:
        storage.write_json(f, mine, sort_keys=False)


def _register_data(rc: RunConfig) -> str:
    """Register the data dir's tasks; the task to train on (with public replay: the registered mixture).
    UserError naming the known tasks when ``rc.task`` is not one."""
    from flexmoe_jax import data
    from flexmoe_jax.data import tasks as data_tasks

    data.register_tasks(rc.data_dir)
    data_tasks._provider(rc.task, rc.data_dir)
    if rc.public_replay > 0:
        from flexmoe_jax.data import tasks as data_tasks

        return data_tasks.register_replay_mixture(rc.task, rc.public_task, rc.public_replay, rc.data_dir)
    return rc.task


def _resume_or_start(mngr, state_dir: Path, state, state_sh, rc: RunConfig, train_task: str, routed: bool):
    """(first step, train state, batch iterator): from the latest saved step if there is one (its arrays
    placed with ``state_sh``, the shardings the step is pinned to), else from 0."""
    from flexmoe_jax import data

    latest = mngr.latest_step()
    if latest is None:
        return 0, state, data.batches(train_task, "train", rc.batch_size, rc.seq_len, rc.data_dir, seed=rc.seed,
                                      shard_index=jax.process_index(), num_shards=jax.process_count(),
                                      row_task=routed)
    restored = state_store.restore(mngr, latest, state, state_dir, state_sh)
    # The data position is process 0's; every process reads its own rows of the same global batch.
    batches = data.batches_from_state({**restored["data"], "shard_index": jax.process_index(),
                                       "num_shards": jax.process_count()}, rc.data_dir)
    return latest, restored["state"], batches


def _feeder(batches, rc: RunConfig, mesh, routed: bool) -> Callable[[], dict]:
    """``next_batch()``: the next global batch on the mesh (with ``route_target`` when routed)."""
    batches.row_task = routed  # (a resumed iterator's saved state may predate row_task)
    if routed and rc.task not in batches.tasks:
        raise UserError(f"LossConfig.route_weight needs RunConfig.task to be one task, got {rc.task!r}")
    own_task = batches.tasks.index(rc.task) if routed else None

    def next_batch():
        b = next(batches)
        if routed:  # the owner's rows -> its slot (1), public replay rows -> the public slot (0)
            b = {k: v for k, v in b.items() if k != "row_task"} | {
                "route_target": (b["row_task"] == own_task).astype(np.int32)}
        return distributed.host_local_to_global(b, mesh)

    return next_batch


def _compile(step_fn, state, frozen, batch, mesh, step_flops: dict):
    """The step that runs, compiled; its FLOPs go into ``step_flops`` (one device's program, run on every device)."""
    c = step_fn.lower(state, frozen, batch).compile()
    counted = flops.compiled_flops(c)
    step_flops.update(compiled=counted.flops * mesh.devices.size, dynamic_loops=counted.dynamic_loops)
    return c


def _write_outputs(workdir: Path, config: ModelConfig, rc: RunConfig, state, frozen, last: dict, step_flops: dict,
                   provenance: dict, gin_text: str) -> dict:
    """Save ``workdir/model`` (and the expert deliverable ``workdir/expert``); the run's result dict."""
    tokens_per_step = rc.batch_size * rc.seq_len
    final = optim.combine(state.trainable, frozen)  # stays sharded: every process writes its shards
    out = workdir / "model"
    resume = (f" to resume: the training state of step {rc.steps} is saved in {workdir / 'state'}, so the rerun "
              "only writes the outputs")
    try:
        checkpoint.save(out, config, final, metadata={
            "phase": rc.phase, "task": rc.task, "steps": rc.steps, "tokens": rc.steps * tokens_per_step,
            "gin_config": gin_text, **logs.flops_metadata(step_flops), **provenance})
        result = {"metrics": last, "model": str(out), "config": config}
        if rc.phase == "expert":
            # What leaves the owner: no path on its disk, nothing computed from its data but the weights.
            result["expert"] = str(expert.save_deliverable(workdir / "expert", config, state.trainable, {
                "task": rc.task, "steps": rc.steps, "tokens": rc.steps * tokens_per_step,
                "gin_config": redact_data_dir(gin_text), "license": rc.license, **provenance}))
    except checkpoint.CheckpointWriteError as e:  # its message ends "then rerun the same command"
        raise TrainingError(f"{e}{resume}") from e
    return result


def redact_data_dir(gin_text: str) -> str:
    """The operative gin config with the owner's data directory (a path on its disk) left out."""
    return re.sub(r"^(RunConfig\.data_dir\s*=\s*).*$", r"\1'<the owner's data directory>'", gin_text, flags=re.M)
