"""One accelerator check in one table: what JAX sees, forward and train-step speed, MFU, memory.

    bash bench/device_check.sh [--tiny] [--batch B] [--seq S] [--rounds R]

Rows, all in one process, interleaved round by round (ratios are what to read):

- ``forward <impl>``: a 1B-shaped FlexOlmo (``olmo2_1b`` widths, 16 layers, 8 experts, top-2, bf16
  compute and parameters) for the ``ragged`` and ``dense`` MoE dispatch;
- ``train expert`` / ``train full FT``: one owner's 2-expert model (the same widths) with only its
  slot trained (the FlexOlmo expert step) and with every parameter trained, AdamW.

MFU: FLOPs per second over the device's peak; for the train steps the compiled step's matmul FLOPs
(``flexmoe_jax.flops``, XLA's program; exact for the 2-expert dense dispatch), for the forward rows
the useful work (2 x active parameters + attention per token, the same for both dispatches). Peak: the bf16 dense peak
of the chip where known (H100/H200 SXM 989 TFLOP/s, A100 312,
TPU v5p 459, v5e 197, v4 275, v6e 918), else the measured rate of a big jitted bf16 matmul (CPU).
Peak device memory comes from ``device.memory_stats()`` where the backend reports it. ``--tiny``
shrinks every model to the test size, for CPU (the tests run it that way). Under 5 minutes on one
GPU. A benchmark: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flexmoe_jax import distributed, expert, flops, model, optim, train  # noqa: E402
from flexmoe_jax.config import ModelConfig  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
             "TPU v5e": 197e12, "TPU v4": 275e12, "TPU v6": 918e12}


def _peak(device) -> tuple[float, str]:
    for name, peak in PEAK_BF16.items():
        if name.lower() in device.device_kind.lower():
            return peak, f"{name} bf16 dense peak (spec)"
    return flops.measured_peak_flops("bfloat16", 2048), "measured bf16 2048^3 matmul"


def _batch(vocab: int, b: int, s: int) -> dict:
    rng = np.random.RandomState(0)
    toks = rng.randint(3, vocab, (b, s + 1)).astype(np.int32)
    return {"decoder_input_tokens": toks[:, :-1], "decoder_target_tokens": toks[:, 1:],
            "decoder_loss_weights": np.ones((b, s), np.float32), "decoder_segment_ids": np.ones((b, s), np.int32),
            "decoder_positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()}


def _configs(tiny: bool) -> tuple[ModelConfig, ModelConfig]:
    if tiny:
        dense = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, mlp_hidden=128, max_seq_len=256,
                            dtype="bfloat16", param_dtype="bfloat16")
    else:
        dense = ModelConfig(vocab_size=100352, d_model=2048, n_layers=16, n_heads=16, mlp_hidden=8192,
                            max_seq_len=4096, dtype="bfloat16", param_dtype="bfloat16")
    moe8 = dense.replace(num_experts=8, top_k=2, expert_names=("public", *[f"e{i}" for i in range(1, 8)]))
    return dense, moe8


def _peak_memory(device) -> str:
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU and some backends report nothing
        stats = {}
    peak = stats.get("peak_bytes_in_use")
    return f"{peak / 2**30:.1f} GiB" if peak else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="test-sized models (for CPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    b = args.batch or (4 if args.tiny else 8)
    s = args.seq or (64 if args.tiny else 2048)
    dev = jax.devices()[0]
    print(distributed.devices_line())
    peak, peak_src = _peak(dev)
    dense, moe8 = _configs(args.tiny)
    batch = _batch(dense.vocab_size, b, s)
    tokens = b * s
    rows: dict[str, dict] = {}

    params8 = model.init(moe8, 0)
    for impl in ("ragged", "dense"):
        cfg = moe8.replace(moe_impl=impl)
        fwd = jax.jit(lambda p, t, cfg=cfg: model.apply(cfg, p, t)[0]).lower(
            params8, batch["decoder_input_tokens"]).compile()
        # The useful work of a top-2 forward (the compiled count charges the ragged dispatch's
        # ragged_dot as if every group saw every row): active parameters and attention, 1/3 of 6N.
        rows[f"forward {impl} (8 experts, top-2)"] = {
            "run": lambda fwd=fwd: fwd(params8, batch["decoder_input_tokens"]),
            "flops": flops.flops_per_token(moe8, s) / 3 * tokens}
    anchor = model.init(dense, 1)
    ecfg, eparams = expert.upcycle(dense, anchor, "owner")
    del anchor
    for name, spec in (("train expert (slot 1 only)", expert.TRAINABLE), ("train full FT (2-expert)", optim.ALL)):
        # Each row its own buffers: a step donates its state, which must not be another row's frozen part.
        trainable, frozen = optim.split(jax.tree.map(jnp.copy, eparams), spec)
        tx = optim.make_optimizer(optim.OptimConfig(total_steps=1000), trainable)
        box = {"state": train.init_state(trainable, tx)}
        step = train.jit_train_step(ecfg, tx, train.LossConfig(), 1, None).lower(box["state"], frozen, batch).compile()

        def run(step=step, box=box, frozen=frozen):
            box["state"], m = step(box["state"], frozen, batch)
            return m

        rows[name] = {"run": run, "flops": flops.compiled_flops(step).flops}
    for r in rows.values():  # warm-up
        jax.block_until_ready(r["run"]())
    times = {k: [] for k in rows}
    for _ in range(args.rounds):
        for k, r in rows.items():
            t = time.perf_counter()
            jax.block_until_ready(r["run"]())
            times[k].append(time.perf_counter() - t)
    print(f"\npeak: {peak / 1e12:.1f} TFLOP/s ({peak_src}); batch {b} x {s}; {args.rounds} rounds; "
          f"{'tiny' if args.tiny else '1B-shaped'} models, bf16\n")
    print("| row | ms (median) | tokens/s | GFLOP / step | MFU |")
    print("|---|---:|---:|---:|---:|")
    for k, r in rows.items():
        sec = statistics.median(times[k])
        gflop, mfu = r["flops"] / 1e9, r["flops"] / sec / peak
        print(f"| {k} | {sec * 1e3:.1f} | {tokens / sec:,.0f} | {gflop:,.1f} | {mfu:.1%} |")
    ex, ft = (statistics.median(times[k]) for k in ("train expert (slot 1 only)", "train full FT (2-expert)"))
    rg, dn = (statistics.median(times[k]) for k in rows if k.startswith("forward"))
    print(f"\nexpert step / full FT: {ex / ft:.2f}x time; ragged / dense forward: {rg / dn:.2f}x time; "
          f"peak device memory: {_peak_memory(dev)}")


if __name__ == "__main__":
    main()
