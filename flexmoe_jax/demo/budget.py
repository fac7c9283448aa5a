"""Training FLOPs of the demo: one step of each phase (compiled count and 6N), and each model's total."""

from __future__ import annotations

import json

from flexmoe_jax import storage
from flexmoe_jax.demo.workdir import Workdir


def step_flops(w: Workdir, n_owners: int) -> dict[str, dict]:
    """FLOPs of one training step of each phase the demo runs, counted by the compiler
    (:func:`flexmoe_jax.flops.routed_step_flops`), with the 6N estimate beside it; cached in
    ``w.root/step_flops.json``."""
    from flexmoe_jax import flops

    cache = w.root / "step_flops.json"
    if cache.exists():
        return json.loads(cache.read_text())
    p = w.plan
    dense = p.model_config()
    merged = dense.replace(num_experts=n_owners + 1, top_k=p.top_k, expert_bias=True)
    phases = {"anchor": (dense, "pretrain"), "expert": (flops.expert_config(dense), "expert"),
              "btx": (merged, "pretrain"),
              "unrestricted": (dense.replace(num_experts=p.unrestricted_experts, top_k=p.top_k), "pretrain")}
    out = {}
    for name, (cfg, phase) in phases.items():
        r = flops.routed_step_flops(cfg, phase, p.batch_size, p.seq_len)
        out[name] = {"compiled": r["compiled"], "estimate_6n": r["estimate_6n"], "method": r["method"]}
    storage.write_json(cache, out, sort_keys=False)
    return out


def flops_table(w: Workdir, n_owners: int, unrestricted_steps: int, unrestricted_data_steps: int) -> dict[str, dict]:
    """Training FLOPs of each model beyond the shared anchor, and in total, by the compiled count
    (``compiled``) and by 6N (``estimate_6n``); ``vs_flexolmo`` compares compiled counts."""
    p = w.plan
    per_step = step_flops(w, n_owners)

    def spent(phase: str, steps: int) -> dict[str, float]:
        return {k: per_step[phase][k] * steps for k in ("compiled", "estimate_6n")}

    def plus(*parts: dict) -> dict[str, float]:
        return {k: sum(x[k] for x in parts) for k in ("compiled", "estimate_6n")}

    one = spent("expert", p.expert_steps)
    experts = plus(*[one] * n_owners)
    dense = plus(*[spent("anchor", p.expert_steps)] * n_owners)  # a dense expert's step is the anchor's
    rows = {"public": plus(), "expert (one owner)": one, "soup": dense, "soup_input": dense, "btm": dense,
            "btm_per_token": dense,
            "soup_flexolmo_experts": experts, "btm_all": experts, "flexolmo": experts,
            "flexolmo_replay": experts, "btx": plus(dense, spent("btx", p.btx_steps)),
            "btx_alldata": plus(experts, spent("btx", p.btx_steps)),
            "unrestricted": spent("unrestricted", unrestricted_steps),
            "unrestricted_equal_data": spent("unrestricted", unrestricted_data_steps),
            "unrestricted_half_data": spent("unrestricted", max(1, p.expert_steps * n_owners // 2))}
    anchor = spent("anchor", p.anchor_steps)
    return {k: {"beyond_anchor": v["compiled"], "total": anchor["compiled"] + v["compiled"],
                "beyond_anchor_6n": v["estimate_6n"], "total_6n": anchor["estimate_6n"] + v["estimate_6n"],
                "vs_flexolmo": v["compiled"] / experts["compiled"],
                "vs_flexolmo_6n": v["estimate_6n"] / experts["estimate_6n"]} for k, v in rows.items()}
