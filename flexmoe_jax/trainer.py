"""The training loop behind ``flexmoe train`` and ``flexmoe train-expert``.

Everything a run needs to resume is in one Orbax ``CheckpointManager`` under
``WORKDIR/state``: the trainable parameters, their optimizer state, the step
and the data iterator's position. The frozen parameters are never saved
there: they are the anchor, reloaded (and fingerprint-checked) on resume.
Killing the process at any point and rerunning the same command continues
from the last complete checkpoint and ends bit-identical to an uninterrupted
run, because the data iterator is a pure function of (seed, step) and the
step is deterministic.

A non-finite loss stops the run before anything is saved for that step, so
the last checkpoint on disk stays the last good one. A save the filesystem
refuses (disk full, quota, ...) stops it too: the partial write is removed, the
last complete checkpoint is kept, and the error names the directory to free
space on; rerunning the same command then resumes. Both are ``TrainingError``s,
which ``flexmoe train`` prints as one line (exit status 2).

In a multi-process run every process reads only its own rows of each global
batch (also after a resume), and process 0 alone writes the logs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
from tqdm import tqdm

from flexmoe_jax import array_store, baselines, checkpoint, expert, flops, model, optim, storage, train
from flexmoe_jax.config import SHAPE_FIELDS, ModelConfig, arch_diff
from flexmoe_jax.errors import FlexmoeError, UserError

# "dense": an owner continues pretraining the whole dense anchor on its own data (the paper's dense
# experts, from which its soup, BTM and BTX baselines are built).
PHASES = ("pretrain", "expert", "dense", "router_tune")


class TrainingError(FlexmoeError, RuntimeError):
    """Training cannot continue (non-finite loss, disk full, incompatible resume state).

    ``flexmoe train`` prints it as one line and exits with status 2.
    """


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to train on and for how long; model/optimizer settings live in their own configs."""

    phase: str = "pretrain"
    task: str = "flexmix_mini.public"
    data_dir: str = "flexmoe_data"
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    # (data, fsdp, expert, tensor); -1 on one axis takes the remaining devices.
    mesh: tuple[int, int, int, int] = (-1, 1, 1, 1)
    # expert / router_tune phases
    anchor: str = ""
    expert_name: str = ""
    # Router rows of the new expert: "hidden" (the anchor's own mean FFN input on public vs domain
    # data, per layer), "minilm" (a sentence embedder's mean over router_init_docs documents of each,
    # projected by a map fitted on public data; pip install 'flexmoe_jax[embed]'), "random" or
    # "zeros"; see flexmoe_jax.router_init.
    router_init: str = "hidden"
    router_init_batches: int = 8
    router_init_docs: int = 256
    public_task: str = "flexmix_mini.public"
    # Expert phase: share of training rows drawn from public_task (public replay); 0 trains on the
    # owner's task alone, as the reference does. The router init still reads the owner's task only.
    public_replay: float = 0.0
    # Expert phase: the owner's router bias starts here (<= 0: the forward pass clamps it to <= 0, so
    # from 0 it can only go down; from below it can move both ways). OptimConfig.bias_lr_scale sets its
    # learning rate (0: fixed at this value).
    bias_init: float = 0.0
    # Optional license tag recorded in the expert's manifest (e.g. "CC-BY-4.0", "internal-only").
    license: str = ""

    def __post_init__(self):
        if self.phase not in PHASES:
            raise UserError(f"RunConfig.phase must be one of {PHASES}, got {self.phase!r}")
        if self.phase == "expert" and (not self.anchor or not self.expert_name):
            raise UserError("expert training needs RunConfig.anchor (the public checkpoint) and "
                            "RunConfig.expert_name (this owner's domain)")
        if self.phase == "dense" and not self.anchor:
            raise UserError("dense expert training needs RunConfig.anchor (the public checkpoint it continues)")
        from flexmoe_jax.router_init import METHODS

        if self.router_init not in METHODS:
            raise UserError(f"RunConfig.router_init must be one of {METHODS}, got {self.router_init!r}")
        if self.bias_init > 0:
            raise UserError("RunConfig.bias_init must be <= 0 (the router clamps the bias to <= 0), "
                            f"got {self.bias_init}")
        if not 0 <= self.public_replay < 1:
            raise UserError(f"RunConfig.public_replay must be in [0, 1), got {self.public_replay}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"RunConfig.{name} must be positive, got {getattr(self, name)}")


def resolve_mesh(shape: tuple[int, ...]):
    from flexmoe_jax.sharding import make_mesh

    n = jax.device_count()
    shape = list(shape)
    if shape.count(-1) > 1:
        raise UserError(f"at most one mesh axis may be -1, got {tuple(shape)}")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if n % rest:
            raise UserError(f"mesh {tuple(shape)} does not divide the {n} devices")
        shape[shape.index(-1)] = n // rest
    return make_mesh(*shape)


def shardings(config: ModelConfig, flat: optim.Flat, mesh) -> dict:
    """Each leaf's sharding on the mesh, by its logical axes (cut slots keep theirs)."""
    from flexmoe_jax.sharding import named_sharding

    axes = optim.flatten(model.logical_axes(config))
    return {k: named_sharding(mesh, axes[k.split("#")[0]], np.shape(v)) for k, v in flat.items()}


def place(config: ModelConfig, flat: optim.Flat, mesh) -> optim.Flat:
    """Put a flat parameter dict onto the mesh by each leaf's logical axes (cut slots keep theirs)."""
    return {k: jax.device_put(flat[k], s) for k, s in shardings(config, flat, mesh).items()}


def jit_step(config: ModelConfig, tx, loss_cfg: train.LossConfig, grad_accum: int, mesh):
    """The jitted training step :func:`run` runs: ``(state, frozen, batch) -> (state, metrics)``, state donated."""
    return jax.jit(functools.partial(train.train_step, config=config, tx=tx, loss_cfg=loss_cfg,
                                     grad_accum=grad_accum, mesh=mesh), donate_argnums=(0,))


def _to_global(batch: dict, sharding) -> dict:
    """This process's rows of the global batch -> one global array per feature."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _manager(workdir: Path, rc: RunConfig):
    import orbax.checkpoint as ocp

    # cleanup_tmp_directories: a save cut short (killed, disk full) leaves an unfinished
    # "N.orbax-checkpoint-tmp" directory; never restored from, and removed here on the next run.
    options = ocp.CheckpointManagerOptions(max_to_keep=rc.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True, cleanup_tmp_directories=True)
    # The state's arrays carry a crc32c per chunk, checked when a resume reads them (array_store).
    return ocp.CheckpointManager(workdir / "state", options=options,
                                 item_handlers={"state": array_store.pytree_handler(),
                                                "data": ocp.JsonCheckpointHandler()})


def _last_complete_step(state_dir: Path) -> int | None:
    # Orbax's finalized steps: renamed from their temporary name locally, marked commit_success.txt on gs://.
    import orbax.checkpoint as ocp

    return max(ocp.utils.checkpoint_steps(state_dir), default=None)


def _remove_partial_steps(state_dir: Path) -> None:
    """Delete the unfinished "N.orbax-checkpoint-tmp" directories of a failed save (and keep them gone)."""
    def remove() -> bool:
        partial = list(state_dir.glob("*.orbax-checkpoint-tmp*"))
        for tmp in partial:
            try:
                storage.remove_tree(tmp)
            except OSError:
                pass
        return bool(partial)

    checkpoint.remove_leftovers(remove)


def _state_save_failed(e: Exception, mngr, state_dir: Path) -> TrainingError | None:
    """One clear error for a failed write of the training state (None: ``e`` is no I/O failure).

    Waits for the background save, removes its partial step directory (the space it
    holds is often what the disk lacks) and names the last complete step, which a
    rerun of the same command resumes from.
    """
    io = checkpoint.io_error(e)
    if io is None:
        return None
    try:
        mngr.wait_until_finished()
    except Exception:  # noqa: BLE001 - the same failure, reported again
        pass
    if jax.process_index() == 0:
        _remove_partial_steps(state_dir)
    last = _last_complete_step(state_dir)
    code, reason = io
    kept = (f"the last complete checkpoint, step {last}, is intact" if last is not None
            else "no checkpoint was completed yet")
    resume = f"resume from step {last}" if last is not None else "start again"
    return TrainingError(f"cannot save the training state in {state_dir}: {reason}; the partial write was removed "
                         f"and {kept}. To fix: {checkpoint.io_fix(code, state_dir)}, then rerun the same "
                         f"command to {resume}")


def _initial_params(config: ModelConfig, rc: RunConfig) -> tuple[ModelConfig, Any, dict]:
    """(config, full params, provenance) for the phase."""
    if rc.phase == "pretrain":
        if config is None:
            raise UserError("pretraining needs a ModelConfig")
        return config, jax.device_get(model.init(config, rc.seed)), {}
    kit = None
    if rc.phase in ("expert", "dense"):
        from flexmoe_jax import anchor_kit

        if anchor_kit.is_kit(rc.anchor):  # the builder's kit: its anchor, public row and router-init method
            kit = anchor_kit.open_kit(rc.anchor)
    from flexmoe_jax import loading  # the anchor may be any kind (a merged model for router tuning)

    anchor_config, anchor_params = loading.load(kit.anchor if kit else rc.anchor)
    if config is not None:
        diff = arch_diff(config, anchor_config, SHAPE_FIELDS)
        if diff:
            raise UserError(f"the configured model differs from the anchor {rc.anchor}: "
                            + ", ".join(f"{k}={a} vs anchor {b}" for k, (a, b) in diff.items())
                            + "; drop the ModelConfig settings (the anchor defines the model) or use the right anchor")
    provenance = {"anchor": str(storage.resolve(rc.anchor)),
                  "anchor_fingerprint": expert.fingerprint(anchor_config, anchor_params)}
    if kit is not None:
        if provenance["anchor_fingerprint"] != kit.meta["anchor_fingerprint"]:
            raise UserError(f"anchor kit {kit.path}: its model/ does not match the fingerprint in its kit.json; "
                            "the kit is damaged (re-copy it from the model builder)")
        provenance["anchor_kit"] = kit.kit_id
    if rc.phase == "expert":
        from flexmoe_jax import data, router_init

        data.register_tasks(rc.data_dir)
        anchor_params = jax.device_get(anchor_params)
        batch_size = max(rc.batch_size // max(jax.process_count(), 1), 1)

        def sample(task):  # the domain's own training documents, in another order than training's
            return data.batches(task, "train", batch_size, rc.seq_len, rc.data_dir, seed=rc.seed + 1)

        if kit is not None:  # row 0 is the kit's; the owner computes only its own row, by the kit's method
            own = kit.owner_row(anchor_config, anchor_params, data_dir=rc.data_dir, task=rc.task, seq_len=rc.seq_len,
                                seed=rc.seed, num_batches=rc.router_init_batches, num_docs=rc.router_init_docs)
            rows = np.stack([kit.public_row(), own], axis=1).astype(np.float32)
            cfg, params = expert.upcycle(anchor_config, anchor_params, rc.expert_name, router_rows=rows,
                                         bias_init=rc.bias_init)
            provenance.update(router_init=kit.method, bias_init=rc.bias_init)
            return cfg, params, provenance
        init_info: dict = {}  # how the rows were made, beyond the method's name (for the manifest)
        rows = router_init.rows(rc.router_init, anchor_config, anchor_params,
                                sample(rc.public_task) if rc.router_init == "hidden" else None,
                                sample(rc.task) if rc.router_init == "hidden" else None,
                                num_batches=rc.router_init_batches, seed=rc.seed, data_dir=rc.data_dir,
                                public_task=rc.public_task, task=rc.task, num_docs=rc.router_init_docs,
                                seq_len=rc.seq_len, info=init_info)
        cfg, params = expert.upcycle(anchor_config, anchor_params, rc.expert_name, router_rows=rows,
                                     bias_init=rc.bias_init)
        provenance["router_init"] = rc.router_init
        provenance["bias_init"] = rc.bias_init
        if init_info:
            provenance["router_init_info"] = init_info
        return cfg, params, provenance
    if rc.phase == "dense":
        provenance["dense_expert"] = rc.expert_name or rc.task.split(".")[-1]
    return anchor_config, jax.device_get(anchor_params), provenance


def split_for(phase: str) -> optim.Split:
    return {"pretrain": optim.ALL, "expert": expert.TRAINABLE, "dense": optim.ALL,
            "router_tune": optim.ROUTER_ONLY}[phase]


def run(workdir: str | os.PathLike, config: ModelConfig | None, rc: RunConfig,
        ocfg: optim.OptimConfig | None = None, loss_cfg: train.LossConfig | None = None,
        params: Any = None, progress: bool = True, gin_text: str = "") -> dict:
    """Train (or resume) into ``workdir``; returns the final metrics and the output path.

    ``config`` is the model to pretrain; for the expert and router phases the anchor
    defines the model, and a ``config`` given anyway must agree with it.
    """
    from flexmoe_jax import data

    if storage.is_remote(rc.data_dir):  # SentencePiece and tfds read it locally: one staged copy per machine
        from flexmoe_jax.data import staging

        rc = dataclasses.replace(rc, data_dir=staging.stage(rc.data_dir))
    workdir = storage.resolve(workdir)  # a local directory or gs://...
    workdir.mkdir(parents=True, exist_ok=True)
    loss_cfg = loss_cfg or train.LossConfig()
    if loss_cfg.route_weight < 0:
        raise UserError(f"LossConfig.route_weight must be >= 0, got {loss_cfg.route_weight}")
    routed = loss_cfg.route_weight > 0
    if routed and (rc.phase != "expert" or rc.public_replay <= 0):
        raise UserError("LossConfig.route_weight > 0 trains the router to tell the owner's text from public text: "
                        "it needs the expert phase with public replay (RunConfig.public_replay > 0)")
    ocfg = ocfg or optim.OptimConfig()
    if ocfg.total_steps is None:
        ocfg = dataclasses.replace(ocfg, total_steps=rc.steps)
    provenance: dict = {}
    if params is None:
        config, params, provenance = _initial_params(config, rc)
    trainable, frozen = optim.split(params, split_for(rc.phase))
    tx = optim.make_optimizer(ocfg, trainable)
    mesh = resolve_mesh(rc.mesh)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if rc.batch_size % (replicas * rc.grad_accum):
        raise UserError(f"RunConfig.batch_size={rc.batch_size} must be divisible by grad_accum={rc.grad_accum} "
                        f"x the {replicas} batch shards of mesh {dict(mesh.shape)}; "
                        "change batch_size or RunConfig.mesh")
    trainable, frozen = place(config, trainable, mesh), place(config, frozen, mesh)
    state = jax.jit(lambda t: train.init_state(t, tx))(trainable)
    step_fn = jit_step(config, tx, loss_cfg, rc.grad_accum, mesh)

    data.register_tasks(rc.data_dir)
    train_task = rc.task
    if rc.public_replay > 0:
        from flexmoe_jax.data import tasks as data_tasks

        train_task = data_tasks.register_replay_mixture(rc.task, rc.public_task, rc.public_replay, rc.data_dir)
    mngr = _manager(workdir, rc)
    state_dir = workdir / "state"

    def saving(fn, *args, **kwargs):  # a failed write of the training state -> one clear TrainingError
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            err = _state_save_failed(e, mngr, state_dir)
            if err is None:
                raise
            bar.close()  # (only called once the bar exists) so the error gets a line of its own
            raise err from e

    start = 0
    latest = mngr.latest_step()
    if latest is not None:
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        try:
            restored = mngr.restore(latest, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
                data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - a damaged state must not be trained on; say which
            err = array_store.state_error(e, state_dir / str(latest))
            if err is None:
                raise
            raise err from e
        state = restored["state"]
        # The data position is process 0's; every process reads its own rows of the same global batch.
        batches = data.batches_from_state({**restored["data"], "shard_index": jax.process_index(),
                                           "num_shards": jax.process_count()}, rc.data_dir)
        start = latest
    else:
        batches = data.batches(train_task, "train", rc.batch_size, rc.seq_len, rc.data_dir, seed=rc.seed,
                               shard_index=jax.process_index(), num_shards=jax.process_count(), row_task=routed)
    batch_sharding = train.batch_sharding(mesh)
    batches.row_task = routed  # (a resumed iterator's saved state may predate row_task)
    if routed and rc.task not in batches.tasks:
        raise UserError(f"LossConfig.route_weight needs RunConfig.task to be one task, got {rc.task!r}")
    own_task = batches.tasks.index(rc.task) if routed else None

    def next_batch():
        b = next(batches)
        if routed:  # the owner's rows -> its slot (1), public replay rows -> the public slot (0)
            b = {k: v for k, v in b.items() if k != "row_task"} | {
                "route_target": (b["row_task"] == own_task).astype(np.int32)}
        return _to_global(b, batch_sharding)

    tokens_per_step = rc.batch_size * rc.seq_len
    # MFU counts the FLOPs of the compiled step that runs (compiled once, on the first batch);
    # the 6N estimate is logged beside it.
    step_flops = {"6n": baselines.flops_per_token(config, rc.seq_len) * tokens_per_step, "tokens": tokens_per_step}
    compiled = None

    def compile_step(batch):  # the step that runs, and its FLOPs (one device's program, run on every device)
        c = step_fn.lower(state, frozen, batch).compile()
        counted = flops.compiled_flops(c)
        step_flops.update(compiled=counted.flops * mesh.devices.size, dynamic_loops=counted.dynamic_loops)
        return c

    bar = tqdm(total=rc.steps, initial=start, desc=f"{rc.phase}", unit="step",
               disable=not progress or jax.process_index() > 0)
    writer = _writer(workdir)
    last: dict = {}
    t0, n0 = time.perf_counter(), start
    for step in range(start, rc.steps):
        batch = next_batch()
        if compiled is None:
            compiled = compile_step(batch)
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
            last = _scalars(metrics, ocfg, done, tps / tokens_per_step, step_flops, config)
            writer(done, last)
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:,.0f}")
            t0, n0 = time.perf_counter(), done
        if done % rc.checkpoint_every == 0 or done == rc.steps:
            import orbax.checkpoint as ocp

            saving(mngr.save, done, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                            data=ocp.args.JsonSave(batches.state())))
        bar.update()
    bar.close()
    saving(mngr.wait_until_finished)
    saving(mngr.close)
    if compiled is None:  # resumed after the last step: count the step all the same, for the metadata
        compile_step(next_batch())
    final = optim.combine(state.trainable, frozen)  # stays sharded: every process writes its shards
    out = workdir / "model"
    resume = (f" to resume: the training state of step {rc.steps} is saved in {state_dir}, so the rerun "
              "only writes the outputs")
    try:
        checkpoint.save(out, config, final, metadata={
            "phase": rc.phase, "task": rc.task, "steps": rc.steps, "tokens": rc.steps * tokens_per_step,
            "gin_config": gin_text, **_flops_metadata(step_flops), **provenance})
        result = {"metrics": last, "model": str(out), "config": config}
        if rc.phase == "expert":
            result["expert"] = str(expert.save_deliverable(workdir / "expert", config, state.trainable, {
                "task": rc.task, "steps": rc.steps, "tokens": rc.steps * tokens_per_step, "gin_config": gin_text,
                "data_card_sha256": _card_hash(rc.data_dir), "license": rc.license, **provenance}))
    except checkpoint.CheckpointWriteError as e:  # its message ends "then rerun the same command"
        raise TrainingError(f"{e}{resume}") from e
    return result


def _card_hash(data_dir: str) -> str | None:
    """sha256 of the data card the expert was trained with (None if the data dir has none)."""
    import hashlib

    card = storage.resolve(data_dir) / "card.json"
    return hashlib.sha256(card.read_bytes()).hexdigest() if card.is_file() else None


@functools.cache
def measured_peak_flops(dtype: str = "float32", n: int = 1024) -> float:
    """Matmul FLOP/s of this machine (an n^3 jitted matmul in ``dtype``), measured once (for MFU)."""
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 5 * 2 * n ** 3 / (time.perf_counter() - t)


def _flops_metadata(step_flops: dict) -> dict:
    """FLOPs per training step, for the model's metadata."""
    # compiled: matmul FLOPs of the compiled step (XLA's program, loops times their trip counts);
    # a lower bound when the step has data-dependent loops (flops_dynamic_loops > 0, see flexmoe_jax.flops).
    return {"flops_per_step_compiled": step_flops["compiled"], "flops_per_step_6n": step_flops["6n"],
            "flops_dynamic_loops": step_flops["dynamic_loops"]}


def _scalars(metrics, ocfg, step, steps_per_s, step_flops, config) -> dict:
    m = jax.device_get(metrics)
    out = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
    out["lr"] = float(optim.schedule(ocfg)(step))
    out["tokens_per_s"] = steps_per_s * step_flops["tokens"]
    peak = measured_peak_flops()
    out["mfu"] = steps_per_s * step_flops["compiled"] / peak  # FLOPs the compiled step executes
    out["mfu_6n"] = steps_per_s * step_flops["6n"] / peak    # 6 x active params + attention, per token
    out["flops_per_step"] = step_flops["compiled"]
    if "expert_share" in m:
        for name, share, gate in zip(config.names, m["expert_share"], m["expert_gate"]):
            out[f"expert_share/{name}"] = float(share)
            out[f"expert_gate/{name}"] = float(gate)
    return out


def _writer(workdir: Path):
    """TensorBoard event files (clu) plus a JSON-lines log that needs nothing to read.

    Object storage has no append: there the log is rewritten whole (one object write) each time."""
    path = workdir / "metrics.jsonl"
    if jax.process_index() > 0:  # process 0 writes the logs of a multi-process run
        return lambda step, scalars: None
    remote = storage.is_remote(workdir)
    tb = None
    if remote and os.environ.get("STORAGE_EMULATOR_HOST"):
        # clu writes event files through TensorFlow's GCS client, which cannot be pointed at an emulator.
        tqdm.write("flexmoe: no TensorBoard event files under a GCS emulator (TensorFlow's GCS client "
                   "always talks to storage.googleapis.com); metrics go to metrics.jsonl")
    else:
        try:
            from clu import metric_writers

            tb = metric_writers.create_default_writer(str(workdir / "tb"))
        except ImportError as e:  # metrics still go to metrics.jsonl
            tqdm.write(f"flexmoe: no TensorBoard event files ({e}); pip install clu tensorboard")
    logged = [path.read_text()] if remote and path.exists() else []

    def write(step: int, scalars: dict) -> None:
        line = json.dumps({"step": step, **scalars}) + "\n"
        try:
            if remote:
                logged.append(line)
                storage.write_text(path, "".join(logged))
            else:
                with open(path, "a") as f:
                    f.write(line)
        except OSError as e:
            raise TrainingError(f"cannot write {path}: {e.strerror or e}. To fix: "
                                f"{checkpoint.io_fix(e.errno, workdir)}, then rerun the same command to resume "
                                "from the last checkpoint") from e
        if tb is not None:
            tb.write_scalars(step, scalars)
            tb.flush()

    return write
