"""``flexmoe demo``: the FlexOlmo mini-replication on FlexMix-mini, end to end, on this machine.

Phases (each resumable: a rerun skips what is finished, and a training run interrupted midway
resumes from its last checkpoint):

1. **data**: FlexMix-mini built from the local corpora (``flexmoe data build``).
2. **owners' data**: one data directory per owner holding only the public sources and that
   owner's domain (hard links), so no owner process can read another owner's data.
3. **anchor**: the public dense model, pretrained on the public mix.
4. **experts**: each owner's expert trained in its own OS process (``flexmoe train-expert``) given
   only its own data directory; ``--parallel`` of them at a time.
5. **merge** (top-2, biases kept), **calibration** (public-data bias, no training) and
   **router tuning** (router rows only, public proxy data).
6. **baselines**: BTX (the merged model, every parameter trained on all data) and an unrestricted
   MoE (the anchor upcycled to 6 experts, top-2, trained jointly on all data for the training
   FLOPs all owners spent together; see :mod:`flexmoe_jax.baselines`).
7. **evaluation** of every model (bits per byte, multiple choice) incl. soup, BTM, each owner's
   model, top-3, and each expert opted out; privacy (training-data extraction) of the experts
   and the merged model.
8. **report**: ``results/`` with results.json, findings.json, results.md, plots and timing.json.

Every number in the report is measured in this run; findings are computed from those numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from flexmoe_jax import storage
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.demo_report import findings, findings_text, write_report  # noqa: F401 (the demo's API)
from flexmoe_jax.errors import FlexmoeError, UserError

RESULTS = "results"
# The paper-form BTM's temperature on the mean NLL of the context (fixed, not tuned on results).
BTM_TEMPERATURE = 0.1
PLAN_FILE = "demo_plan.json"


class DemoError(FlexmoeError, RuntimeError):
    """The demo cannot go on; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one demo mode (everything else is shared between modes)."""

    mode: str
    # data
    max_docs_per_domain: int | None
    vocab_size: int
    # the dense anchor (experts inherit it)
    d_model: int
    n_layers: int
    n_heads: int
    mlp_hidden: int
    max_seq_len: int
    # training (every phase uses the same batch shape)
    batch_size: int
    seq_len: int
    anchor_steps: int
    expert_steps: int
    btx_steps: int
    router_tune_steps: int
    unrestricted_experts: int = 6
    top_k: int = 2
    peak_lr: float = 3e-3
    # Share of public rows in the "_replay" experts' training (RunConfig.public_replay).
    public_replay: float = 0.3
    # router tuning proxy data
    rt_per_expert: int = 64
    rt_public: int = 128
    rt_pool: int = 1024
    calibration_batches: int = 8
    # weighted soup: Adam steps on the mixing weights, one public validation batch each
    soup_weight_steps: int = 32
    # evaluation
    eval_batch_size: int = 16
    mc_items: int = 20
    # Each domain's evaluation sample: whole test documents drawn with a fixed seed up to this many
    # tokens (None: the whole test split); the same documents for every model, bpb, routing and MC.
    eval_tokens: int | None = None
    privacy_docs: int = 16

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, mlp_hidden=self.mlp_hidden, max_seq_len=self.max_seq_len)


QUICK = Plan(mode="quick", max_docs_per_domain=80, vocab_size=512, d_model=64, n_layers=2, n_heads=4,
             mlp_hidden=128, max_seq_len=128, batch_size=8, seq_len=64, anchor_steps=60, expert_steps=20,
             btx_steps=10, router_tune_steps=10, rt_per_expert=8, rt_public=16, rt_pool=64,
             calibration_batches=2, soup_weight_steps=8, eval_batch_size=16, mc_items=5, privacy_docs=4)
# Sized for about 30 minutes on 2 CPU cores (measured phase by phase: results/timing.json).
FULL = Plan(mode="full", max_docs_per_domain=None, vocab_size=4096, d_model=192, n_layers=4, n_heads=3,
            mlp_hidden=512, max_seq_len=512, batch_size=16, seq_len=128, anchor_steps=200, expert_steps=32,
            btx_steps=32, router_tune_steps=24, mc_items=8, privacy_docs=8)


def _log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------
# Work directory bookkeeping
# ----------------------------------------------------------------------------

class Workdir:
    """Paths of one demo run and its per-phase timing (kept across resumed runs)."""

    def __init__(self, root: str | os.PathLike, plan: Plan):
        self.root = Path(root).resolve()
        self.plan = plan
        self.data = self.root / "data"
        self.results = self.root / RESULTS
        self.timing_file = self.results / "timing.json"

    def owner_data(self, domain: str) -> Path:
        return self.root / "owners" / domain / "data"

    def expert(self, domain: str, variant: str = "") -> Path:
        """An owner's run directory: ``experts/`` for the default recipe, ``experts_<variant>/`` else."""
        return self.root / (f"experts_{variant}" if variant else "experts") / domain

    def claim(self) -> None:
        """Record the plan; refuse a directory made by another mode (its models have other sizes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        f = self.root / PLAN_FILE
        mine = dataclasses.asdict(self.plan)
        if f.exists():
            theirs = json.loads(f.read_text())
            if theirs != mine:
                other = theirs.get("mode", "?")
                diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
                raise DemoError(f"{self.root} holds a demo run of mode {other!r} whose settings differ from this "
                                f"{self.plan.mode!r} run's ({', '.join(diff)}); pass another --workdir or delete "
                                f"{self.root}")
        else:
            f.write_text(json.dumps(mine, indent=2) + "\n")
        self.results.mkdir(parents=True, exist_ok=True)

    def timing(self) -> dict:
        return json.loads(self.timing_file.read_text()) if self.timing_file.exists() else {}

    def record(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to the phase's wall time (a resumed run adds to what earlier runs spent)."""
        t = self.timing()
        t[phase] = round(t.get(phase, 0.0) + seconds, 1)
        _write_json(self.timing_file, t)


