"""MoE layer cost of every dispatch path, relative to a dense SwiGLU FFN of the same active FLOPs.

Setting (the issue's): T=2048 tokens, d_model 256, expert hidden 688, at
(8 experts, top-2) and (7 experts, top-5); plus (2 experts, top-2), the expert
training case where "auto" picks dense. The reference is a plain SwiGLU FFN
with hidden k*688 (the same active FLOPs) and no routing; every MoE path is
timed *with* its routing (router matmul, softmax, top-k, layout), since that
is what a layer costs.

Timing: each function is jitted and run twice to warm up (compile excluded),
then R rounds each time every function once, interleaved, so load changes on a
shared machine hit all of them alike. Reported: median ms over rounds, and the
median over rounds of (path time / FFN time in the same round).
"Forward+backward" is the gradient of <y, c> w.r.t. x, router and expert
weights (w.r.t. x and weights for the FFN).

    python bench/bench_moe.py            # 15 rounds
    python bench/bench_moe.py --quick    # 5 rounds, the two issue settings only
    python bench/bench_moe.py --block-sizes 64,128,256,512   # blocks rows to show

"auto" runs the model's default (ModelConfig().moe_impl="auto", moe_block_size).

This measures; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from flexmoe_jax import moe  # noqa: E402
from flexmoe_jax.config import ModelConfig  # noqa: E402

T, D, H = 2048, 256, 688


def make_inputs(e, k, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    x = jax.random.normal(ks[0], (T, D), jnp.float32)
    router = jax.random.normal(ks[1], (e, D), jnp.float32) * 0.02
    w = moe.Experts(jax.random.normal(ks[2], (e, D, H)) * 0.02,
                    jax.random.normal(ks[3], (e, D, H)) * 0.02,
                    jax.random.normal(ks[4], (e, H, D)) * 0.02)
    ffn = (jax.random.normal(ks[5], (D, k * H)) * 0.02,
           jax.random.normal(ks[6], (D, k * H)) * 0.02,
           jax.random.normal(ks[7], (k * H, D)) * 0.02)
    cot = jax.random.normal(ks[8], (T, D), jnp.float32)
    return x, router, w, ffn, cot


def ffn_ref(x, ffn):
    gate, up, down = ffn
    return jnp.dot(jax.nn.silu(jnp.dot(x, gate)) * jnp.dot(x, up), down)


def moe_layer(impl, k, block_size):
    def f(x, router, w):
        r = moe.route(x, router, None, k)
        return moe.dispatch(x, r, w, impl, block_size)
    return f


def build(e, k, block_sizes):
    """name -> (forward fn, forward+backward fn, args)."""
    x, router, w, ffn, cot = make_inputs(e, k)

    def fwd_bwd(f, argnums):
        return jax.jit(jax.grad(lambda *a: jnp.vdot(f(*a), cot), argnums=argnums))

    fns = {"ffn": (jax.jit(ffn_ref), fwd_bwd(ffn_ref, (0, 1)), (x, ffn))}
    paths = [("dense", "dense", 128), ("ragged", "ragged", 128)]
    paths += [(f"blocks B={b}", "blocks", b) for b in block_sizes]
    paths += [("auto", "auto", ModelConfig().moe_block_size)]
    for name, impl, b in paths:
        f = moe_layer(impl, k, b)
        fns[name] = (jax.jit(f), fwd_bwd(f, (0, 1, 2)), (x, router, w))
    return fns


def timed_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    for f, args in fns.values():  # warm-up: compile + one more run
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (f, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]], ref: str = "ffn") -> dict[str, tuple[float, float]]:
    out = {}
    for name, ts in times.items():
        ratio = statistics.median(t / r for t, r in zip(ts, times[ref]))
        out[name] = (statistics.median(ts) * 1e3, ratio)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5 rounds, the two issue settings only")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--block-sizes", default="128,256,512",
                   help="comma-separated block sizes for the blocks rows (auto uses ModelConfig's default)")
    args = p.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 15)
    block_sizes = [int(b) for b in args.block_sizes.split(",")]
    settings = [(8, 2), (7, 5)] + ([] if args.quick else [(2, 2)])

    print(f"# MoE layer: T={T}, d_model={D}, expert hidden={H}; jax {jax.__version__} "
          f"on {jax.default_backend()} ({os.cpu_count()} cpus, {platform.machine()}); {rounds} rounds")
    print("# ratio = path / dense SwiGLU FFN with hidden k*688 (same active FLOPs, no routing)\n")
    print("| experts | top-k | path | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for e, k in settings:
        fns = build(e, k, block_sizes)
        fwd = summarize(timed_rounds({n: (f, a) for n, (f, _, a) in fns.items()}, rounds))
        bwd = summarize(timed_rounds({n: (g, a) for n, (_, g, a) in fns.items()}, rounds))
        auto = moe.choose_impl("auto", k, e)
        for name in fns:
            label = f"FFN hidden {k}x{H} (reference)" if name == "ffn" else name
            if name == "auto":
                label = f"auto (= {auto}" + (f" B={ModelConfig().moe_block_size})" if auto == "blocks" else ")")
            print(f"| {e} | {k} | {label} | {fwd[name][0]:.1f} | {fwd[name][1]:.2f}x "
                  f"| {bwd[name][0]:.1f} | {bwd[name][1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
