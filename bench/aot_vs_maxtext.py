"""The same Mixtral-like MoE training step AOT-compiled for real TPU topologies by flexmoe_jax and by
MaxText, side by side: per-chip memory, compiled FLOPs, collective bytes. No TPU needed (libtpu
describes the slice); not in CI (MaxText is a large install with its own jax).

    python bench/aot_vs_maxtext.py --setup_maxtext        # once: a Python 3.12 venv with maxtext 0.2.5
    python bench/aot_vs_maxtext.py [--cases v5p-8/fsdp v5p-8/expert v5p-16/fsdp] [--out DIR]

The shape (``gin_configs/model/mixtral_795m.gin``; MaxText's ``mixtral-8x7b`` with the same
overrides): d_model 1024, 8 layers, 16 query / 8 KV heads of 64, 8 experts x 3584, top-2, vocab
32000, seq 2048, 8 rows per chip, bf16 compute on fp32 weights, full remat, AdamW. Three programs per
case: flexmoe's full MoE training step (``phase/pretrain.gin``), flexmoe's FlexOlmo expert step (one
new expert trained against a frozen dense anchor of the same shape, ``phase/expert.gin``) and MaxText's
``train_compile`` of its mixtral step (megablox, as MaxText ships it). Each runs in its own process:
flexmoe with the project's jax and libtpu from :func:`flexmoe_jax.compile_check.libtpu_dir`, MaxText
in its own venv (MaxText 0.2.5 needs Python >= 3.12 and jax >= 0.11.1). Both programs' optimized HLO is
counted by the same code (:func:`flexmoe_jax.flops.hlo_flops`, :func:`flexmoe_jax.compile_check.
collective_bytes`), so the FLOPs and collective bytes compare like with like; memory is XLA's
``memory_analysis`` of each (peak = arguments + outputs - aliased + temporaries).

Writes ``OUT/aot_vs_maxtext.json`` and prints one markdown table per case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flexmoe_jax import compile_check, flops  # noqa: E402

MAXTEXT = "maxtext[tpu]==0.2.5"
DEFAULT_VENV = ROOT / "bench" / ".venv-maxtext"
ROWS_PER_CHIP = 8
# MaxText's mixtral-8x7b block, shrunk to the side-by-side shape (its --override_model_config).
MAXTEXT_SHAPE = {"model_name": "mixtral-8x7b", "override_model_config": "true", "base_emb_dim": 1024,
                 "base_num_query_heads": 16, "base_num_kv_heads": 8, "head_dim": 64, "base_mlp_dim": 3584,
                 "base_moe_mlp_dim": 3584, "base_num_decoder_layers": 8, "max_target_length": 2048,
                 "per_device_batch_size": ROWS_PER_CHIP, "dtype": "bfloat16", "weight_dtype": "float32",
                 "remat_policy": "full", "opt_type": "adamw", "megablox": "true", "sparse_matmul": "true",
                 "dataset_type": "synthetic", "enable_checkpointing": "false", "compile_topology_num_slices": 1}


@dataclasses.dataclass(frozen=True)
class Case:
    """One topology and mesh, as flexmoe's RunConfig.mesh (data, fsdp, expert, tensor) and MaxText's ici_*."""

    name: str
    topology: str
    mesh: tuple[int, int, int, int]

    @property
    def chips(self) -> int:
        return self.mesh[0] * self.mesh[1] * self.mesh[2] * self.mesh[3]

    def maxtext_mesh(self) -> dict:
        d, f, e, t = self.mesh
        return {"ici_data_parallelism": d, "ici_fsdp_parallelism": f, "ici_expert_parallelism": e,
                "ici_tensor_parallelism": t}


CASES = {c.name: c for c in (Case("v5p-8/fsdp", "v5p-8", (1, 4, 1, 1)),
                             Case("v5p-8/expert", "v5p-8", (1, 1, 4, 1)),
                             Case("v5p-16/fsdp", "v5p-16", (1, 8, 1, 1)))}


def _hlo_numbers(hlo: str) -> dict:
    f = flops.hlo_flops(hlo)
    return {"compiled_flops_per_device": f.flops if f.exact else None, "compiled_flops_at_least": f.flops,
            "collective_bytes": compile_check.collective_bytes(hlo)}


def flexmoe_step(case: Case, phase: str, work: Path) -> dict:
    """``flexmoe compile-check`` of ``phase`` for ``case`` (its --json), in a process with libtpu."""
    out = work / f"flexmoe_{phase}.json"
    work.mkdir(parents=True, exist_ok=True)
    gin = ["--gin_file", f"phase/{phase}.gin", "--gin_file", "model/mixtral_795m.gin",  # the phase first: its defaults
           "--gin_param", f"RunConfig.mesh={case.mesh}",
           "--gin_param", f"RunConfig.batch_size={ROWS_PER_CHIP * case.chips}",
           "--gin_param", "RunConfig.seq_len=2048"]
    if phase == "expert":  # a dense anchor of the same shape, one new expert
        gin += ["--gin_param", "ModelConfig.num_experts=0", "--gin_param", 'RunConfig.anchor="anchor"',
                "--gin_param", 'RunConfig.expert_name="owner"']
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=os.pathsep.join([str(compile_check.libtpu_dir()), str(ROOT)]), JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-m", "flexmoe_jax.cli", "compile-check", *gin, "--topology", case.topology,
                        "--json", str(out)], capture_output=True, text=True, env=env)
    if r.returncode not in (0, 2) or not out.exists():
        raise RuntimeError(f"flexmoe compile-check ({phase}, {case.name}) failed:\n{r.stdout[-2000:]}\n"
                           f"{r.stderr[-3000:]}")
    rep = json.loads(out.read_text())
    return {"bytes": rep["bytes_per_device"], "peak": rep["peak_memory"], **rep["memory"],
            "xla_flops": rep["xla_flops_per_device"],
            "compiled_flops_per_device": rep["compiled_flops_per_device"],
            "compiled_flops_at_least": rep["compiled_flops_at_least"], "six_n": rep["estimate_6n_per_device"],
            "collective_bytes": rep["collective_bytes"]}


def maxtext_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"no MaxText venv at {venv}: run `python bench/aot_vs_maxtext.py --setup_maxtext` "
                         "(needs a Python >= 3.12: --python312 PATH) or pass --maxtext_venv")
    return py


def setup_maxtext(venv: Path, python312: str | None) -> None:
    """A venv at ``venv`` with :data:`MAXTEXT` (its jax and libtpu) from the package registry."""
    py = python312 or shutil.which("python3.12") or next(
        (str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))), None)
    if not py:
        raise SystemExit("MaxText 0.2.5 needs Python >= 3.12 and none was found: pass --python312 PATH")
    subprocess.run([py, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", MAXTEXT], check=True)


# Run in MaxText's venv: its own train_compile.main, with jit_and_compile wrapped to keep the compiled
# step, whose memory_analysis (peak included), cost_analysis and optimized HLO are written out.
_MAXTEXT_DRIVER = """
import json, sys
from maxtext.trainers.pre_train import train_compile as tc
out, argv = sys.argv[1], sys.argv[2:]
kept = {}
def keep(*a, _f=tc.jit_and_compile, **k):
    kept["c"] = _f(*a, **k)
    return kept["c"]
