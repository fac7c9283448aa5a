"""What each scored row costs at inference: active parameters and compiled forward FLOPs per token.

The paper compares FlexOlmo with BTM at a stated ratio of *active* parameters (FlexOlmo 4 of 8
experts, about 1.4x BTM top-2), so every row of the demo says what it holds:

- ``active_params``: the parameters one token's output is computed from (embeddings and head
  included, as the paper counts them): a dense model's all; an MoE's shared tensors plus its top-k
  experts; an ensemble's, the members it mixes (BTM top-2: two dense models).
- ``forward_flops_per_token``: matmul FLOPs per token of the compiled forward passes the row runs
  (:func:`flexmoe_jax.flops.forward_flops_per_token`, at the evaluation's sequence length), summed
  over every member an ensemble must run: BTM in the per-token form and density routing run every
  member at every token to weigh them; the paper-form BTM runs every member on the input's prefix and
  then only its top-k (counted here after the prefix; the prefix's cost is stated in ``runs``).

:func:`paper_top_k` picks FlexOlmo's top-k at the paper's ratio to BTM top-2.
"""

from __future__ import annotations

from pathlib import Path

from flexmoe_jax.config import ModelConfig

PAPER_RATIO = 1.4  # FlexOlmo's active parameters / BTM top-2's in the paper (4 of 8 experts vs 2 dense)


def active_params(config: ModelConfig) -> int:
    """Parameters one token uses: every shared tensor, and only ``top_k`` experts of an MoE."""
    if not config.is_moe:
        return config.num_params()
    return config.replace(num_experts=min(config.top_k, config.num_experts), expert_names=()).num_params()


def paper_top_k(merged: ModelConfig, dense: ModelConfig, btm_top_k: int = 2, ratio: float = PAPER_RATIO) -> int:
    """The top-k at which the merged model's active parameters are closest to ``ratio`` x BTM top-k's."""
    btm = btm_top_k * active_params(dense)
    ks = range(1, merged.num_experts + 1)
    return min(ks, key=lambda k: (abs(active_params(merged.replace(top_k=k)) / btm - ratio), k))


def config_of(path) -> ModelConfig:
    """The ModelConfig of a checkpoint or a run directory's model (JSON only, no arrays)."""
    from flexmoe_jax import checkpoint, loading

    return checkpoint.load_config(loading.run_checkpoint(path, "model") or path)


def _one(cfg: ModelConfig, seq_len: int, runs: str) -> dict:
    from flexmoe_jax import flops

    return {"active_params": active_params(cfg), "forward_flops_per_token": flops.forward_flops_per_token(cfg, seq_len),
            "runs": runs}


def _ensemble(members: list[ModelConfig], mixed: int, run: list[ModelConfig], seq_len: int, runs: str) -> dict:
    from flexmoe_jax import flops

    return {"active_params": sum(sorted(active_params(m) for m in members)[-mixed:]),
            "forward_flops_per_token": sum(flops.forward_flops_per_token(m, seq_len) for m in run), "runs": runs}


def row_costs(names, anchor, merged, paths: dict[str, Path], n_owners: int, seq_len: int, top_k: int,
              btm_prefix: int) -> dict[str, dict]:
    """``{row: {"active_params", "forward_flops_per_token", "runs"}}`` for every row in ``names`` the
    demo knows how to cost; ``paths`` gives the checkpoint of each row that is one model."""
    from flexmoe_jax import flops

    dense = config_of(anchor)
    owner = flops.expert_config(dense)
    merged_cfg = config_of(merged)
    members = [dense] * (n_owners + 1)
    density_members = [merged_cfg.replace(num_experts=1, top_k=1, expert_names=merged_cfg.names[:1])] + \
        [merged_cfg.replace(num_experts=2, top_k=2, expert_names=merged_cfg.names[:2])] * n_owners
    out: dict[str, dict] = {}
    for n in names:
        if n in ("public", "soup", "soup_weighted", "soup_flexolmo_experts") or n.startswith("dense_"):
            out[n] = _one(dense, seq_len, "1 dense model")
        elif n.startswith("expert_"):
            out[n] = _one(owner, seq_len, "the owner's 2-expert model")
        elif n == "soup_input":
            out[n] = _ensemble(members, 1, [dense], seq_len,
                               f"all {len(members)} members on each input's first {btm_prefix} tokens, then 1 "
                               "dense model (the input's soup)")
        elif n == "btm":
            out[n] = _ensemble(members, top_k, members[:top_k], seq_len,
                               f"all {len(members)} members on each input's first {btm_prefix} tokens, then its "
                               f"top-{top_k}")
        elif n == "btm_per_token":
            out[n] = _ensemble(members, top_k, members, seq_len, f"all {len(members)} members at every token")
        elif n == "btm_all":
            m = [dense] + [owner] * n_owners
            out[n] = _ensemble(m, len(m), m, seq_len, f"all {len(m)} members at every token")
        elif "density" in n:
            out[n] = _ensemble(density_members, 1, density_members, seq_len,
                               f"all {len(density_members)} sub-models at every token")
        elif n.startswith("flexolmo_minus_"):
            k = min(merged_cfg.top_k, merged_cfg.num_experts - 1)
            fewer = merged_cfg.replace(num_experts=merged_cfg.num_experts - 1, top_k=k,
                                       expert_names=merged_cfg.names[:-1])
            out[n] = _one(fewer, seq_len, "the merged model, one owner out")
        elif n.startswith("flexolmo_top") and n[len("flexolmo_top"):].isdigit():
            out[n] = _one(merged_cfg.replace(top_k=int(n[len("flexolmo_top"):])), seq_len, "the merged model")
        elif n.startswith("flexolmo"):
            out[n] = _one(merged_cfg, seq_len, "the merged model")
        elif n in paths:
            out[n] = _one(config_of(paths[n]), seq_len, "1 MoE")
    return out


def markdown(costs: dict[str, dict], reference: str = "btm") -> list[str]:
    """The report's table of :func:`row_costs`."""
    ref = costs.get(reference)
    lines = ["", "## Inference cost of each row", "",
             "Active parameters: what one token's output is computed from (embeddings and head included); "
             "forward FLOPs: matmuls per token of the compiled forward passes the row runs (every member an "
             "ensemble must run to weigh its members). The paper compares FlexOlmo at about "
             f"{PAPER_RATIO}x BTM top-2's active parameters.", "",
             f"| model | active params | vs {reference} | forward MFLOP / token | vs {reference} | runs |",
             "|---|---:|---:|---:|---:|---|"]
    for n, c in costs.items():
        a = f"{c['active_params'] / ref['active_params']:.2f}x" if ref else "-"
        f = f"{c['forward_flops_per_token'] / ref['forward_flops_per_token']:.2f}x" if ref else "-"
        lines.append(f"| {n} | {c['active_params']:,} | {a} | {c['forward_flops_per_token'] / 1e6:.2f} | {f} | "
                     f"{c['runs']} |")
    return lines