def _write_json(path: Path, obj) -> None:
    storage.write_json(path, obj, sort_keys=False)


def _complete(model_dir: Path) -> bool:
    from flexmoe_jax import checkpoint

    return (model_dir / checkpoint.MARKER_NAME).is_file()


class _Phase:
    """``with _Phase(w, "anchor"):`` prints a header and records the wall time of the phase."""

    def __init__(self, w: Workdir, name: str):
        self.w, self.name = w, name

    def __enter__(self):
        _log(f"\n== {self.name} ==")
        self.t = time.perf_counter()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            secs = time.perf_counter() - self.t
            self.w.record(self.name, secs)
            _log(f"   {self.name}: {secs:.0f} s")


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def build_data(w: Workdir) -> None:
    from flexmoe_jax import data

    try:
        data.build(w.data, max_docs_per_domain=w.plan.max_docs_per_domain, vocab_size=w.plan.vocab_size,
                   progress=True, log=lambda m: _log(f"   {m}"))
    except data.SourceMissing as e:
        raise DemoError(f"{e}; install the corpora with `bash .ci/install_data_sources.sh` (needs root)") from None


def owner_data_dir(data_dir: str | os.PathLike, domain: str, out: str | os.PathLike) -> Path:
    """A data directory with only the public sources and ``domain``: what one owner may read.

    Datasets are hard links into ``data_dir`` (copies where links are impossible); the manifest
    and data card list only what is there, so the owner's expert records a card of its own data.
    """
    from flexmoe_jax import data
    from flexmoe_jax.data import card as card_lib, layout as L, pipeline

    src, out = Path(data_dir), Path(out)
    if out.exists():
        return out
    keep = [*data.PUBLIC_SOURCES, domain]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(L.tokenizer_path(src).parent, L.tokenizer_path(tmp).parent)
    manifest = pipeline.read_manifest(src)
    manifest["configs"] = {c: v for c, v in manifest["configs"].items() if c in keep}
    pipeline.write_json_atomic(tmp / pipeline.MANIFEST, manifest)
    card = card_lib.load(src)
    card["configs"] = {c: v for c, v in card["configs"].items() if c in keep}
    card["data_dir"] = str(out.resolve())
    card_lib.write(tmp, card)

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    for c in keep:
        shutil.copytree(L.dataset_dir(src, L.FLEXMIX_NAME, c), L.dataset_dir(tmp, L.FLEXMIX_NAME, c),
                        copy_function=link)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------
# Training phases
# ----------------------------------------------------------------------------

