"""Merge time vs the time to just read and write the same bytes.

    python bench/bench_merge.py [--quick] [--layers N] [--experts N] [--rounds R] [--dir DIR]

Two models, random weights (the bytes are what matters; random floats do not
compress, like trained weights):

- ``tiny``: vocab 512, d_model 32, 2 layers, hidden 64 (the test model);
- ``1B-shaped``: ``gin_configs/model/olmo2_1b.gin`` (vocab 100352, d_model 2048,
  16 heads, hidden 8192, fp32 parameters) with ``--layers`` layers (default 4 of
  16: on a 2-core box with ~23 GB of RAM and ~100 MB/s Orbax throughput the full
  depth takes many minutes per round; the table states the layers and bytes).

Each round, in a fresh child process (so peak RSS is the operation's own):

- ``merge``: ``flexmoe_jax.merge.merge(anchor, N deliverables, out)``: read the
  anchor and every deliverable, check them (fingerprint, checksums, shapes),
  write shared params + one Orbax dir per expert, manifest with sha256 of
  every array, atomic rename;
- ``read+write (Orbax)``: restore the same input checkpoints as host arrays and
  save all of them as one checkpoint with ``checkpoint.save_tree`` (Orbax,
  atomic, fsynced: how every checkpoint here is written): the same bytes in and
  out, no checks, no hashing. The ratio column is merge / this;
- ``read+write (numpy)``: ``np.load``/``np.save`` of the same arrays (raw
  bytes, no compression), for scale.

Before each operation its input files are read once, so every row reads from
the page cache alike; outputs other than the merge's are deleted after each
operation. The clock starts after every module any operation uses is imported
(Orbax's import alone outlasts the tiny read+write). Also timed: ``loading.load``
of the result, whole and with one expert excluded (never read).

The closing summary gives, per model, the ratio (target <= 2x) and the merge's
peak RSS beside the issue's memory goal, "output + one expert" (the bytes of the
merged model plus one deliverable). A benchmark: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    """This process's peak resident memory (VmHWM: per address space, so not inherited through exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------
# Child processes: one operation each, reporting its wall time and peak RSS
# ----------------------------------------------------------------------------

def _child(op: str, spec: dict) -> dict:
    import logging

    from flexmoe_jax import checkpoint, loading, merge

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("flexmoe_jax.merge").setLevel(logging.INFO)  # the merge's phase timings, on stderr
    # Every module any operation here uses is imported before the clock starts (Orbax
    # alone takes ~0.5 s to import, more than the whole tiny read+write): a process pays
    # that once, whatever it does next, so it belongs to no operation's time.
    for module in ("orbax.checkpoint", "tqdm", "flexmoe_jax.expert"):
        importlib.import_module(module)

    base = _rss_mb()  # after imports: the interpreter, numpy, jax, orbax
    out = Path(spec["out"])
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    if op == "merge":
        merge.merge(spec["anchor"], spec["experts"], out, public_router="zeros")
    elif op == "orbax":
        trees = {"anchor": checkpoint.read_arrays(Path(spec["anchor"]) / "params")}
        for i, e in enumerate(spec["experts"]):
            trees[f"expert{i}"] = checkpoint.read_arrays(Path(e) / "params")
        checkpoint.save_tree(out, trees, {}, checksums=False)  # atomic + fsync, like every checkpoint write
    elif op == "numpy":
        out.mkdir()
        for f in sorted(Path(spec["npy"]).glob("*.npy")):
            np.save(out / f.name, np.load(f))
    elif op == "load_all":
        loading.load(spec["merged"])
    elif op == "load_excl":
        loading.load(spec["merged"], exclude=[spec["exclude"]])
    else:
        raise ValueError(op)
    secs = time.perf_counter() - t
    return {"s": secs, "peak_mb": _rss_mb(), "base_mb": base}


def _run_child(op: str, spec: dict) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__, "--child", op, json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child {op} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["phases"] = [line for line in proc.stderr.splitlines() if "in phases" in line]
    return result


def _warm(paths) -> None:
    """Read input files once so every operation starts with its inputs in the page cache."""
    for p in paths:
        for f in Path(p).rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

def _nbytes(tree) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _make_inputs(cfg, n_experts: int, root: Path, seed: int = 0) -> dict:
    """The anchor checkpoint, N deliverables (trainer format) and the same arrays as .npy files."""
    import jax

    from flexmoe_jax import checkpoint, expert, model, optim

    rng = np.random.default_rng(seed)

    def rand(shape, dtype):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    anchor = jax.tree.map(lambda s: rand(s.shape, s.dtype), model.param_shapes(cfg))
    checkpoint.save(root / "anchor", cfg, anchor)
    fp = expert.fingerprint(cfg, anchor)
    npy = root / "npy"
    npy.mkdir()
    for k, v in optim.flatten(anchor).items():
        np.save(npy / f"anchor.{k.replace('/', '.')}.npy", v)
    in_bytes = _nbytes(anchor)
    L, d, h = cfg.n_layers, cfg.d_model, cfg.mlp_hidden
    ecfg_base = cfg.replace(num_experts=2, top_k=2, expert_bias=True)
    del anchor
    experts = []
    for i in range(n_experts):
        name = f"domain{i}"
        pdt = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else jax.numpy.bfloat16
        trainable = {"layers/moe/gate#1": rand((L, 1, d, h), pdt), "layers/moe/up#1": rand((L, 1, d, h), pdt),
                     "layers/moe/down#1": rand((L, 1, h, d), pdt), "layers/moe/router#1": rand((L, 1, d), pdt),
                     "layers/moe/bias#1": -np.abs(rand((L, 1), pdt))}
        expert.save_deliverable(root / name, ecfg_base.replace(expert_names=("public", name)), trainable,
                                {"anchor_fingerprint": fp, "task": name})
        for k, v in trainable.items():
            np.save(npy / f"{name}.{k.replace('/', '.').replace('#', '_')}.npy", v)
        in_bytes += _nbytes(trainable)
        expert_bytes = _nbytes(trainable)
        experts.append(str(root / name))
    return {"anchor": str(root / "anchor"), "experts": experts, "npy": str(npy), "bytes": in_bytes,
            "expert_bytes": expert_bytes}


