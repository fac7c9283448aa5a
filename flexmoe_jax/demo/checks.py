"""``flexmoe demo --checks``: a one-minute check of the core on this machine, no data needed.

On a randomly initialized FlexOlmo: every MoE dispatch path on the same batch,
opt-out by routing mask vs physical removal, an atomic Orbax checkpoint round
trip, and an HF transformers round trip (checked against ``FlexOlmoForCausalLM``
itself when transformers is installed). Every number it prints is measured in
this run. The end-to-end replication is :mod:`flexmoe_jax.demo`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from flexmoe_jax import checkpoint, hf, model, moe, selection
from flexmoe_jax.config import ModelConfig


def _timed(fn, *args, repeats=3, **kwargs):
    out = jax.block_until_ready(fn(*args, **kwargs))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        best = min(best, time.perf_counter() - t)
    return out, best


def _hf_oracle_logits(hf_dir: str, tokens: np.ndarray) -> np.ndarray | None:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    torch.set_num_threads(2)
    m = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return m(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def run(workdir: str, quick: bool = False) -> dict:
    names = ("public", "code", "math", "literature")
    if quick:
        config = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, mlp_hidden=128,
                             num_experts=4, top_k=2, expert_names=names, max_seq_len=128, init_std=0.1)
        batch, seq = 4, 64
    else:
        config = ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, mlp_hidden=688,
                             num_experts=4, top_k=2, expert_names=names, max_seq_len=512, init_std=0.05)
        batch, seq = 8, 256
    os.makedirs(workdir, exist_ok=True)
    results: dict = {"config": config.to_dict(), "backend": jax.default_backend()}
    steps = tqdm(total=5, desc="demo", unit="step")

    params = model.init(config, 0)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq)).astype(np.int32)
    steps.set_postfix_str("dispatch paths")
    paths = {}
    ref = None
    for impl in ("dense", "ragged", "blocks"):
        logits, secs = _timed(model.forward, config.replace(moe_impl=impl), params, tokens)
        ref = logits if ref is None else ref
        paths[impl] = {"ms": secs * 1e3, "tokens_per_s": batch * seq / secs,
                       "max_abs_diff_vs_dense": float(np.abs(np.asarray(logits - ref)).max())}
    results["dispatch"] = paths
    results["auto_path"] = moe.choose_impl("auto", config.top_k, config.num_experts)
    steps.update()

    steps.set_postfix_str("opt-out")
    full = model.forward(config, params, tokens)
    masked = model.forward(config, params, tokens, active_experts=[n for n in names if n != "math"])
    c3, p3 = selection.exclude(config, params, ["math"])
    removed = model.forward(c3, p3, tokens)
    results["opt_out"] = {
        "excluded": "math",
        "mask_vs_removal_max_abs_diff": float(np.abs(np.asarray(masked - removed)).max()),
        "next_token_changed_fraction": float(np.mean(np.argmax(full, -1) != np.argmax(masked, -1))),
    }
    steps.update()

    steps.set_postfix_str("orbax checkpoint")
    ckpt = os.path.join(workdir, "anchor")
    checkpoint.save(ckpt, config, params)
    c_back, p_back = checkpoint.load(ckpt)
    same = c_back == config and all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p_back)))
    results["checkpoint"] = {"path": ckpt, "bit_identical": bool(same)}
    steps.update()

    steps.set_postfix_str("HF export/import")
    hf_dir = os.path.join(workdir, "hf")
    hf.to_hf(config, params, hf_dir)
    c_hf, p_hf = hf.from_hf(hf_dir)
    results["hf"] = {"path": hf_dir, "roundtrip_max_abs_diff": float(np.abs(np.asarray(
        model.forward(c_hf, p_hf, tokens) - full)).max())}
    steps.update()

    steps.set_postfix_str("transformers oracle")
    oracle = _hf_oracle_logits(hf_dir, tokens[:2, :32])
    if oracle is not None:
        ours = np.asarray(model.forward(config, params, tokens[:2, :32]))
        results["hf"]["transformers_max_abs_diff"] = float(np.abs(ours - oracle).max())
    steps.update()
    steps.close()

    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    with open(os.path.join(workdir, "results", "demo.json"), "w") as f:
        json.dump(results, f, indent=2)
    _print_summary(results, batch, seq)
    return results


def _print_summary(r: dict, batch: int, seq: int) -> None:
    c = r["config"]
    print(f"\nFlexOlmo d_model={c['d_model']} layers={c['n_layers']} experts={c['expert_names']} "
          f"top-{c['top_k']}, batch {batch}x{seq}, backend {r['backend']}")
    print("| dispatch | ms/forward | tokens/s | max abs diff vs dense |")
    print("|---|---:|---:|---:|")
    for k, v in r["dispatch"].items():
        mark = " (auto)" if k == r["auto_path"] else ""
        print(f"| {k}{mark} | {v['ms']:.1f} | {v['tokens_per_s']:,.0f} | {v['max_abs_diff_vs_dense']:.2e} |")
    o = r["opt_out"]
    print(f"opt-out of '{o['excluded']}': routing mask vs physical removal max diff "
          f"{o['mask_vs_removal_max_abs_diff']:.1e}; next-token argmax changed on "
          f"{o['next_token_changed_fraction']:.1%} of positions")
    print(f"orbax checkpoint round trip bit-identical: {r['checkpoint']['bit_identical']}")
    h = r["hf"]
    line = f"HF export/import max diff {h['roundtrip_max_abs_diff']:.1e}"
    if "transformers_max_abs_diff" in h:
        line += f"; vs transformers FlexOlmoForCausalLM max diff {h['transformers_max_abs_diff']:.1e}"
    print(line)