def _run_config(w: Workdir, **kw):
    from flexmoe_jax import trainer

    p = w.plan
    base = dict(data_dir=str(w.data), batch_size=p.batch_size, seq_len=p.seq_len, log_every=10)
    base.update(kw)
    base.setdefault("checkpoint_every", max(base["steps"] // 2, 1))
    return trainer.RunConfig(**base)


def _optim(steps: int, weight_decay: float, peak_lr: float):
    from flexmoe_jax import optim

    return optim.OptimConfig(peak_lr=peak_lr, warmup_steps=max(1, steps // 10), weight_decay=weight_decay,
                             total_steps=steps)


def train_anchor(w: Workdir) -> Path:
    from flexmoe_jax import data, trainer

    out = w.root / "anchor"
    if not _complete(out / "model"):
        p = w.plan
        rc = _run_config(w, phase="pretrain", task=data.PUBLIC_MIXTURE, steps=p.anchor_steps)
        trainer.run(out, p.model_config(), rc, _optim(p.anchor_steps, 0.1, p.peak_lr))
    return out / "model"


def share_public_rows(w: Workdir, domains: list[str]) -> None:
    """Give each owner's data directory the public sources' packed training rows that the anchor's
    run already made (hard links; public data only, so nothing private moves), instead of every
    owner process packing the same public text again."""
    from flexmoe_jax import data
    from flexmoe_jax.data import tasks

    public = [f"{data.TASK_PREFIX}{c}" for c in data.PUBLIC_SOURCES]
    for d in domains:
        tasks.share_packed_rows(w.data, w.owner_data(d), public, "train", w.plan.seq_len)


def _expert_command(w: Workdir, anchor: Path, domain: str, variant: str = "", extra: Sequence[str] = ()) -> list[str]:
    p = w.plan
    binds = [f"RunConfig.steps={p.expert_steps}", f"RunConfig.batch_size={p.batch_size}",
             f"RunConfig.seq_len={p.seq_len}", f"RunConfig.checkpoint_every={max(p.expert_steps // 2, 1)}",
             "RunConfig.log_every=10", f"OptimConfig.warmup_steps={max(1, p.expert_steps // 10)}",
             f"OptimConfig.peak_lr={p.peak_lr}"]
    if variant == "replay":
        binds.append(f"RunConfig.public_replay={p.public_replay}")
    binds += list(extra)
    command = "train-dense" if variant == "dense" else "train-expert"  # dense: the paper's dense experts
    cmd = [sys.executable, "-m", "flexmoe_jax.cli", command, "--anchor", str(anchor),
           "--task", f"flexmix_mini.{domain}", "--name", domain, "--out", str(w.expert(domain, variant)),
           "--data_dir", str(w.owner_data(domain))]
    for b in binds:
        cmd += ["--gin_param", b]
    return cmd


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _final_loss(run_dir: Path) -> float | None:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return None
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return rows[-1].get("ce") if rows else None


def cpu_slots(parallel: int) -> list[list[int]] | None:
    """Split this process's CPUs into ``parallel`` disjoint sets, one per concurrent owner process
    (None when there are fewer CPUs than processes, or one process). Why: XLA:CPU sizes its
    thread pool to the CPUs it may run on, so two unpinned processes on 2 cores each run 2
    threads and contend; pinned, each owns a core (measured: 40 full-mode training steps took
    107 s pinned vs 112 s unpinned, two processes side by side)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    if parallel <= 1 or len(cpus) < parallel or shutil.which("taskset") is None:
        return None
    return [cpus[i::parallel] for i in range(parallel)]


def train_experts(w: Workdir, anchor: Path, jobs: list[tuple[str, str]], parallel: int,
                  binds: Mapping[str, Sequence[str]] | None = None) -> dict[tuple[str, str], Path]:
    """Train each ``(domain, variant)`` job's expert in its own OS process, given only that owner's
    data directory; ``parallel`` processes at a time, each pinned to its own CPUs
    (:func:`cpu_slots`). Variant ``""`` is the default recipe, ``"replay"`` also replays public data
    (``RunConfig.public_replay``), any other adds its gin ``binds``. Every set shares one queue, so
    no core idles between them. Returns ``{(domain, variant): run directory}``."""
    binds = binds or {}

    def where(job):
        return w.expert(*job)

    def label(job):
        return job[0] + (f" ({job[1]})" if job[1] else "")

    todo = [j for j in jobs
            if not (_complete(where(j) / "model") and (j[1] == "dense" or (where(j) / "expert").is_dir()))]
    # Every compiled program goes to the persistent cache (default: only those over 1 s), so the
    # dozens of small ones each owner process compiles on its core are compiled once, not per owner.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    running: dict[tuple[str, bool], tuple[subprocess.Popen, Path, float]] = {}
    slots = cpu_slots(parallel)
    free = list(range(len(slots))) if slots else []
    slot_of: dict[tuple[str, bool], int] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="experts", unit="owner")
    try:
        while todo or running:
            while todo and len(running) < max(1, parallel):
                job = todo.pop(0)
                where(job).mkdir(parents=True, exist_ok=True)
                log = where(job) / "train.log"
                cmd = _expert_command(w, anchor, *job, extra=binds.get(job[1], ()))
                if slots:
                    slot_of[job] = free.pop(0)
                    cmd = ["taskset", "-c", ",".join(map(str, slots[slot_of[job]]))] + cmd
                with open(log, "a") as f:
                    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
                running[job] = (proc, log, time.perf_counter())
            time.sleep(0.5)
            for job, (proc, log, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[job]
                if job in slot_of:
                    free.append(slot_of.pop(job))
                if proc.returncode != 0:
                    raise DemoError(f"the {label(job)} owner's expert training failed (exit {proc.returncode}); "
                                    f"its log {log} ends with:\n{_tail(log)}\nfix the cause and rerun: finished "
                                    "work is kept")
                w.record(f"expert_{job[0]}" + (f"_{job[1]}" if job[1] else ""), time.perf_counter() - t0)
                ce = _final_loss(where(job))
                bar.write(f"   expert {label(job)}: {time.perf_counter() - t0:.0f} s in its own process, final ce "
                          f"{ce if ce is None else round(ce, 3)}")
                bar.update()
    finally:
        for proc, _, _ in running.values():
            proc.kill()
        bar.close()
    return {j: where(j) for j in jobs}


def merge_experts(w: Workdir, anchor: Path, experts: dict[str, Path], keep_bias: bool = True,
                  name: str | None = None) -> Path:
    """FlexOlmo's merge; ``keep_bias=False`` is the reference's (experts' learned biases dropped)."""
    from flexmoe_jax import merge

    out = w.root / (name or ("merged" if keep_bias else "merged_nobias"))
    if not _complete(out):  # each owner's routing stats are found in its run directory
        merge.merge(anchor, [experts[d] for d in experts], out, top_k=w.plan.top_k, keep_bias=keep_bias,
                    progress=True, routing_stats={"public": public_routing_stats(w)})
    return out


def public_routing_stats(w: Workdir) -> Path:
    """The public data's token counts for domain routing (public data: the builder counts it)."""
    from flexmoe_jax import data, routing

    f = w.root / "public_routing_stats.npz"
    if not f.exists():
        routing.fit(w.data, data.PUBLIC_MIXTURE, routing.PUBLIC, seq_len=w.plan.seq_len).save(f)
    return f


def soup_weights(w: Workdir, anchor: Path, dense: dict[str, Path]) -> list[float]:
    """The weighted soup's weights over {public, dense experts}, fit on public validation batches
    (the builder holds public data only); kept in ``results/soup_weights.json``."""
    from flexmoe_jax import data, eval as eval_lib, soup_weights as sw

    f = w.results / "soup_weights.json"
    members = ["public", *dense]
    if f.exists() and json.loads(f.read_text()).get("members") == members:
        return json.loads(f.read_text())["weights"]
    data.register_tasks(w.data)
    p = w.plan
    batches = data.batches(data.PUBLIC_MIXTURE, "validation", p.batch_size, p.seq_len, w.data, seed=11)
    weights, report = sw.fit([eval_lib.load_model(anchor)] + [eval_lib.load_model(dense[d]) for d in dense],
                             batches, steps=p.soup_weight_steps)
    _write_json(f, {"members": members, **report})
    return report["weights"]


def calibrate(w: Workdir, merged: Path, quantile: float | None = None) -> Path:
    """Public-data bias calibration of the merged router: each expert's mean margin over the
    public expert (or its ``quantile``) on public text brought to <= 0."""
    from flexmoe_jax import checkpoint, data, loading, router_tune

    out = w.root / ("flexolmo_cal" if quantile is None else f"flexolmo_cal_q{round(quantile * 100)}")
    if not _complete(out):
        config, params = loading.load(merged)
        data.register_tasks(w.data)
        p = w.plan
        batches = data.batches(data.PUBLIC_MIXTURE, "train", p.batch_size, p.seq_len, w.data, seed=7)
        config, params, report = router_tune.calibrate_bias(config, params, batches, p.calibration_batches,
                                                            quantile=quantile)
        checkpoint.save(out, config, params, metadata={"calibrated_from": str(merged), "calibration": report})
    return out


def tune_router(w: Workdir, merged: Path) -> Path:
    from flexmoe_jax import router_tune

    out = w.root / "flexolmo_rt"
    if not _complete(out / "model"):
        p = w.plan
        router_tune.tune(merged, out, w.data, top_k=p.top_k, per_expert=p.rt_per_expert, public=p.rt_public,
                         pool=p.rt_pool, gin_params=[f"RunConfig.steps={p.router_tune_steps}",
                                                     f"RunConfig.batch_size={p.batch_size}",
                                                     f"RunConfig.seq_len={p.seq_len}",
                                                     f"RunConfig.checkpoint_every={p.router_tune_steps}",
                                                     f"OptimConfig.warmup_steps={max(1, p.router_tune_steps // 10)}"])
    return out / "model"


def train_btx(w: Workdir, anchor: Path, dense: dict[str, Path]) -> Path:
    """BTX as in the paper: the public model's and the dense experts' FFNs as one MoE's experts, the rest
    averaged (:func:`flexmoe_jax.baselines.btx_init`), then trained on public data only."""
    from flexmoe_jax import baselines, checkpoint, data, trainer

    out = w.root / "btx_public"
    if not _complete(out / "model"):
        p = w.plan
        a_config, a_params = checkpoint.load(anchor)
        config, params = baselines.btx_init(a_config, a_params, {d: checkpoint.load(run / "model")[1]
                                                                 for d, run in dense.items()}, p.top_k)
        rc = _run_config(w, phase="pretrain", task=data.PUBLIC_MIXTURE, steps=p.btx_steps)
        trainer.run(out, config, rc, _optim(p.btx_steps, 0.0, p.peak_lr), params=params)
    return out / "model"


def train_btx_alldata(w: Workdir, merged: Path) -> Path:
    """The merged FlexOlmo, then every parameter trained jointly on all data (closed data included:
    breaks the data restriction; an informative variant, not the paper's BTX)."""
    from flexmoe_jax import data, loading, trainer

    out = w.root / "btx"
    if not _complete(out / "model"):
        p = w.plan
        config, params = loading.load(merged)
        rc = _run_config(w, phase="pretrain", task=data.ALL_MIXTURE, steps=p.btx_steps)
        trainer.run(out, config, rc, _optim(p.btx_steps, 0.0, p.peak_lr), params=params)
    return out / "model"


def train_unrestricted(w: Workdir, anchor: Path, n_owners: int, equal: str = "flops") -> tuple[Path, int]:
    """The anchor upcycled to ``unrestricted_experts`` experts, trained jointly on all data, at the
    paper's two budgets: ``equal="flops"``, the training FLOPs all owners spent together (compiled
    counts, see :func:`step_flops`); ``equal="data"``, as many tokens as all owners together."""
    from flexmoe_jax import baselines, checkpoint, data, trainer

    p = w.plan
    a_config, a_params = checkpoint.load(anchor)
    config, params = baselines.upcycle(a_config, a_params, p.unrestricted_experts, p.top_k)
    per_step = step_flops(w, n_owners)
    if equal == "flops":
        steps = max(1, round(p.expert_steps * n_owners * per_step["expert"]["compiled"]
                             / per_step["unrestricted"]["compiled"]))
    elif equal == "data":
        steps = p.expert_steps * n_owners  # the same batch shape: the same tokens
    else:
        raise UserError(f"equal must be 'flops' or 'data', got {equal!r}")
    out = w.root / ("unrestricted" if equal == "flops" else "unrestricted_equal_data")
    if not _complete(out / "model"):
        rc = _run_config(w, phase="pretrain", task=data.ALL_MIXTURE, steps=steps)
        trainer.run(out, config, rc, _optim(steps, 0.0, p.peak_lr), params=params)
    return out / "model", steps


def step_flops(w: Workdir, n_owners: int) -> dict[str, dict]:
    """FLOPs of one training step of each phase the demo runs, counted by the compiler
    (:func:`flexmoe_jax.flops.routed_step_flops`), with the 6N estimate beside it. Cached in the
    work directory: compiling the eight steps takes a minute on 2 cores."""
    from flexmoe_jax import flops

    cache = w.root / "step_flops.json"
    if cache.exists():
        return json.loads(cache.read_text())
    p = w.plan
    dense = p.model_config()
    merged = dense.replace(num_experts=n_owners + 1, top_k=p.top_k, expert_bias=True)
    phases = {"anchor": (dense, "pretrain"), "expert": (flops.expert_config(dense), "expert"),
              "router_tune": (merged, "router_tune"), "btx": (merged, "pretrain"),
              "unrestricted": (dense.replace(num_experts=p.unrestricted_experts, top_k=p.top_k), "pretrain")}
    out = {}
    for name, (cfg, phase) in phases.items():
        r = flops.routed_step_flops(cfg, phase, p.batch_size, p.seq_len)
        out[name] = {"compiled": r["compiled"], "estimate_6n": r["estimate_6n"], "method": r["method"]}
    _write_json(cache, out)
    return out


def flops_table(w: Workdir, n_owners: int, unrestricted_steps: int, unrestricted_data_steps: int) -> dict[str, dict]:
    """Training FLOPs of each model beyond the shared anchor, and in total, by the compiled count
    (``compiled``) and by 6N (``estimate_6n``); ``vs_flexolmo`` compares compiled counts."""
    p = w.plan
    per_step = step_flops(w, n_owners)

    def spent(phase: str, steps: int) -> dict[str, float]:
        return {k: per_step[phase][k] * steps for k in ("compiled", "estimate_6n")}

    def plus(*parts: dict) -> dict[str, float]:
        return {k: sum(x[k] for x in parts) for k in ("compiled", "estimate_6n")}

    one = spent("expert", p.expert_steps)
    experts = plus(*[one] * n_owners)
    dense = plus(*[spent("anchor", p.expert_steps)] * n_owners)  # a dense expert's step is the anchor's
    rows = {"public": plus(), "expert (one owner)": one, "soup": dense, "btm": dense,
            "soup_flexolmo_experts": experts, "btm_all": experts, "flexolmo": experts,
            "flexolmo_cal": experts, "flexolmo_rt": plus(experts, spent("router_tune", p.router_tune_steps)),
            "flexolmo_replay": experts, "btx": plus(dense, spent("btx", p.btx_steps)),
            "btx_alldata": plus(experts, spent("btx", p.btx_steps)),
            "unrestricted": spent("unrestricted", unrestricted_steps),
            "unrestricted_equal_data": spent("unrestricted", unrestricted_data_steps)}
    anchor = spent("anchor", p.anchor_steps)
    return {k: {"beyond_anchor": v["compiled"], "total": anchor["compiled"] + v["compiled"],
                "beyond_anchor_6n": v["estimate_6n"], "total_6n": anchor["estimate_6n"] + v["estimate_6n"],
                "vs_flexolmo": v["compiled"] / experts["compiled"],
                "vs_flexolmo_6n": v["estimate_6n"] / experts["estimate_6n"]} for k, v in rows.items()}


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------

def _results(w: Workdir, name: str = "results.json") -> dict:
    f = w.results / name
    return json.loads(f.read_text()) if f.exists() else {}


def evaluate_all(w: Workdir, models: dict[str, dict], json_name: str = "results.json") -> dict:
    """Evaluate each ``{name: {"model": path|scorer-factory, "exclude"/"top_k"/"routing"/"routing_stats": ...}}``
    not yet in ``results/json_name``."""
    from flexmoe_jax import eval as eval_lib

    p = w.plan
    done = _results(w, json_name)
    for name, spec in models.items():
        if name in done:
            continue
        t0 = time.perf_counter()
        m = spec["model"]
        m = m() if callable(m) else m
        eval_lib.main_eval({name: m}, w.data, exclude=spec.get("exclude"), top_k=spec.get("top_k"),
                           routing=spec.get("routing", "top_k"), routing_stats=spec.get("routing_stats"),
                           score=spec.get("score"), batch_size=p.eval_batch_size, mc_items_per_domain=p.mc_items,
                           max_tokens=p.eval_tokens, json_out=w.results / json_name, log=None, progress=True)
        w.record(f"eval_{name}", time.perf_counter() - t0)
        r = _results(w, json_name)[name]
        _log(f"   {name}: average bpb {r.get('average', {}).get('bpb', float('nan')):.4f}, "
             f"public bpb {r['public']['bpb']:.4f} ({time.perf_counter() - t0:.0f} s)")
    return _results(w, json_name)


def routing_stats(w: Workdir, experts: dict[str, Path]) -> dict:
    """Each expert's token counts for domain routing (:mod:`flexmoe_jax.routing`): the owners' as their
    own ``train-expert`` processes wrote them (an owner run before they existed counts them now, in a
    ``flexmoe routing-stats`` process given only its own data), the public one from the public data."""
    from flexmoe_jax import routing

    out = {}
    for d, run in experts.items():
        f = Path(run) / routing.STATS_FILE
        if not f.exists():
            subprocess.run([sys.executable, "-m", "flexmoe_jax.cli", "routing-stats", "--data_dir",
                            str(w.owner_data(d)), "--task", f"flexmix_mini.{d}", "--name", d, "--out", str(f)],
                           check=True, capture_output=True, text=True)
        out[d] = routing.Stats.load(f)
    out[routing.PUBLIC] = routing.Stats.load(public_routing_stats(w))
    return out


def routing_all(w: Workdir, models: dict[str, dict], json_name: str = "routing.json",
                groups: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Where each MoE sends each domain's tokens (:func:`flexmoe_jax.eval.routing`), as ``results/json_name``."""
    from flexmoe_jax import eval as eval_lib

    f = w.results / json_name
    done = json.loads(f.read_text()) if f.exists() else {}
    for name, spec in models.items():
        if name in done:
            continue
        config, params = eval_lib.load_model(spec["model"], exclude=spec.get("exclude"), top_k=spec.get("top_k"))
        stats = spec.get("routing_stats")
        if spec.get("routing") == "domain" and stats is None:  # the ones the merged model carries
            stats = eval_lib.checkpoint_routing_stats(spec["model"], config.names)
        done[name] = eval_lib.routing(config, params, w.data, seq_len=w.plan.seq_len,
                                      batch_size=w.plan.eval_batch_size, max_tokens=w.plan.eval_tokens,
                                      mode=spec.get("routing"), routing_stats=stats,
                                      groups=groups, score=spec.get("score"))
        _write_json(f, done)
    return done


def privacy_check(w: Workdir, experts: dict[str, Path], merged: Path) -> dict:
    """The paper's extraction check: each owner's expert on pieces of documents its run was fed
    (replayed from the run's saved data position, :mod:`flexmoe_jax.trained_docs`), the merged model
    on every domain's; pieces of held-out documents of the same domains are the control."""
    from flexmoe_jax import privacy, trained_docs

    f = w.results / "privacy.json"
    if f.exists():
        done = json.loads(f.read_text())
        if all(r.get("selection", {}).get("unit") == "piece"  # made before runs' fed pieces were read
               for per in done.values() for dom in per.values() for r in dom.values()):
            return done
    trained = {d: trained_docs.trained_documents(run, w.data, d) for d, run in experts.items()}
    models = {f"expert_{d}": {"model": path, "domains": [d]} for d, path in experts.items()}
    models["flexolmo"] = {"model": merged, "domains": list(experts)}
    out = {}
    for name, spec in models.items():
        # One generation batch per (domain, split): every sample of every checked document at once.
        out.update(privacy.run({name: spec["model"]}, w.data, spec["domains"], num_docs=w.plan.privacy_docs,
                               trained_from={d: trained[d] for d in spec["domains"]},
                               batch_size=w.plan.privacy_docs * privacy.DEFAULT_SAMPLES, progress=True))
    _write_json(f, out)
    return out


# ----------------------------------------------------------------------------
# The whole demo
# ----------------------------------------------------------------------------

def compile_cache(w: Workdir) -> None:
    """One persistent compilation cache per work directory, for this process and the owners' processes."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(w.root / "cache" / "xla"))
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(workdir: str | os.PathLike, quick: bool = False, parallel: int = 2, domains=None) -> dict:
    """Run (or resume) the demo in ``workdir``; returns ``{"results", "findings", "report"}``."""
    from flexmoe_jax import data, eval as eval_lib

    t_start = time.perf_counter()
    w = Workdir(workdir, QUICK if quick else FULL)
    w.claim()
    compile_cache(w)
    domains = list(domains or data.CLOSED_DOMAINS)

    with _Phase(w, "data"):
        build_data(w)
        for d in domains:
            owner_data_dir(w.data, d, w.owner_data(d))
    with _Phase(w, "anchor"):
        anchor = train_anchor(w)
    with _Phase(w, "experts"):
        share_public_rows(w, domains)
        trained = train_experts(w, anchor, [(d, v) for v in ("", "replay", "dense") for d in domains], parallel)
        experts = {d: trained[d, ""] for d in domains}
        experts_replay = {d: trained[d, "replay"] for d in domains}
        dense = {d: trained[d, "dense"] for d in domains}
    with _Phase(w, "merge"):
        merged = merge_experts(w, anchor, experts)
        merged_nobias = merge_experts(w, anchor, experts, keep_bias=False)
        merged_replay = merge_experts(w, anchor, experts_replay, name="merged_replay")
    with _Phase(w, "calibrate"):
        cal = calibrate(w, merged)
        cal90 = calibrate(w, merged, quantile=0.9)
    with _Phase(w, "router_tune"):
        rt = tune_router(w, merged)
    with _Phase(w, "btx"):
        btx = train_btx(w, anchor, dense)
        btx_alldata = train_btx_alldata(w, merged)
    with _Phase(w, "unrestricted"):
        unrestricted, u_steps = train_unrestricted(w, anchor, len(domains))
        unrestricted_data, ud_steps = train_unrestricted(w, anchor, len(domains), equal="data")

    # One cached scorer per owner model (and the public one): BTM then reuses the log-probs their
    # own rows just computed on the same batches instead of running six models again.
    shared: dict[str, eval_lib.CachedScorer] = {}

    def member(name: str, path: Path):
        if name not in shared:
            shared[name] = eval_lib.CachedScorer(eval_lib.ModelScorer.from_checkpoint(path, name=name))
        return shared[name]

    models: dict[str, dict] = {"public": {"model": lambda: member("public", anchor)}}
    models.update({f"expert_{d}": {"model": lambda d=d: member(f"expert_{d}", experts[d])} for d in domains})
    models.update({f"dense_{d}": {"model": lambda d=d: member(f"dense_{d}", dense[d])} for d in domains})
    # The paper's baselines, from the dense experts: a uniform soup (public model included) and BTM
    # over {public, dense experts} weighted by softmax(-mean NLL of the context / T), top-2.
    models["soup"] = {"model": lambda: eval_lib.soup_scorer(anchor, list(dense.values()))}
    # The weighted soup: mixing weights fit on public validation text only (soup_weights.py).
    models["soup_weighted"] = {"model": lambda: eval_lib.soup_scorer(anchor, list(dense.values()),
                                                                     weights=soup_weights(w, anchor, dense),
                                                                     name="soup_weighted")}
    models["btm"] = {"model": lambda: eval_lib.btm_scorer(member("public", anchor),
                                                          [member(f"dense_{d}", dense[d]) for d in domains],
                                                          top_k=w.plan.top_k, temperature=BTM_TEMPERATURE,
                                                          mean=True)}
    # Informative variants built from the owners' 2-expert FlexOlmo models instead (not the paper's).
    models["soup_flexolmo_experts"] = {"model": lambda: eval_lib.soup_scorer(anchor, list(experts.values()))}
    models["btm_all"] = {"model": lambda: eval_lib.btm_scorer(member("public", anchor),
                                                              [member(f"expert_{d}", experts[d]) for d in domains])}
    models["btx"] = {"model": btx}
    models["btx_alldata"] = {"model": btx_alldata}
    models["unrestricted"] = {"model": unrestricted}
    models["unrestricted_equal_data"] = {"model": unrestricted_data}
    models["flexolmo"] = {"model": merged}
    models["flexolmo_nobias"] = {"model": merged_nobias}
    models["flexolmo_top1"] = {"model": merged, "top_k": 1}
    models["flexolmo_top3"] = {"model": merged, "top_k": 3}
    models["flexolmo_cal"] = {"model": cal}
    models["flexolmo_cal_q90"] = {"model": cal90}
    models["flexolmo_rt"] = {"model": rt}
    models["flexolmo_replay"] = {"model": merged_replay}
    with _Phase(w, "routing_stats"):
        models["flexolmo_domain"] = {"model": merged, "routing": "domain", "routing_stats": routing_stats(w, experts)}
    models.update({f"flexolmo_minus_{d}": {"model": merged, "exclude": [d]} for d in domains})
    with _Phase(w, "evaluate"):
        results = evaluate_all(w, models)
    with _Phase(w, "routing"):
        routes = routing_all(w, {m: models[m] for m in ("flexolmo", "flexolmo_top1", "flexolmo_cal",
                                                          "flexolmo_rt", "flexolmo_replay", "flexolmo_domain",
                                                          "btx", "btx_alldata")})
    with _Phase(w, "privacy"):
        priv = privacy_check(w, experts, merged)
    flops = flops_table(w, len(domains), u_steps, ud_steps)
    docs_file = eval_lib.docs_path(w.results / "results.json")
    docs = json.loads(docs_file.read_text()) if docs_file.exists() else None
    report = write_report(w, results, domains, flops, priv, routes, docs)
    _write_json(w.results / "timing.json", {**w.timing(), "total_this_invocation": round(time.perf_counter() - t_start,
                                                                                         1)})
    _log("\n" + report.read_text())
    _log(f"results in {w.results}")
    return {"results": results, "findings": json.loads((w.results / "findings.json").read_text()),
            "report": str(report)}


def main(args) -> None:
    """``flexmoe demo`` (see cli.py): the replication, or ``--checks`` for the one-minute core checks."""
    if args.checks:
        from flexmoe_jax import demo_checks

        demo_checks.run(args.workdir, quick=args.quick)
        return
    try:
        run(args.workdir, quick=args.quick, parallel=args.parallel)
        if getattr(args, "ablations", False):
            from flexmoe_jax import ablations

            ablations.main(args.workdir, quick=args.quick, parallel=args.parallel)
    except DemoError as e:
        raise UserError(str(e)) from None
