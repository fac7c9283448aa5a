"""``flexmoe compile-check``: compile a phase's training step (or the merged model's forward) for a
real TPU topology from a CPU-only machine, and say whether it fits.

With JAX's TPU build installed (``pip install 'flexmoe_jax[tpu]'``), libtpu describes any TPU slice
without one: ``jax.experimental.topologies.get_topology_desc`` gives its devices, the step is lowered
on a mesh of them with the trainer's own shardings (``train.state_shardings``: each optimizer-state leaf
sharded like its parameter, the whole state donated) and compiled by the TPU compiler. XLA then reports
per-device memory (arguments, outputs, temporaries), FLOPs, and the collectives it inserted. What
fails to fit is a clear error before anyone rents the slice.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flexmoe_jax.errors import UserError

# Slice name -> (libtpu topology name, HBM per chip in GiB). v4/v5p names count TensorCores (2 per
# chip); v5e/v6e names count chips.
TOPOLOGIES = {
    "v4-8": ("v4:2x2x1", 32), "v4-16": ("v4:2x2x2", 32), "v4-32": ("v4:2x2x4", 32),
    "v5p-8": ("v5p:2x2x1", 95), "v5p-16": ("v5p:2x2x2", 95), "v5p-32": ("v5p:2x2x4", 95),
    "v5p-64": ("v5p:2x4x4", 95), "v5p-128": ("v5p:4x4x4", 95), "v5p-256": ("v5p:4x4x8", 95),
    "v5e-4": ("v5e:2x2", 16), "v5e-8": ("v5e:2x4", 16), "v5e-16": ("v5e:4x4", 16), "v5e-256": ("v5e:16x16", 16),
    "v6e-4": ("v6e:2x2", 32), "v6e-8": ("v6e:2x4", 32), "v6e-16": ("v6e:4x4", 32), "v6e-256": ("v6e:16x16", 32),
}
_COLLECTIVE = re.compile(r"=\s*(\([^=]*?\)|\w+\[[^\]]*\](?:\{[^}]*\})?)\s+(all-reduce|all-gather|reduce-scatter|"
                         r"all-to-all|collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}


@dataclasses.dataclass
class Report:
    what: str
    topology: str
    devices: int
    mesh: dict
    bytes_per_device: int
    hbm_bytes: int
    xla_flops_per_device: float
    collective_bytes: dict
    estimate_6n_per_device: float
    # flexmoe_jax.flops.Flops of the compiled program (None: not counted).
    flops_per_device: Any = None
    # XLA's memory_analysis per device: argument, output, alias and temp bytes (peak = arguments + outputs
    # - aliased + temporaries, i.e. bytes_per_device).
    memory: dict = dataclasses.field(default_factory=dict)
    # XLA's own peak of the simulated heap (memory_analysis().peak_memory_in_bytes; None where the
    # backend does not report it): at most bytes_per_device, as buffers whose lives do not overlap share.
    peak_memory: int | None = None

    def to_json(self) -> dict:
        """Every number of the report, as ``--json`` writes it (bench/aot_vs_maxtext reads it)."""
        f = self.flops_per_device
        return {"what": self.what, "topology": self.topology, "devices": self.devices, "mesh": self.mesh,
                "bytes_per_device": self.bytes_per_device, "hbm_bytes": self.hbm_bytes, "fits": self.fits,
                "memory": self.memory, "peak_memory": self.peak_memory,
                "xla_flops_per_device": self.xla_flops_per_device,
                # the compiled matmul count: exact, or (None, a lower bound) where a loop or kernel is unknown
                "compiled_flops_per_device": None if f is None or not f.exact else f.flops,
                "compiled_flops_at_least": None if f is None else f.flops,
                "estimate_6n_per_device": self.estimate_6n_per_device, "collective_bytes": self.collective_bytes}

    @property
    def fits(self) -> bool:
        return self.bytes_per_device <= self.hbm_bytes

    def table(self) -> str:
        gib = 2 ** 30
        rows = [("what", self.what), ("topology", f"{self.topology} ({self.devices} devices)"),
                ("mesh", ", ".join(f"{k}={v}" for k, v in self.mesh.items())),
                ("memory per device", f"{self.bytes_per_device / gib:.2f} GiB of {self.hbm_bytes / gib:.0f} GiB HBM "
                                      f"({self.bytes_per_device / self.hbm_bytes:.0%}): "
                                      f"{'fits' if self.fits else 'DOES NOT FIT'}"
                                      + (f" (XLA's heap peak {self.peak_memory / gib:.2f} GiB)" if self.peak_memory
                                         else "")),
                ("FLOPs per device per step", self._flops()),
                ("collective bytes per step", ", ".join(f"{k} {v / 2**20:,.1f} MiB"
                                                        for k, v in sorted(self.collective_bytes.items())) or "none")]
        return "\n".join(["| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])

    def _flops(self) -> str:
        """The compiled program's matmul count (or "unknown ..." with what it misses) beside the 6N estimate
        and XLA's cost analysis."""
        others = (f"{self.estimate_6n_per_device:.3e} (6N estimate); {self.xla_flops_per_device:.3e} "
                  "(XLA cost analysis, loop bodies counted once)")
        if self.flops_per_device is None:
            return others
        return f"{self.flops_per_device.describe()} (compiled matmuls, loops times their trip counts); {others}"


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each kind of collective produces in one run of a compiled (per-device) HLO module."""
    out: dict[str, int] = {}
    for shape, op in _COLLECTIVE.findall(hlo):
        n = sum(_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                for dt, dims in _ARRAY.findall(shape))
        out[op] = out.get(op, 0) + n
    return out


LIBTPU = "libtpu==0.0.42.1"  # the version jax[tpu]==0.10.2 pins


def libtpu_dir() -> Path:
    """A directory holding JAX's TPU build (:data:`LIBTPU`), installed there from the package registry
    on first use (``~/.cache/flexmoe_jax/``): put it on ``PYTHONPATH`` of a process that should compile
    for TPU without installing libtpu into its environment (whose start-up probing prints to every JAX
    process's stderr). The tests and ``bench/aot_vs_maxtext.py`` run compile-check this way."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flexmoe_jax" / LIBTPU.replace("==", "-")
    if not (cache / "libtpu").is_dir():
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(cache), LIBTPU],
                           capture_output=True, text=True)
        if r.returncode:
            raise UserError(f"{LIBTPU} could not be installed from the package registry into {cache}: "
                            f"{r.stderr.strip()[-300:]}")
    return cache