def _bench(label: str, cfg, n_experts: int, rounds: int, workdir: Path, note: str = "") -> tuple[list[str], str]:
    root = Path(tempfile.mkdtemp(prefix="bench_merge_", dir=workdir))
    try:
        t = time.perf_counter()
        spec = _make_inputs(cfg, n_experts, root)
        setup = time.perf_counter() - t
        times: dict[str, list[dict]] = {"merge": [], "orbax": [], "numpy": []}
        ops = list(times)
        for r in range(rounds):  # interleaved, order rotated, so machine load hits every row alike
            for op in ops[r % 3:] + ops[:r % 3]:
                out = root / f"out_{op}"
                _warm([spec["npy"]] if op == "numpy" else [spec["anchor"], *spec["experts"]])
                times[op].append(_run_child(op, dict(spec, out=str(out))))
                if op != "merge":
                    shutil.rmtree(out)  # keep the page cache and the disk for the inputs
        merged = root / "out_merge"  # the last round's merge
        out_disk = _du(merged)
        phases = times["merge"][-1]["phases"]
        loads = {}
        for op in ("load_all", "load_excl"):
            _warm([merged])
            loads[op] = _run_child(op, {"merged": str(merged), "exclude": "domain0", "out": str(root / "unused")})
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ref = statistics.median(r["s"] for r in times["orbax"])
    gb = spec["bytes"] / 1e9
    rows = []
    names = {"merge": f"merge ({n_experts} experts)", "orbax": "read+write same bytes (Orbax)",
             "numpy": "read+write same bytes (numpy .npy)"}
    for op, rs in times.items():
        s = statistics.median(r["s"] for r in rs)
        peak = max(r["peak_mb"] - r["base_mb"] for r in rs)
        rows.append(f"| {label} | {names[op]} | {s:.2f} | {gb / s:.2f} | {s / ref:.2f}x | {peak:,.0f} |")
    for op, r in loads.items():
        what = "loading.load, all experts" if op == "load_all" else "loading.load, exclude 1 (never read)"
        rows.append(f"| {label} | {what} | {r['s']:.2f} | | | {r['peak_mb'] - r['base_mb']:,.0f} |")
    print(f"{label}: {cfg.n_layers} layers, d_model {cfg.d_model}, hidden {cfg.mlp_hidden}, vocab {cfg.vocab_size}, "
          f"{cfg.param_dtype}; {n_experts} experts; bytes in = bytes out = {spec['bytes'] / 1e6:,.1f} MB "
          f"(merged dir on disk {out_disk / 1e6:,.1f} MB, Orbax zstd); setup {setup:.0f}s; {rounds} rounds{note}",
          flush=True)
    for line in phases:
        print(f"  last merge: {line}", flush=True)
    merge_s = statistics.median(r["s"] for r in times["merge"])
    merge_peak = max(r["peak_mb"] - r["base_mb"] for r in times["merge"])
    orbax_peak = max(r["peak_mb"] - r["base_mb"] for r in times["orbax"])
    goal_mb = (spec["bytes"] + spec["expert_bytes"]) / 2**20  # the memory goal: output + one expert
    moved = f"{spec['bytes'] / 1e9:.2f} GB" if spec["bytes"] >= 1e8 else f"{spec['bytes'] / 1e6:.1f} MB"
    summary = (f"| {label} ({moved} moved) | {merge_s:.2f} | {ref:.2f} | {merge_s / ref:.2f}x | "
               f"{merge_peak:,.0f} / {orbax_peak:,.0f} | {goal_mb:,.1f} | {merge_peak / goal_mb:.2f} |")
    return rows, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--layers", type=int, default=4, help="layers of the 1B-shaped model (default: %(default)s of 16)")
    ap.add_argument("--experts", type=int, default=3, help="experts to merge (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds for the tiny model (default: %(default)s)")
    ap.add_argument("--big_rounds", type=int, default=1, help="rounds for the 1B-shaped model (default: %(default)s)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: the system temp dir)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], json.loads(args.child[1]))))
        return

    from flexmoe_jax.config import ModelConfig, from_gin

    workdir = Path(args.dir or tempfile.gettempdir())
    tiny = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=64)
    rows, summary = _bench("tiny", tiny, args.experts, args.rounds, workdir)
    summaries = [summary]
    if not args.quick:
        big = from_gin(["model/olmo2_1b.gin"]).replace(n_layers=args.layers)
        note = f" (olmo2_1b.gin shapes, {args.layers} of 16 layers to fit this box)" if args.layers != 16 else ""
        big_rows, summary = _bench("1B-shaped", big, args.experts, args.big_rounds, workdir, note)
        rows += big_rows
        summaries.append(summary)
    print()
    print("| model | operation | s (median) | GB/s (input bytes) | vs Orbax read+write | peak RSS MB (over imports) |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    print()
    print(f"Summary, {args.experts} experts (targets: merge <= 2x read+write; peak memory near output + one expert):")
    print()
    print("| model | merge s | read+write s | ratio | peak RSS MB (merge / read+write) | output + one expert MB "
          "| merge peak / that |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(summaries))


if __name__ == "__main__":
    main()
