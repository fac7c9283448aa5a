"""Train-step speed: expert training vs full fine-tuning, tokens/s, MFU, optimizer memory.

    python bench/bench_train.py [--quick] [--rounds N]

All rows run in one process, interleaved round by round, on the same 2-expert model
(the tiny anchor upcycled: d_model 256, 4 layers, hidden 688, vocab 4096), batch 8 x 128:

- ``full FT``: every parameter trains (what expert training would cost without the split);
- ``expert``: the reference recipe, only slot 1's FFN / router row / bias train; frozen
  parameters have no optimizer state and no weight gradients;
- ``pretrain (dense)``: the dense anchor itself, for scale.

MFU is FLOPs/s over the fp32 matmul peak measured here in the same run (a 1024^3 jitted
matmul), two ways: by the matmul FLOPs of the compiled step (``flexmoe_jax.flops``: XLA's
program, the body of the layer scan counted once per layer) and by the 6N estimate (6 x active
params + attention, per token). The expert step forms no weight gradients of frozen matrices
(public slot, attention, output head), so 6N overstates its work. Wall-clock ratios move with
machine load; the FLOP counts do not.
A benchmark: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from flexmoe_jax import expert, flops, model, optim, train
from flexmoe_jax.config import ModelConfig


def _batch(cfg, b, s, seed):
    rng = np.random.RandomState(seed)
    toks = rng.randint(3, cfg.vocab_size, (b, s + 1)).astype(np.int32)
    return {"decoder_input_tokens": toks[:, :-1], "decoder_target_tokens": toks[:, 1:],
            "decoder_loss_weights": np.ones((b, s), np.float32), "decoder_segment_ids": np.ones((b, s), np.int32),
            "decoder_positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()}


def _setup(cfg, params, spec, batch):
    """The compiled step (timed as it is) and its matmul FLOPs, counted through the layer scan."""
    trainable, frozen = optim.split(params, spec)
    tx = optim.make_optimizer(optim.OptimConfig(total_steps=1000, weight_decay=0.0), trainable)
    state = train.init_state(trainable, tx)
    step = train.jit_train_step(cfg, tx, train.LossConfig(), 1, None).lower(state, frozen, batch).compile()
    # Exact: a 2-of-2 MoE uses the dense dispatch, no data-dependent loops (see flexmoe_jax.flops.Flops).
    return {"state": state, "frozen": frozen, "step": step, "flops": flops.compiled_flops(step).flops,
            "trainable_bytes": optim.state_bytes(trainable), "opt_bytes": optim.state_bytes(state.opt_state)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds

    anchor_cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, mlp_hidden=688, max_seq_len=512)
    anchor = jax.device_get(model.init(anchor_cfg, 0))
    ecfg, eparams = expert.upcycle(anchor_cfg, anchor, "domain")
    specs = {"pretrain (dense anchor)": None, "full FT (2-expert)": optim.ALL,
             "expert (2-expert, slot 1 only)": expert.TRAINABLE}
    batch = _batch(anchor_cfg, args.batch, args.seq, 0)
    rows = {k: (anchor_cfg, _setup(anchor_cfg, anchor, optim.ALL, batch)) if spec is None
            else (ecfg, _setup(ecfg, eparams, spec, batch)) for k, spec in specs.items()}
    for _, r in rows.values():  # warm up
        for _ in range(2):
            r["state"], m = r["step"](r["state"], r["frozen"], batch)
        jax.block_until_ready(m)
    times = {k: [] for k in rows}
    for _ in range(rounds):
        for k, (_, r) in rows.items():
            t = time.perf_counter()
            r["state"], m = r["step"](r["state"], r["frozen"], batch)
            jax.block_until_ready(m)
            times[k].append(time.perf_counter() - t)
    peak = flops.measured_peak_flops()
    tokens = args.batch * args.seq
    full_k = "full FT (2-expert)"
    full_ms, full_flops = statistics.median(times[full_k]), rows[full_k][1]["flops"]
    print(f"matmul peak measured here: {peak / 1e9:.1f} GFLOP/s; batch {args.batch} x {args.seq}; {rounds} rounds\n")
    print("| step | ms (median) | tokens/s | MFU (compiled) | MFU (6N) | vs full FT (time) "
          "| step GFLOP (compiled) | vs full FT (FLOPs) | step GFLOP (6N) | compiled / 6N | trainable MB "
          "| optimizer state MB | state / trainable |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, (cfg, r) in rows.items():
        s = statistics.median(times[k])
        six_n = flops.flops_per_token(cfg, args.seq) * tokens
        print(f"| {k} | {s * 1e3:.1f} | {tokens / s:,.0f} | {r['flops'] / s / peak:.1%} | {six_n / s / peak:.1%} | "
              f"{s / full_ms:.2f}x | {r['flops'] / 1e9:.2f} | {r['flops'] / full_flops:.2f}x | {six_n / 1e9:.2f} | "
              f"{r['flops'] / six_n:.2f} | {r['trainable_bytes'] / 1e6:.2f} | {r['opt_bytes'] / 1e6:.2f} | "
              f"{r['opt_bytes'] / r['trainable_bytes']:.2f}x |")


if __name__ == "__main__":
    main()
