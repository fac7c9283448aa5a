"""The training step's FLOPs per phase (compiled and counted beside the 6N estimate) and peak FLOP/s.

:func:`train_step_flops` compiles a phase's real training step on abstract inputs and counts it with
:mod:`flexmoe_jax.hlo_count` (``Flops``, ``hlo_flops``, ``compiled_flops`` are re-exported here).
Method and caveats: docs/training.md (FLOPs and MFU).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.hlo_count import Flops, compiled_flops, hlo_flops

__all__ = ["Flops", "compiled_flops", "hlo_flops", "flops_per_token", "training_flops", "expert_config",
           "compile_train_step", "train_step_flops", "routed_step_flops", "forward_flops_per_token",
           "measured_peak_flops"]


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters + attention (12 x layers x d_model x seq_len)."""
    c = config.replace(num_experts=config.top_k if config.is_moe else 0, expert_names=())
    active = c.num_params() - config.vocab_size * config.d_model  # the embedding lookup is not a matmul
    return 6.0 * active + 12.0 * config.n_layers * config.d_model * seq_len


def training_flops(config: ModelConfig, steps: int, batch_size: int, seq_len: int) -> float:
    """Total training FLOPs of ``steps`` steps of ``batch_size`` x ``seq_len`` tokens."""
    return flops_per_token(config, seq_len) * steps * batch_size * seq_len





def expert_config(anchor: ModelConfig, name: str = "expert") -> ModelConfig:
    """The 2-expert model :func:`flexmoe_jax.expert.upcycle` makes of a dense anchor (shapes only)."""
    return anchor.replace(num_experts=2, top_k=2, expert_names=("public", name), expert_bias=True)


def compile_train_step(config: ModelConfig, phase: str, batch_size: int, seq_len: int, *, grad_accum: int = 1,
                       mesh: Mesh | tuple[int, ...] | None = None, ocfg: Any = None, loss_cfg: Any = None):
    """(compiled step, trained config, mesh): ``phase``'s training step as :func:`flexmoe_jax.trainer.run`
    compiles it, on abstract inputs (nothing is initialized or run) placed with the trainer's shardings.

    ``config`` is the trained model; a dense one in the ``"expert"`` phase is upcycled first. ``mesh``:
    a Mesh (of any devices, e.g. a TPU topology's), a ``RunConfig.mesh`` shape, or None for one device.
    """
    from flexmoe_jax import model, optim, train
    from flexmoe_jax.sharding import make_mesh

    if phase not in train.PHASES:
        raise UserError(f"phase must be one of {train.PHASES}, got {phase!r}")
    if phase == "expert" and not config.is_moe:
        config = expert_config(config)
    if phase == "router_tune" and not config.is_moe:
        raise UserError("router tuning needs an MoE config (num_experts > 0); this one is dense")
    if mesh is None:
        mesh = make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    elif not isinstance(mesh, Mesh):
        mesh = train.resolve_mesh(tuple(mesh))
    ocfg = ocfg or optim.OptimConfig()
    ocfg = dataclasses.replace(ocfg, total_steps=ocfg.total_steps or max(ocfg.warmup_steps, 1) + 1)

    def placed(flat):  # abstract leaves with the shardings train.place gives them
        return {k: jax.ShapeDtypeStruct(flat[k].shape, flat[k].dtype, sharding=s)
                for k, s in train.shardings(config, flat, mesh).items()}

    split = jax.eval_shape(lambda: optim.split(model.init(config, 0), train.split_for(phase)))
    trainable, frozen = map(placed, split)
    tx = optim.make_optimizer(ocfg, trainable)
    # The trainer's state: each optimizer-state leaf sharded like its parameter, the whole state donated.
    state_sh = train.state_shardings(config, tx, trainable, mesh)
    state = train.abstract_state(trainable, tx, state_sh)
    rows = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=train.batch_sharding(mesh))
             for k, v in jax.eval_shape(train.lm_batch, rows).items()}
    step = train.jit_train_step(config, tx, loss_cfg or train.LossConfig(), grad_accum, mesh, state_sh,
                                train.shardings(config, frozen, mesh))
    return step.lower(state, frozen, batch).compile(), config, mesh


