"""Input pipeline speed next to tiny-model training speed: the pipeline must never be what a
training step waits for.

Measured (after a cached build of FlexMix-mini):
- the one-time seqio cost: tokenize + split + pack every task's train split (tokens/s);
- pipeline batches/s of ``flexmix_mini.all`` (mixture sampling + gather) at the train shapes, and the
  cost of resuming at step 100,000;
- train steps/s of the tiny model (gin_configs/model/tiny.gin, dense, and its 2-expert FlexOlmo
  variant as in expert training) with AdamW, fed by the pipeline, and the time spent inside
  ``next(iterator)`` per step (an upper bound on what a step waits for: JAX dispatch is
  asynchronous, so the next batch is assembled while the previous step computes).

    python bench/bench_data.py                  # uses/builds $TMPDIR/flexmoe_data_bench (quick slice)
    python bench/bench_data.py --data_dir W/data --batch_size 8 --seq_len 256
    python bench/bench_data.py --full           # the default (full) FlexMix-mini build

Prints a markdown table. It measures; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _timeit(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "flexmoe_data_bench"))
    p.add_argument("--full", action="store_true", help="full build (default caps) instead of a quick slice")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed train steps per model")
    args = p.parse_args(argv)

    import numpy as np

    import flexmoe_jax.data as D
    from flexmoe_jax.data import layout, packing

    t = time.perf_counter()
    build_kw = {} if args.full else {"max_docs_per_domain": 300, "vocab_size": 4096}
    card = D.build(args.data_dir, progress=False, **build_kw)
    build_s = time.perf_counter() - t
    vocab = card["tokenizer"]["vocab_size"]
    B, L = args.batch_size, args.seq_len

    # one-time seqio packing of every task (cache cleared for these shapes first)
    names = D.register_tasks(args.data_dir)
    task_list = [n for n in names if n not in (D.PUBLIC_MIXTURE, D.ALL_MIXTURE)]
    for n in task_list:
        shutil.rmtree(layout.cache_dir(args.data_dir) / "packed" / n / f"train-L{L}", ignore_errors=True)
    t = time.perf_counter()
    ntok = 0
    for n in task_list:
        rows = packing.packed_rows(n, "train", L, args.data_dir)
        ntok += int(np.asarray(rows["decoder_loss_weights"]).sum())
    pack_s = time.perf_counter() - t

    # steady-state pipeline
    it = D.batches(D.ALL_MIXTURE, "train", B, L, args.data_dir, seed=0)
    next(it)
    n_pipe = 3000
    pipe_s = _timeit(lambda: next(it), n_pipe)
    t = time.perf_counter()
    far = D.batches(D.ALL_MIXTURE, "train", B, L, args.data_dir, seed=0, start_step=100_000)
    next(far)
    resume_s = time.perf_counter() - t

    # tiny model training
    import jax
    import jax.numpy as jnp
    import optax

    from flexmoe_jax import config as C, model

    results = []
    for label, bindings in [("tiny dense", []),
                            ("tiny 2-expert MoE (expert training)", ["ModelConfig.num_experts = 2",
                                                                     "ModelConfig.top_k = 2"])]:
        cfg = C.from_gin(["model/tiny.gin"], [f"ModelConfig.vocab_size = {vocab}",
                                              f"ModelConfig.max_seq_len = {max(L, 512)}", *bindings])
        params = model.init(cfg, 0)
        opt = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.0)
        state = opt.init(params)

        def loss_fn(p, b, cfg=cfg):
            logits, _ = model.apply(cfg, p, b["decoder_input_tokens"], b["decoder_positions"],
                                    b["decoder_segment_ids"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["decoder_target_tokens"])
            w = b["decoder_loss_weights"].astype(jnp.float32)
            return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

        @jax.jit
        def step(p, s, b):
            loss, g = jax.value_and_grad(loss_fn)(p, b)
            upd, s = opt.update(g, s, p)
            return optax.apply_updates(p, upd), s, loss

        params, state, loss = step(params, state, next(it))  # compile
        jax.block_until_ready(loss)
        in_next = 0.0
        t = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            b = next(it)
            in_next += time.perf_counter() - t0
            params, state, loss = step(params, state, b)
        jax.block_until_ready(loss)
        per_step = (time.perf_counter() - t) / args.steps
        results.append((label, cfg.num_params(), per_step, in_next / args.steps))

    print(f"\n### Input pipeline vs training ({platform.machine()}, {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {B} x {L} tokens)\n")
    print(f"FlexMix-mini: {sum(r['docs'] for e in card['configs'].values() for r in e['splits'].values()):,} "
          f"documents, vocab {vocab}; build call {build_s:.1f} s "
          f"({'cached' if build_s < 5 else 'built'}).\n")
    print("| what | value |")
    print("| --- | ---: |")
    print(f"| seqio tokenize + split + pack, all {len(task_list)} train splits (one time, then cached) | "
          f"{ntok:,} tokens in {pack_s:.1f} s = {ntok / pack_s:,.0f} tokens/s |")
    print(f"| pipeline: `{D.ALL_MIXTURE}` train batches/s | {1 / pipe_s:,.0f} batches/s "
          f"({B * L / pipe_s:,.0f} tokens/s) |")
    print(f"| resume at step 100,000 (build iterator + first batch) | {resume_s * 1e3:.0f} ms |")
    for label, nparams, per_step, data_s in results:
        print(f"| {label}, {nparams / 1e6:.1f}M params: train steps/s (AdamW, fed by the pipeline) | "
              f"{1 / per_step:.2f} steps/s; `next()` {data_s * 1e3:.2f} ms/step = {100 * data_s / per_step:.2f}% "
              f"of a step; pipeline {per_step / pipe_s:,.0f}x faster |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
