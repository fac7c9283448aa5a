"""Forward tokens/s: our jitted model.forward vs transformers' FlexOlmoForCausalLM.

Config (the issue's): d_model 256, 4 layers, 4 heads, 4 experts, top-2, vocab
4096, expert hidden 688, batch 8 x 256 tokens, fp32. Both models hold the same
weights: ours are exported with ``flexmoe_jax.hf.to_hf`` and loaded with
``FlexOlmoForCausalLM.from_pretrained`` (random weights of the same config in
each if that module is unavailable), and the max |logit difference| is printed
as a check. Torch runs with ``torch.set_num_threads(2)`` under
``torch.inference_mode()``, with eager and with sdpa attention.

Timing: warm-up (our compile, torch's first calls) excluded, then R rounds
each running every model once, interleaved; median seconds per forward.
``ours (...)`` rows are the same model with a dispatch path / block size forced;
the first row is what ``ModelConfig`` defaults give.

Roofline: each row's GFLOP/s counts the matmul work the forward needs (the
projections, causal attention as computed in full by both sides, the top-k
experts' SwiGLUs, the router and the output head), and the same run times
plain fp32 matmuls of the model's shapes (and one large square one) in XLA and
in torch: the best of those is what this machine's cores sustain, so a ratio
above (best matmul rate / HF's rate) is out of reach for the same arithmetic.

    python bench/bench_forward.py            # 10 rounds
    python bench/bench_forward.py --quick    # 3 rounds

This measures; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flexmoe_jax import model, moe  # noqa: E402
from flexmoe_jax.config import ModelConfig  # noqa: E402

BATCH, SEQ = 8, 256


def bench_config() -> ModelConfig:
    return ModelConfig(d_model=256, n_layers=4, n_heads=4, num_experts=4, top_k=2,
                       vocab_size=4096, mlp_hidden=688, max_seq_len=SEQ)


def load_hf(config, params, attn: str, tmp: str):
    """(torch module, how its weights were obtained): our weights via hf.to_hf if available."""
    import transformers

    try:
        from flexmoe_jax import hf
        to_hf = hf.to_hf
    except (ImportError, AttributeError):  # hf.py not there: same config, random weights
        return load_hf_random(config, attn)
    path = os.path.join(tmp, "export")
    if not os.path.exists(path):
        to_hf(config, params, path)
    m = transformers.FlexOlmoForCausalLM.from_pretrained(path, attn_implementation=attn)
    return m.eval(), "same weights (hf.to_hf export)"


def load_hf_random(config, attn: str):
    import transformers

    hf_cfg = transformers.FlexOlmoConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.mlp_hidden,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads, num_experts=config.num_experts,
        num_experts_per_tok=config.top_k, norm_topk_prob=config.norm_topk_prob,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.rms_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=False)
    hf_cfg._attn_implementation = attn
    return transformers.FlexOlmoForCausalLM(hf_cfg).eval(), "random weights, same config"


def forward_flops(config: ModelConfig) -> float:
    """Matmul FLOPs of one forward of BATCH x SEQ tokens (2 per multiply-add)."""
    c, t = config, BATCH * SEQ
    qw, kvw = c.n_heads * c.head_size, c.kv_heads * c.head_size
    per_layer = (2 * t * c.d_model * (2 * qw + 2 * kvw)          # q, k, v, o projections
                 + 2 * 2 * BATCH * SEQ * SEQ * qw                # scores and weighted values (full S x S)
                 + 2 * t * c.d_model * c.num_experts             # router
                 + 2 * t * c.top_k * 3 * c.d_model * c.mlp_hidden)  # the chosen experts' SwiGLUs
    return c.n_layers * per_layer + 2 * t * c.d_model * c.vocab_size


MATMUL_SHAPES = ((BATCH * SEQ, 256, 4096), (BATCH * SEQ, 256, 688), (BATCH * SEQ, 688, 256), (1024, 1024, 1024))


def matmul_runners(torch):
    """{name: (runner, flops)} plain fp32 matmuls in XLA and torch: the machine's achievable rate."""
    out = {}
    rng = np.random.RandomState(1)
    for m, k, n in MATMUL_SHAPES:
        a, b = rng.randn(m, k).astype(np.float32), rng.randn(k, n).astype(np.float32)
        ja, jb = jax.device_put(a), jax.device_put(b)
        dot = jax.jit(lambda x, y: x @ y)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        out[f"XLA matmul {m}x{k}x{n}"] = ((lambda dot, ja, jb: lambda: jax.block_until_ready(dot(ja, jb)))(dot, ja, jb),
                                          2.0 * m * k * n)
        out[f"torch matmul {m}x{k}x{n}"] = ((lambda ta, tb: lambda: torch.matmul(ta, tb))(ta, tb), 2.0 * m * k * n)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 10)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    config = bench_config()
    params = model.init(config, 0)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (BATCH, SEQ)).astype(np.int32)
    tokens_t = torch.from_numpy(tokens.astype(np.int64))

    runners = {}
    auto_name = (f"ours (default config: auto = {moe.choose_impl('auto', config.top_k, config.num_experts)}, "
                 f"moe_block_size={config.moe_block_size})")
    variants = [(auto_name, {}),
                ("ours (blocks, moe_block_size=128)", dict(moe_impl="blocks", moe_block_size=128)),
                ("ours (blocks, moe_block_size=512)", dict(moe_impl="blocks", moe_block_size=512)),
                ("ours (dense)", dict(moe_impl="dense")),
                ("ours (ragged)", dict(moe_impl="ragged"))]
    for name, changes in variants:
        cfg = config.replace(**changes)
        runners[name] = (lambda cfg: lambda: jax.block_until_ready(model.forward(cfg, params, tokens)))(cfg)

    hf_models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for attn in ("eager", "sdpa"):
            hf_models[attn] = load_hf(config, params, attn, tmp)

    def hf_runner(m):
        def run():
            with torch.inference_mode():
                return m(input_ids=tokens_t).logits
        return run

    for attn, (m, _) in hf_models.items():
        runners[f"transformers FlexOlmo ({attn})"] = hf_runner(m)

    matmuls = matmul_runners(torch)
    for run, _ in matmuls.values():
        run(), run()

    # Warm up (compile / first call), and check the logits agree.
    ours = np.asarray(runners[auto_name]())
    diffs = {}
    for name, run in runners.items():
        out = run()
        out = out.float().numpy() if hasattr(out, "numpy") else np.asarray(out)
        diffs[name] = float(np.max(np.abs(out - ours)))
        run()

    times = {name: [] for name in runners}
    mm_times = {name: [] for name in matmuls}
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        for name, (run, _) in matmuls.items():
            for _ in range(3):
                t0 = time.perf_counter()
                run()
                mm_times[name].append(time.perf_counter() - t0)

    n_tok = BATCH * SEQ
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    eager, sdpa = "transformers FlexOlmo (eager)", "transformers FlexOlmo (sdpa)"
    how = hf_models["eager"][1]
    print(f"# forward, d_model {config.d_model}, {config.n_layers} layers, {config.n_heads} heads, "
          f"{config.num_experts} experts top-{config.top_k}, vocab {config.vocab_size}, batch {BATCH} x {SEQ}; "
          f"jax {jax.__version__} (backend {jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"{os.cpu_count()} cpus; {rounds} rounds; HF weights: {how}")
    print("# speed = HF time / this row's time (median over rounds; 'best' columns use the fastest round)")
    flops = forward_flops(config)
    mm_rate = {name: f / statistics.median(mm_times[name]) / 1e9 for name, (_, f) in matmuls.items()}
    peak = max(mm_rate.values())
    print(f"# {flops / 1e9:.1f} GFLOP of matmuls per forward; best plain fp32 matmul rate this run: {peak:.0f} GFLOP/s "
          f"({max(mm_rate, key=mm_rate.get)})")
    print("\n| model | ms / forward (median) | tokens/s | speed vs HF eager | speed vs HF sdpa "
          "| ms (best) | speed vs HF eager (best) | GFLOP/s | % of best matmul rate "
          "| max abs logit diff vs first row |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, t in med.items():
        rate = flops / t / 1e9
        print(f"| {name} | {t * 1e3:.1f} | {n_tok / t:,.0f} | {med[eager] / t:.2f}x | {med[sdpa] / t:.2f}x "
              f"| {best[name] * 1e3:.1f} | {best[eager] / best[name]:.2f}x | {rate:.0f} | {100 * rate / peak:.0f}% "
              f"| {diffs[name]:.2e} |")
    print("\n| plain fp32 matmul (m x k x n) | ms (median) | GFLOP/s |")
    print("|---|---:|---:|")
    for name, (_, f) in matmuls.items():
        print(f"| {name} | {statistics.median(mm_times[name]) * 1e3:.2f} | {mm_rate[name]:.0f} |")
    need = 2 * flops / med[eager] / 1e9
    print(f"\n# 2x HF eager would need {need:.0f} GFLOP/s of matmuls: {100 * need / peak:.0f}% of the best plain "
          f"matmul rate measured in this run")


if __name__ == "__main__":
    main()