def topology_devices(name: str):
    """The devices of TPU slice ``name`` (e.g. ``v5p-64``) described by libtpu, and the chip's HBM."""
    if name not in TOPOLOGIES:
        raise UserError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    topo_name, hbm_gib = TOPOLOGIES[name]
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name.replace("v5e-", "v5litepod-"))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError("compile-check needs JAX's TPU build to describe a TPU slice: "
                        "pip install 'flexmoe_jax[tpu]'") from None
    from jax.experimental.topologies import get_topology_desc

    return get_topology_desc(platform="tpu", topology_name=topo_name).devices, hbm_gib * 2 ** 30


def _mesh(shape: Sequence[int], devices):
    from flexmoe_jax.sharding import make_mesh

    shape = list(shape)
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        shape[shape.index(-1)] = len(devices) // max(rest, 1)
    return make_mesh(*shape, devices=devices)


def _compiled_report(what: str, topology: str, mesh, compiled, hbm: int, six_n: float) -> Report:
    mem = compiled.memory_analysis()
    used = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA's own count charges a loop body once (the layer scan, gradient accumulation); flops.compiled_flops
    # counts loops by their trip counts, and says "unknown" where one (or a kernel's cost) is not known.
    from flexmoe_jax import flops

    text = compiled.as_text()
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    return Report(what, topology, mesh.devices.size, dict(mesh.shape), int(used), hbm,
                  float(cost.get("flops", 0.0)), collective_bytes(text), six_n / mesh.devices.size,
                  flops.hlo_flops(text), memory, int(getattr(mem, "peak_memory_in_bytes", 0)) or None)


