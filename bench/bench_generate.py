"""Generation tokens/s: KV-cache decoding vs re-running the full forward every step.

Same model, same prompts, same program structure: both are ``flexmoe_jax.generate.generate``
(one jit-compiled ``lax.while_loop``), greedy, no early stop (``eos_id=None``), so every row
generates exactly ``--new`` tokens. With the cache (the default) the prompt is prefilled once
and each step runs the model on one token per row against a KV cache of fixed length; without
it (``use_cache=False``) each step runs the whole model over the full fixed [B, P + N - 1]
buffer (prompt + generated so far, causal) and reads the logits at the current position, which
is what a cache-less decoder with static shapes must do. The two must produce identical
tokens; the script checks and prints that. A second table prices density routing
(``routing="density"``: every sub-model {public}, {public, d} decoded at once, one cache each)
against the same MoE's top-2 routing, both with the cache.

Config: the forward benchmark's model (d_model 256, 4 layers, 4 heads, 4 experts top-2, vocab
4096, expert hidden 688, fp32) and its dense OLMo-2 twin; a batch of 8 prompts of lengths
32..128 (left-padded to 128), 64 new tokens each.

Timing: one warm-up call per row (compile) excluded, then R rounds each running every row once,
interleaved; median (and best) seconds per generate call. tokens/s counts generated tokens only
(batch x new tokens).

    python bench/bench_generate.py            # 5 rounds
    python bench/bench_generate.py --quick    # 2 rounds

This measures; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flexmoe_jax import generate, model, moe  # noqa: E402
from flexmoe_jax.config import ModelConfig  # noqa: E402

BATCH = 8


def bench_config(experts: int) -> ModelConfig:
    return ModelConfig(d_model=256, n_layers=4, n_heads=4, num_experts=experts, top_k=min(2, experts) or 1,
                       vocab_size=4096, mlp_hidden=688, max_seq_len=512)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--new", type=int, default=64, help="tokens generated per prompt (default: %(default)s)")
    p.add_argument("--max_prompt", type=int, default=128, help="longest prompt (default: %(default)s)")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)

    rng = np.random.RandomState(0)
    lengths = np.linspace(args.max_prompt // 4, args.max_prompt, BATCH).astype(int)
    runners, models = {}, {}
    for label, experts in (("FlexOlmo MoE 4 experts top-2", 4), ("dense OLMo-2", 0)):
        cfg = bench_config(experts)
        params = model.init(cfg, 0)
        prompts = [rng.randint(3, cfg.vocab_size, n).tolist() for n in lengths]
        models[label] = cfg
        for use_cache in (True, False):
            name = (label, use_cache)
            runners[name] = (lambda cfg, params, prompts, use_cache: lambda: generate.generate(
                cfg, params, prompts, max_new_tokens=args.new, eos_id=None, use_cache=use_cache))(
                    cfg, params, prompts, use_cache)
        if experts:
            runners[(label, "density")] = (lambda cfg, params, prompts: lambda: generate.generate(
                cfg, params, prompts, max_new_tokens=args.new, eos_id=None, routing="density"))(cfg, params, prompts)

    outputs, compile_s = {}, {}
    for name, run in runners.items():  # warm-up: compile, and keep the tokens for the equality check
        t0 = time.perf_counter()
        outputs[name] = [r["tokens"] for r in run()]
        compile_s[name] = time.perf_counter() - t0

    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)

    n_tok = BATCH * args.new
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    cfg = models["FlexOlmo MoE 4 experts top-2"]
    print(f"# generation, d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, vocab "
          f"{cfg.vocab_size}, hidden {cfg.mlp_hidden}, fp32; batch {BATCH} prompts of {lengths.min()}..{lengths.max()} "
          f"tokens (left-padded to {lengths.max()}), {args.new} new tokens each, greedy; MoE dispatch "
          f"{moe.choose_impl('auto', cfg.top_k, cfg.num_experts)}; jax {jax.__version__} (backend "
          f"{jax.default_backend()}); {os.cpu_count()} cpus; {rounds} rounds, interleaved")
    print("# ms = one generate call (prefill + all steps), median over rounds; tokens/s counts generated tokens")
    print("\n| model | decoding | ms / generate (median) | new tokens/s | ms (best) | speed vs full forward (median) "
          "| same tokens as cache | first call (compile + run) s |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for (label, use_cache), t in med.items():
        if use_cache == "density":
            continue
        ref, base = (label, True), (label, False)
        print(f"| {label} | {'KV cache' if use_cache else 'full forward each step'} | {t * 1e3:.1f} | "
              f"{n_tok / t:,.0f} | {best[(label, use_cache)] * 1e3:.1f} | "
              f"{med[base] / t:.2f}x | "
              f"{outputs[(label, use_cache)] == outputs[ref]} | {compile_s[(label, use_cache)]:.1f} |")
    moe_label = "FlexOlmo MoE 4 experts top-2"
    top2, dens = med[(moe_label, True)], med[(moe_label, "density")]
    print("\n| routing (KV cache) | members decoded | ms / generate (median) | new tokens/s | time vs top-2 |")
    print("|---|---:|---:|---:|---:|")
    print(f"| top-2 (router rows) | 1 | {top2 * 1e3:.1f} | {n_tok / top2:,.0f} | 1.00x |")
    print(f"| density | {cfg.num_experts} | {dens * 1e3:.1f} | {n_tok / dens:,.0f} | {dens / top2:.2f}x |")


if __name__ == "__main__":
    main()
