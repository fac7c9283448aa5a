"""Expert parallelism vs gathering the experts: what one device moves and holds.

One MoE layer's training step (forward + backward w.r.t. tokens, router and
experts) compiled for 8 devices (simulated on CPU) in two layouts that give the
same numbers:

- ``expert-parallel``: ``moe.dispatch_sharded`` (what ``model.forward`` runs on a
  mesh): each device keeps its E/expert experts and receives its expert
  group's tokens (all-gather in, reduce-scatter out).
- ``gather experts``: the plain ``moe.dispatch`` on the same shardings, leaving
  the layout to XLA's SPMD partitioner (GSPMD), which all-gathers every
  expert's weights onto every device and reduces their gradients back.

Reported per device, from the compiled program (so independent of machine
load; nothing is timed: 8 simulated devices share this machine's cores, so
wall time would measure the host, not the layout): bytes produced by each kind
of collective, and XLA's peak temporary memory. Run::

    python bench/bench_expert_parallel.py            # OLMo-7B-sized experts (d 4096, h 11008), 8 of them
    python bench/bench_expert_parallel.py --quick    # d 1024, h 2816
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from flexmoe_jax import moe  # noqa: E402
from flexmoe_jax.sharding import make_mesh, named_sharding  # noqa: E402

_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of every collective's result in a compiled (per-device) HLO module, by kind."""
    out = dict.fromkeys(_KINDS, 0)
    for line in hlo.splitlines():
        kind = next((k for k in _KINDS if f" {k}(" in line or f"{k}-start(" in line), None)
        if kind is None or "=" not in line:
            continue
        result = line.split("=", 1)[1].split(kind, 1)[0]
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", result):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            out[kind] += n * _BYTES.get(dtype, 4)
    return out


def layer_step(mesh, e, d, h, k, tokens, impl, dtype, expert_parallel):
    """Compiled (forward + backward) of one MoE layer on ``mesh``."""
    w_axes = (("expert", "embed", "mlp"), ("expert", "embed", "mlp"), ("expert", "mlp", "embed"))
    w_shapes = ((e, d, h), (e, d, h), (e, h, d))
    w = moe.Experts(*(jax.ShapeDtypeStruct(s, dtype, sharding=named_sharding(mesh, a, s))
                      for s, a in zip(w_shapes, w_axes)))
    x = jax.ShapeDtypeStruct((tokens, d), dtype, sharding=named_sharding(mesh, ("batch", None), (tokens, d)))
    router = jax.ShapeDtypeStruct((e, d), jnp.float32, sharding=named_sharding(mesh, (None, "embed"), (e, d)))

    def loss(x, router, w):
        r = moe.route(x, router, None, k)
        y = (moe.dispatch_sharded(x, r, w, mesh, impl) if expert_parallel else moe.dispatch(x, r, w, impl))
        return jnp.sum(y.astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), out_shardings=(x.sharding, router.sharding,
                                                                     moe.Experts(*(a.sharding for a in w))))
    return grad.lower(x, router, w).compile()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="d_model 1024, hidden 2816 instead of 4096 / 11008")
    ap.add_argument("--tokens-per-device", type=int, default=2048)
    ap.add_argument("--impls", default="blocks,ragged")
    args = ap.parse_args()
    d, h = (1024, 2816) if args.quick else (4096, 11008)
    e, k = 8, 2
    tokens = 8 * args.tokens_per_device
    dtype = jnp.bfloat16
    expert_bytes = 3 * d * h * jnp.dtype(dtype).itemsize
    print(f"# one MoE layer, training step (fwd + bwd); {e} experts top-{k}, d_model {d}, hidden {h}, "
          f"{dtype.__name__}, "
          f"{tokens} tokens ({args.tokens_per_device} per device), 8 devices; jax {jax.__version__}")
    print(f"# one expert's weights: {expert_bytes / 2**20:,.0f} MiB; per-device numbers from the compiled program")
    print()
    print("| mesh (data, fsdp, expert, tensor) | path | layout | all-gather MiB | reduce-scatter MiB | all-reduce MiB "
          "| all-to-all MiB | total MiB | peak temp MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in ((1, 1, 8, 1), (2, 1, 4, 1), (1, 2, 4, 1), (1, 1, 4, 2)):
        mesh = make_mesh(*shape)
        for impl in args.impls.split(","):
            for ep in (True, False):
                compiled = layer_step(mesh, e, d, h, k, tokens, impl, dtype, ep)
                moved = collective_bytes(compiled.as_text())
                mem = compiled.memory_analysis()
                temp = getattr(mem, "temp_size_in_bytes", float("nan"))
                mib = [moved[kind] / 2**20 for kind in _KINDS]
                print(f"| {shape} | {impl} | {'expert-parallel' if ep else 'gather experts (GSPMD)'} | "
                      + " | ".join(f"{m:,.0f}" for m in mib) + f" | **{sum(mib):,.0f}** | {temp / 2**20:,.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
