"""Baselines that need their own parameters, and the training-FLOPs accounting that keeps them fair.

FlexOlmo's comparison (paper section 4) holds training compute fixed: every method starts from
the same public anchor, and a method that trains jointly may spend exactly the compute the owners
spent on their experts together. Two baselines need parameters of their own:

- **Unrestricted MoE** (:func:`upcycle`): the anchor sparsely upcycled to ``num_experts`` copies of
  its FFN with small random router rows (to break the copies' symmetry), trained jointly on all
  data with top-k routing and every parameter trainable. With ``top_k=2`` it touches as many
  parameters per token as an owner's 2-expert model, so equal FLOPs means equal tokens: the sum of
  the owners' training tokens.
- **BTX** (:func:`btx_init`, the paper's): the dense experts' FFNs (and the public model's) become one
  MoE's experts, every other tensor the average of the dense models, then trained on public data
  only. The demo's ``btx_alldata`` (the merged FlexOlmo trained on all data, closed data included)
  breaks the data restriction and is kept as an informative variant.

FLOPs are estimated as 6 x active parameters (top-k experts, embedding lookup excluded) plus the
attention score/value matmuls, per token: the trainer's ``mfu_6n``, logged beside the compiled
step's own count (:mod:`flexmoe_jax.flops`), which is lower for an expert step (no weight
gradients of frozen parameters).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from flexmoe_jax import model
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError


def upcycle(anchor_config: ModelConfig, anchor_params: model.Params, num_experts: int, top_k: int,
            seed: int = 0, router_std: float | None = None) -> tuple[ModelConfig, model.Params]:
    """Dense anchor -> ``num_experts`` copies of its FFN behind a random router (sparse upcycling).

    Unlike :func:`flexmoe_jax.expert.upcycle` (public slot + one owner's slot, trained apart),
    every slot and every router row here trains jointly; the router starts random (normal,
    ``router_std`` default the model's ``init_std``) so identical experts receive different tokens.
    """
    if anchor_config.is_moe:
        raise UserError(f"upcycling needs a dense anchor (num_experts=0); this one has experts "
                        f"{list(anchor_config.names)}")
    if not 1 <= top_k <= num_experts:
        raise UserError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    model.check_params(anchor_config, anchor_params, "anchor params")
    config = anchor_config.replace(num_experts=num_experts, top_k=top_k, expert_names=(), expert_bias=False)
    L, d = anchor_config.n_layers, anchor_config.d_model
    std = anchor_config.init_std if router_std is None else router_std
    router = np.random.default_rng(seed).standard_normal((L, num_experts, d)) * std
    params = model.upcycle_params(anchor_params, config, router)
    return config, params


def btx_init(anchor_config: ModelConfig, anchor_params: model.Params, dense: dict[str, model.Params], top_k: int,
             seed: int = 0) -> tuple[ModelConfig, model.Params]:
    """Branch-Train-MiX's starting point (the paper's BTX baseline): the public model's FFN and each
    dense expert's FFN become the experts (``public``, then ``dense`` in order) of one MoE, every other
    tensor is the average of the public model and the dense experts, and the router is random."""
    if anchor_config.is_moe:
        raise UserError("BTX starts from the dense public model (num_experts=0)")
    if not dense:
        raise UserError("BTX needs at least one dense expert")
    members = [anchor_params, *dense.values()]
    for name, p in dense.items():
        model.check_params(anchor_config, p, f"dense expert {name!r}")
    n = 1 + len(dense)
    config = anchor_config.replace(num_experts=n, top_k=min(top_k, n), expert_names=("public", *dense),
                                   expert_bias=False)
    flat = [traverse_util.flatten_dict(jax.device_get(p), sep="/") for p in members]
    shared = {k: (sum(np.asarray(f[k], np.float32) for f in flat) / n).astype(np.asarray(flat[0][k]).dtype)
              for k in flat[0] if not k.startswith("layers/mlp/")}
    params = traverse_util.unflatten_dict(shared, sep="/")
    moe = {k: np.stack([np.asarray(f[f"layers/mlp/{k}"]) for f in flat], axis=1) for k in ("gate", "up", "down")}
    rng = np.random.default_rng(seed)
    L, d = anchor_config.n_layers, anchor_config.d_model
    moe["router"] = (rng.standard_normal((L, n, d)) * anchor_config.init_std).astype(moe["gate"].dtype)
    params["layers"]["moe"] = moe
    model.check_params(config, params, "BTX params")
    return config, params