def train_step(config, rc, ocfg, loss_cfg, topology: str) -> Report:
    """Compile the training step of ``rc.phase`` for ``config`` (the anchor; the phase derives its model)."""
    from flexmoe_jax import flops

    devices, hbm = topology_devices(topology)
    compiled, cfg, mesh = flops.compile_train_step(config, rc.phase, rc.batch_size, rc.seq_len,
                                                 grad_accum=rc.grad_accum, mesh=_mesh(rc.mesh, devices),
                                                 ocfg=ocfg, loss_cfg=loss_cfg)
    six_n = flops.flops_per_token(cfg, rc.seq_len) * rc.batch_size * rc.seq_len
    return _compiled_report(f"{rc.phase} training step, batch {rc.batch_size} x {rc.seq_len}", topology, mesh,
                            compiled, hbm, six_n)


def forward(config, batch_size: int, seq_len: int, mesh_shape: Sequence[int], topology: str) -> Report:
    """Compile the (merged) model's forward pass: logits for ``batch_size`` x ``seq_len`` tokens."""
    import jax

    from flexmoe_jax import flops, model, train

    devices, hbm = topology_devices(topology)
    mesh = _mesh(mesh_shape, devices)
    shapes = model.param_shapes(config)
    sh = model.param_shardings(config, mesh)
    params = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes, sh)
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), np.int32, sharding=train.batch_sharding(mesh))
    compiled = jax.jit(lambda p, t: model.apply(config, p, t, mesh=mesh)[0]).lower(params, tokens).compile()
    what = (f"forward of {config.num_experts} experts top-{config.top_k}" if config.is_moe else "dense forward")
    six_n = flops.flops_per_token(config, seq_len) / 3 * batch_size * seq_len  # forward: 2N
    return _compiled_report(f"{what}, batch {batch_size} x {seq_len}", topology, mesh, compiled, hbm, six_n)


def main(args) -> int:
    """``flexmoe compile-check``: print the report; 2 when it does not fit."""
    from flexmoe_jax import optim, train, trainer
    from flexmoe_jax.config import ModelConfig, gin_scope

    with gin_scope(args.gin_file, args.gin_param):
        config, rc = ModelConfig(), trainer.RunConfig()
        ocfg, loss_cfg = optim.OptimConfig(), train.LossConfig()
    if ocfg.total_steps is None:
        ocfg = dataclasses.replace(ocfg, total_steps=rc.steps)
    what = "forward" if args.forward else f"{rc.phase} training step"
    try:
        if args.forward:
            report = forward(config, rc.batch_size, rc.seq_len, rc.mesh, args.topology)
        else:
            report = train_step(config, rc, ocfg, loss_cfg, args.topology)
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses a program that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        detail = " ".join(str(e).split())[:300]
        print(f"| what | {what}, batch {rc.batch_size} x {rc.seq_len} |\n| topology | {args.topology} |\n"
              f"| memory per device | DOES NOT FIT: the TPU compiler says {detail} |")
        print(f"flexmoe compile-check: the {what} does not fit {args.topology}: use a larger slice, more fsdp, a "
              "smaller batch per device or RunConfig.grad_accum")
        return 2
    print(report.table())
    if args.json:
        from flexmoe_jax import storage

        storage.write_json(args.json, report.to_json(), sort_keys=False)
    if not report.fits:
        print(f"flexmoe compile-check: {report.what} needs {report.bytes_per_device / 2**30:.2f} GiB per device, "
              f"more than the {report.hbm_bytes / 2**30:.0f} GiB of {args.topology}: use a larger slice, more fsdp, "
              "a smaller batch per device or RunConfig.grad_accum")
        return 2
    return 0