def train_step_flops(config: ModelConfig, phase: str, batch_size: int, seq_len: int, **kw) -> dict:
    """FLOPs of one training step of ``phase`` (:func:`compile_train_step`, same arguments).

    Returns per step: ``compiled`` (matmul FLOPs of the compiled program, summed over the mesh's
    devices; a lower bound if ``dynamic_loops`` or ``unknown_kernels``, see :class:`Flops`),
    ``estimate_6n`` (:func:`flexmoe_jax.flops_per_token` x tokens), ``dynamic_loops``,
    ``dynamic_flops``, ``unknown_kernels`` and ``devices``.
    """
    compiled, config, mesh = compile_train_step(config, phase, batch_size, seq_len, **kw)
    counted = compiled_flops(compiled)
    n = mesh.devices.size
    return {"compiled": counted.flops * n, "dynamic_loops": counted.dynamic_loops,
            "dynamic_flops": counted.dynamic_flops * n, "unknown_kernels": counted.unknown_kernels, "devices": n,
            "estimate_6n": flops_per_token(config, seq_len) * batch_size * seq_len}


def routed_step_flops(config: ModelConfig, phase: str, batch_size: int, seq_len: int, **kw) -> dict:
    """:func:`train_step_flops` of a top-k MoE without data-dependent loops: the matmuls of a dropless
    top-k dispatch (each token through exactly ``top_k`` experts, no padding), counted by the compiler.

    Computed as the dense-dispatch step at E experts minus ``E - top_k`` times one expert's share (the
    difference of the steps at E and E - 1 experts; why and what it charges: docs/training.md, FLOPs and
    MFU). Dense models, and MoEs with every expert active, are counted directly. Adds ``method`` to the
    result (and ``per_expert`` when it subtracts).
    """
    e = config.num_experts if phase != "expert" or config.is_moe else 2
    k = config.top_k if config.is_moe else 2
    if not config.is_moe or k >= e:
        return {**train_step_flops(config, phase, batch_size, seq_len, **kw), "method": "compiled step"}
    dense = config.replace(moe_impl="dense")
    fewer = dense.replace(num_experts=e - 1, top_k=min(k, e - 1), expert_names=dense.names[: e - 1])
    full, less = (train_step_flops(c, phase, batch_size, seq_len, **kw) for c in (dense, fewer))
    per_expert = full["compiled"] - less["compiled"]
    return {**full, "compiled": full["compiled"] - (e - k) * per_expert, "per_expert": per_expert,
            "method": f"compiled dense-dispatch step minus the {e - k} experts each token skips"}


@functools.lru_cache(maxsize=64)
def _compiled_forward_flops(config: ModelConfig, seq_len: int) -> float:
    from flexmoe_jax import model

    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    compiled = jax.jit(lambda p, t: model.apply(config, p, t)[0]).lower(model.param_shapes(config), tokens).compile()
    return compiled_flops(compiled).flops


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs per token of the compiled forward pass (logits included) over ``seq_len`` tokens,
    a top-k MoE counted dropless as :func:`routed_step_flops` counts its step: the dense-dispatch
    forward at E experts minus ``E - top_k`` times one expert's share."""
    if not config.is_moe or config.top_k >= config.num_experts:
        return _compiled_forward_flops(config.replace(moe_impl="dense") if config.is_moe else config, seq_len) / seq_len
    e, k = config.num_experts, config.top_k
    dense = config.replace(moe_impl="dense")
    fewer = dense.replace(num_experts=e - 1, top_k=min(k, e - 1), expert_names=dense.names[: e - 1])
    full, less = _compiled_forward_flops(dense, seq_len), _compiled_forward_flops(fewer, seq_len)
    return (full - (e - k) * (full - less)) / seq_len


@functools.cache
def measured_peak_flops(dtype: str = "float32", n: int = 1024) -> float:
    """Matmul FLOP/s of this machine (an n^3 jitted matmul in ``dtype``), measured once (for MFU)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 5 * 2 * n ** 3 / (time.perf_counter() - t)
