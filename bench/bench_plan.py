"""Demo plan sizing: 50 timed training steps of each phase for candidate model sizes, and what a
full demo of each would cost in training time on this machine.

    python bench/bench_plan.py [--steps 50] [--candidates inverted,paper,...]

For each candidate (a demo plan's model shape; ``inverted`` is the previous full plan, kept for
comparison), one process times the real jitted training step (``flexmoe_jax.train.jit_train_step``,
the trainer's, AdamW, batch x seq of the plan) of every phase the demo trains: the dense anchor
(``pretrain``), an owner's expert (2-expert, public frozen; the replay variant costs the same), a
dense expert (the whole anchor), BTX (public + 5 dense FFNs, top-2) and the unrestricted MoE (the
anchor upcycled to 6 experts, top-2, everything trained). Steps run on random tokens: data loading
is measured separately (``bench/bench_data.py``: millions of tokens/s, negligible here).

Per candidate it prints the parameter budget (FFN, embeddings + head shares), tokens per parameter
of the anchor at the plan's steps, and the projected training time of the demo's phases: the anchor,
then 15 owner jobs (5 owners x expert, replay, dense) two at a time on two cores (each pinned to
one core, as the demo runs them: per-job time measured single-threaded here is not available, so
the projection uses the 2-core step time x 2 / 2 = the same wall time per pair, an estimate the
note below the table states), BTX and both unrestricted budgets. A benchmark: it measures and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flexmoe_jax import baselines, expert, model, optim, train  # noqa: E402
from flexmoe_jax.demo import plan as plans  # noqa: E402


def _batch(vocab: int, b: int, s: int, seed: int) -> dict:
    rng = np.random.RandomState(seed)
    toks = rng.randint(3, vocab, (b, s + 1)).astype(np.int32)
    return {"decoder_input_tokens": toks[:, :-1], "decoder_target_tokens": toks[:, 1:],
            "decoder_loss_weights": np.ones((b, s), np.float32), "decoder_segment_ids": np.ones((b, s), np.int32),
            "decoder_positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()}


def time_step(cfg, params, spec, batch, steps: int) -> float:
    """Median seconds of one compiled training step over ``steps`` steps (after two warm-up steps)."""
    trainable, frozen = optim.split(params, spec)
    tx = optim.make_optimizer(optim.OptimConfig(total_steps=1000), trainable)
    state = train.init_state(trainable, tx)
    step = train.jit_train_step(cfg, tx, train.LossConfig(), 1, None).lower(state, frozen, batch).compile()
    for _ in range(2):
        state, m = step(state, frozen, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, frozen, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def budget(p: plans.Plan) -> dict:
    cfg = p.model_config()
    n = cfg.num_params()
    emb = 2 * cfg.vocab_size * cfg.d_model  # input embedding + output head (untied)
    ffn = cfg.n_layers * 3 * cfg.d_model * cfg.mlp_hidden
    return {"params": n, "ffn_share": ffn / n, "embed_head_share": emb / n,
            "anchor_tokens_per_param": p.anchor_steps * p.batch_size * p.seq_len / n,
            "expert_to_anchor_tokens": p.expert_steps / p.anchor_steps}


def measure(p: plans.Plan, steps: int, n_owners: int = 5) -> dict:
    cfg = p.model_config()
    anchor = jax.device_get(model.init(cfg, 0))
    batch = _batch(cfg.vocab_size, p.batch_size, p.seq_len, 0)
    ecfg, eparams = expert.upcycle(cfg, anchor, "domain")
    ucfg, uparams = baselines.upcycle(cfg, anchor, p.unrestricted_experts, p.top_k)
    t = {"anchor": time_step(cfg, anchor, optim.ALL, batch, steps),
         "expert": time_step(ecfg, eparams, expert.TRAINABLE, batch, steps),
         "moe6": time_step(ucfg, uparams, optim.ALL, batch, steps)}
    t["dense"] = t["anchor"]  # a dense expert's step is the anchor's
    return t


def projection(p: plans.Plan, t: dict, n_owners: int = 5) -> dict:
    """Projected training wall time (s) of each demo phase from the measured step times."""
    owners = n_owners * (2 * p.expert_steps * t["expert"] + p.expert_steps * t["dense"])
    # Unrestricted at equal FLOPs runs as many 6-expert steps as the owners' FLOPs allow; at equal
    # data as many as all owners' tokens: bounded here by the owners' step count.
    unrestricted = n_owners * p.expert_steps * t["moe6"] * (1 + 0.5)
    return {"anchor": p.anchor_steps * t["anchor"], "owners (15 jobs)": owners,
            "btx": 2 * p.btx_steps * t["moe6"], "unrestricted (both)": unrestricted}


CANDIDATES = {
    "inverted": plans.FULL_INVERTED,
    "full": plans.FULL,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--shape", action="append", default=[], metavar="NAME:d_model,n_layers,n_heads,mlp_hidden,vocab",
                    help="an extra candidate (the paper plan's steps and batch)")
    args = ap.parse_args(argv)
    cands = {k: CANDIDATES[k] for k in args.candidates.split(",") if k}
    for spec in args.shape:
        name, dims = spec.split(":")
        d, n_layers, h, f, v = (int(x) for x in dims.split(","))
        cands[name] = dataclasses.replace(plans.FULL, d_model=d, n_layers=n_layers, n_heads=h, mlp_hidden=f,
                                          vocab_size=v)
    print(f"# {args.steps} timed steps per phase; jax {jax.__version__} ({jax.default_backend()}), "
          f"{os.cpu_count()} cpus")
    print("\n| plan | d, layers, heads, FFN, vocab | params | FFN share | embed+head share | anchor tokens/param "
          "| expert : anchor tokens | s/step anchor | s/step expert | s/step 6-expert MoE | projected training "
          "min (anchor / owners / btx / unrestricted / total) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, p in cands.items():
        b = budget(p)
        t = measure(p, args.steps)
        proj = projection(p, t)
        total = sum(proj.values())
        parts = " / ".join(f"{v / 60:.1f}" for v in proj.values())
        print(f"| {name} | {p.d_model}, {p.n_layers}, {p.n_heads}, {p.mlp_hidden}, {p.vocab_size} | {b['params']:,} "
              f"| {b['ffn_share']:.0%} | {b['embed_head_share']:.0%} | {b['anchor_tokens_per_param']:.2f} "
              f"| 1 : {1 / b['expert_to_anchor_tokens']:.1f} | {t['anchor']:.3f} | {t['expert']:.3f} "
              f"| {t['moe6']:.3f} | {parts} / **{total / 60:.1f}** |", flush=True)
    print("\nProjection: owner jobs run two at a time, one core each, in the demo; here each step ran on "
          "both cores, so a pair's wall time is estimated as the sum of its steps at 2-core speed (the "
          "demo measured pinned pairs 1.05x faster than unpinned, docs/demo.md). Evaluation, merging and "
          "the privacy phases are not in this table.")


if __name__ == "__main__":
    main()
