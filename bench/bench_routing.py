"""Scoring cost of the routing modes of one merged model, side by side: the trained router rows
(top_k), domain routing on privately released stats, and density routing (each expert pair as its
own density model: one forward pass per member).

The model has the full demo's shape (d_model 192, 4 layers, 6 experts top-2, vocab 4096), random
weights (cost does not depend on them); each round scores one batch of 16 x 128 tokens with every
mode, interleaved, after two warm-up calls each. Prints the median milliseconds per batch and the
ratio to top_k in the same round.

    .venv/bin/python bench/bench_routing.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np


def main() -> None:
    from flexmoe_jax import eval as eval_lib, model, private_stats, routing
    from flexmoe_jax.config import ModelConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    names = ("public", "code", "math", "literature", "humor", "techdocs")
    config = ModelConfig(vocab_size=4096, d_model=192, n_layers=4, n_heads=3, mlp_hidden=512, max_seq_len=128,
                         num_experts=len(names), top_k=2, expert_names=names)
    params = model.init(config, 0)
    rng = np.random.default_rng(0)
    B, S = 16, 128
    toks = rng.integers(2, config.vocab_size, size=(B, S)).astype(np.int32)
    batch = {"decoder_input_tokens": toks, "decoder_target_tokens": np.roll(toks, -1, 1),
             "decoder_positions": np.broadcast_to(np.arange(S), (B, S)).astype(np.int32),
             "decoder_segment_ids": np.ones((B, S), np.int32)}
    stats = {}
    for i, n in enumerate(names):  # a release of 200 random documents per expert
        ids = rng.integers(2, config.vocab_size, size=200 * 64)
        prev = np.where(np.arange(ids.size) % 64 == 0, 0, np.roll(ids, 1))
        c = routing.Counted(ids, prev, np.arange(ids.size) // 64, 200, config.vocab_size,
                            {"task": n, "split": "train", "vocab_size": config.vocab_size})
        stats[n] = private_stats.release(c, n, seed=i)
    scorers = {"top_k": eval_lib.ModelScorer(config, params, routing="top_k"),
               "domain (private stats)": eval_lib.ModelScorer(config, params, routing_stats=stats),
               "density": eval_lib.density_scorer(config, params)}
    for s in scorers.values():
        for _ in range(2):
            jax.block_until_ready(s.logprobs(batch))
    times = {k: [] for k in scorers}
    for _ in range(args.rounds):
        for k, s in scorers.items():
            t = time.perf_counter()
            jax.block_until_ready(s.logprobs(batch))
            times[k].append(time.perf_counter() - t)
    ref = np.array(times["top_k"])
    print(f"| routing | ms per {B}x{S} batch (median of {args.rounds}) | vs top_k (median ratio) |")
    print("|---|---|---|")
    for k, v in times.items():
        v = np.array(v)
        print(f"| {k} | {1000 * np.median(v):.1f} | {np.median(v / ref):.2f}x |")


if __name__ == "__main__":
    main()