tc.jit_and_compile = keep
tc.main(["train_compile", *argv])
c = kept["c"]
m, cost = c.memory_analysis(), c.cost_analysis()
cost = cost[0] if isinstance(cost, (list, tuple)) else cost
open(out + ".hlo", "w").write(c.as_text())
json.dump({"memory": {k: int(getattr(m, k + "_size_in_bytes")) for k in ("argument", "output", "alias", "temp")},
           "peak_memory": int(getattr(m, "peak_memory_in_bytes", 0)), "xla_flops": float(cost.get("flops", 0.0))},
          open(out, "w"))
"""


def maxtext_step(case: Case, venv: Path, work: Path) -> dict:
    """MaxText's own ``train_compile`` of its mixtral step for ``case``."""
    py = maxtext_python(venv)
    base = subprocess.run([str(py), "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    overrides = {**MAXTEXT_SHAPE, **case.maxtext_mesh(), "compile_topology": case.topology, "run_name": "aot",
                 "base_output_directory": str(work / "maxtext_out")}
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu")
    out = work / "maxtext.json"
    work.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([str(py), "-c", _MAXTEXT_DRIVER, str(out), f"{base}/configs/base.yml",
                        *(f"{k}={v}" for k, v in overrides.items())], capture_output=True, text=True, env=env)
    if r.returncode or not out.exists():
        raise RuntimeError(f"MaxText train_compile ({case.name}) failed:\n{(r.stdout + r.stderr)[-4000:]}")
    rep = json.loads(out.read_text())
    m = rep["memory"]
    return {"bytes": m["argument"] + m["output"] - m["alias"] + m["temp"], "peak": rep["peak_memory"] or None, **m,
            "xla_flops": rep["xla_flops"], **_hlo_numbers(Path(str(out) + ".hlo").read_text())}


PROGRAMS = ("flexmoe full MoE step", "flexmoe expert step", "MaxText mixtral")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def run_case(case: Case, venv: Path, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    return {PROGRAMS[0]: flexmoe_step(case, "pretrain", work), PROGRAMS[1]: flexmoe_step(case, "expert", work),
            PROGRAMS[2]: maxtext_step(case, venv, work)}


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f} GB"


def _fl(x) -> str:
    return "-" if x is None else f"{x:.3e}"


def table(case: Case, r: dict) -> str:
    """One markdown table: a row per number, a column per program, then the full step's ratio to MaxText's."""
    full, mt = r[PROGRAMS[0]], r[PROGRAMS[2]]
    ratio = lambda a, b: "-" if not a or not b else f"{a / b:.2f}x"  # noqa: E731
    flops_cell = lambda p: (_fl(p["compiled_flops_per_device"]) if p["compiled_flops_per_device"] is not None  # noqa: E731
                            else f"unknown (at least {_fl(p['compiled_flops_at_least'])})")
    rows = [("argument bytes", lambda p: _gb(p["argument"]), "argument"),
            ("temp bytes", lambda p: _gb(p["temp"]), "temp"),
            ("**peak** (memory_analysis peak_memory)", lambda p: _gb(p["peak"]), "peak"),
            ("arguments + outputs - aliased + temp", lambda p: _gb(p["bytes"]), "bytes"),
            ("**compiled matmul FLOPs** (flexmoe_jax.flops on each HLO)", flops_cell, "compiled_flops_at_least"),
            ("XLA cost_analysis FLOPs", lambda p: _fl(p["xla_flops"]), "xla_flops"),
            ("6N estimate", lambda p: _fl(p.get("six_n")), "six_n")]
    rows += [(f"{c} bytes", lambda p, c=c: f"{p['collective_bytes'].get(c, 0) / 2**20:,.1f} MiB", c)
             for c in COLLECTIVES]

    def raw(p, key):
        if key == "compiled_flops_at_least":  # a ratio of lower bounds means nothing
            return p["compiled_flops_per_device"]
        return p["collective_bytes"].get(key, 0) if key in COLLECTIVES else p.get(key)

    lines = [f"**{case.name}** ({case.topology}, {case.chips} chips, mesh data/fsdp/expert/tensor = "
             f"{'/'.join(map(str, case.mesh))}, {ROWS_PER_CHIP} rows of 2048 per chip), per chip:", "",
             "| | " + " | ".join(PROGRAMS) + " | full step / MaxText |", "|---" * (len(PROGRAMS) + 2) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r[p]) for p in PROGRAMS) + f" | {ratio(raw(full, key), raw(mt, key))} |"
              for name, cell, key in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--maxtext_venv", type=Path, default=DEFAULT_VENV, help=f"MaxText's venv (default {DEFAULT_VENV})")
    ap.add_argument("--setup_maxtext", action="store_true", help=f"create --maxtext_venv with {MAXTEXT} and stop")
    ap.add_argument("--python312",
                    help="the Python >= 3.12 for --setup_maxtext (default: python3.12 on PATH, else pyenv's)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where aot_vs_maxtext.json goes")
    args = ap.parse_args(argv)
    if args.setup_maxtext:
        setup_maxtext(args.maxtext_venv, args.python312)
        return 0
    maxtext_python(args.maxtext_venv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            case = CASES[name]
            results[name] = run_case(case, args.maxtext_venv, Path(tmp) / name.replace("/", "_"))
            print(table(case, results[name]) + "\n", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aot_vs_maxtext.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'aot_vs_maxtext.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
