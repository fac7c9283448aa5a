"""The owners' experts: each trained by ``flexmoe train-expert`` in its own OS process on its own data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Mapping, Sequence

from flexmoe_jax.demo.plan import DemoError
from flexmoe_jax.demo.workdir import Workdir, complete

Job = tuple[str, str]  # (domain, variant)


def _expert_command(w: Workdir, anchor: Path, domain: str, variant: str = "", extra: Sequence[str] = ()) -> list[str]:
    """The command line of one owner's run: ``train-dense`` for variant ``"dense"``, else ``train-expert``;
    variant ``"replay"`` adds the plan's public replay, ``extra`` more gin bindings."""
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
    if command == "train-expert":  # the private routing stats' noise, seeded so a demo rerun is the same
        cmd += ["--routing_seed", str(routing_seed(domain))]
    return cmd


def routing_seed(domain: str) -> int:
    """The demo's seed for one owner's private routing-stats noise (real owners draw OS entropy)."""
    return zlib.crc32(domain.encode())


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
    """Split this process's CPUs into ``parallel`` disjoint sets, one per concurrent owner process;
    None for one process, fewer CPUs than processes, no ``taskset`` or not Linux (docs/demo.md)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    if parallel <= 1 or len(cpus) < parallel or shutil.which("taskset") is None:
        return None
    return [cpus[i::parallel] for i in range(parallel)]


def _label(job: Job) -> str:
    return job[0] + (f" ({job[1]})" if job[1] else "")


def _finished(w: Workdir, job: Job) -> bool:
    where = w.expert(*job)
    return complete(where / "model") and (job[1] == "dense" or (where / "expert").is_dir())


def _launch(w: Workdir, anchor: Path, job: Job, extra: Sequence[str], cpus: list[int] | None,
            env: dict) -> tuple[subprocess.Popen, Path, float]:
    """Start one owner's process (pinned to ``cpus`` when given), appending to its ``train.log``."""
    w.expert(*job).mkdir(parents=True, exist_ok=True)
    log = w.expert(*job) / "train.log"
    cmd = _expert_command(w, anchor, *job, extra=extra)
    if cpus:
        cmd = ["taskset", "-c", ",".join(map(str, cpus))] + cmd
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, log, time.perf_counter()


def _report_done(w: Workdir, job: Job, proc: subprocess.Popen, log: Path, t0: float, bar) -> None:
    """Record a finished process's time and final loss; DemoError (with its log's tail) when it failed."""
    if proc.returncode != 0:
        raise DemoError(f"the {_label(job)} owner's expert training failed (exit {proc.returncode}); "
                        f"its log {log} ends with:\n{_tail(log)}\nfix the cause and rerun: finished "
                        "work is kept")
    w.record(f"expert_{job[0]}" + (f"_{job[1]}" if job[1] else ""), time.perf_counter() - t0)
    ce = _final_loss(w.expert(*job))
    bar.write(f"   expert {_label(job)}: {time.perf_counter() - t0:.0f} s in its own process, final ce "
              f"{ce if ce is None else round(ce, 3)}")
    bar.update()


def train_experts(w: Workdir, anchor: Path, jobs: list[Job], parallel: int,
                  binds: Mapping[str, Sequence[str]] | None = None) -> dict[Job, Path]:
    """Train each unfinished ``(domain, variant)`` job's expert in its own OS process, given only that
    owner's data directory; ``parallel`` processes at a time from one queue, each pinned to its own
    CPUs (:func:`cpu_slots`). Variant ``""`` is the default recipe, ``"replay"`` also replays public
    data, ``"dense"`` trains the whole anchor, any other adds its gin ``binds``. DemoError when a run
    fails. Returns ``{(domain, variant): run directory}``."""
    binds = binds or {}
    todo = [j for j in jobs if not _finished(w, j)]
    # Every compiled program goes to the persistent cache (default: only those over 1 s), so the
    # small ones each owner process compiles are compiled once, not per owner.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    running: dict[Job, tuple[subprocess.Popen, Path, float]] = {}
    slots = cpu_slots(parallel)
    free = list(range(len(slots))) if slots else []
    slot_of: dict[Job, int] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="experts", unit="owner")
    try:
        while todo or running:
            while todo and len(running) < max(1, parallel):
                job = todo.pop(0)
                if slots:
                    slot_of[job] = free.pop(0)
                cpus = slots[slot_of[job]] if slots else None
                running[job] = _launch(w, anchor, job, binds.get(job[1], ()), cpus, env)
            time.sleep(0.5)
            for job, (proc, log, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[job]
                if job in slot_of:
                    free.append(slot_of.pop(job))
                _report_done(w, job, proc, log, t0, bar)
    finally:
        for proc, _, _ in running.values():
            proc.kill()
        bar.close()
    return {j: w.expert(*j) for j in jobs}
