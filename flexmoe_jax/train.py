"""The train step: loss, gradients of the trainable subtree only, AdamW update; the phase's split and shardings.

One step function serves every phase (:data:`PHASES`): the phase only decides the
:class:`optim.Split` (:func:`split_for`) and the optimizer settings. Loss = token
cross-entropy (padding masked) + ``logit_z_weight`` * logit z-loss + ``router_z_weight``
* router z-loss + ``route_weight`` * a routing loss when the batch carries
``route_target``. The loop around the step is :mod:`flexmoe_jax.trainer`; the loss
recipe is explained in docs/training.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flexmoe_jax import lm_loss, model, optim
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.sharding import batch_spec, make_mesh, named_sharding

Batch = dict[str, jax.Array]

# "dense": an owner continues pretraining the whole dense anchor on its own data (the paper's dense
# experts, from which its soup, BTM and BTX baselines are built).
PHASES = ("pretrain", "expert", "dense", "router_tune")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
    logit_z_weight: float = 1e-5
    router_z_weight: float = 1e-3
    # Weight of the routing loss (beyond the paper): own text -> own expert, public replay text ->
    # public expert, so each owner's row learns log-odds of its domain against the shared public row.
    route_weight: float = 0.0
    # The loss takes the output head's logits this many positions at a time (flexmoe_jax.lm_loss): one
    # chunk's [rows, chunk, vocab] fp32 logits live at once instead of the whole sequence's. 0: whole.
    logits_chunk: int = 512


class TrainState(NamedTuple):
    step: jax.Array          # int32 scalar
    trainable: optim.Flat    # what the optimizer updates
    opt_state: Any           # optimizer state of ``trainable`` only


def loss_and_metrics(config: ModelConfig, params: Any, batch: Batch, loss_cfg: LossConfig,
                     mesh: Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar training loss and per-batch metrics (sums are weighted by loss_weights)."""
    hidden, aux = model.apply_hidden(config, params, batch["decoder_input_tokens"], batch["decoder_positions"],
                                     batch["decoder_segment_ids"], mesh)
    lse, target_logit = lm_loss.logit_stats(hidden, params["lm_head"], batch["decoder_target_tokens"],
                                            loss_cfg.logits_chunk, mesh)
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(weights), 1.0)
    ce = jnp.sum((lse - target_logit) * weights) / denom
    logit_z = jnp.sum(jnp.square(lse) * weights) / denom
    loss = ce + loss_cfg.logit_z_weight * logit_z
    metrics = {"ce": ce, "logit_z": logit_z, "tokens": jnp.sum(weights)}
    if config.is_moe:
        router_z = jnp.sum(jnp.mean(aux["router_z"], axis=0) * weights) / denom
        loss = loss + loss_cfg.router_z_weight * router_z
        gates = aux["gates"]  # [L, B, S, E]
        chosen = (gates > 0).astype(jnp.float32)
        w = weights[None, :, :, None]
        # Share of (layer, token) routing slots each expert takes, and its mean mixing weight.
        metrics["router_z"] = router_z
        metrics["expert_share"] = jnp.sum(chosen * w, axis=(0, 1, 2)) / jnp.maximum(jnp.sum(chosen * w), 1.0)
        metrics["expert_gate"] = jnp.sum(gates * w, axis=(0, 1, 2)) / jnp.maximum(jnp.sum(chosen * w, axis=(0, 1, 2)),
                                                                                  1.0)
        if "route_target" in batch and loss_cfg.route_weight > 0:
            logp = jax.nn.log_softmax(aux["router_logits"], axis=-1)  # [L, B, S, E]
            target = batch["route_target"]
            picked = jnp.take_along_axis(logp, jnp.broadcast_to(target[None, ..., None], logp.shape[:-1] + (1,)),
                                         axis=-1)[..., 0]
            route_ce = -jnp.sum(jnp.mean(picked, axis=0) * weights) / denom
            loss = loss + loss_cfg.route_weight * route_ce
            right = (jnp.argmax(logp, axis=-1) == target[None]).astype(jnp.float32)
            metrics["route_ce"] = route_ce
            metrics["route_acc"] = jnp.sum(jnp.mean(right, axis=0) * weights) / denom
    metrics["loss"] = loss
    return loss, metrics


def lm_batch(tokens: jax.Array) -> Batch:
    """A training batch from plain token rows [B, S+1]: predict each next token, one segment per row."""
    tokens = jnp.asarray(tokens, jnp.int32)
    inputs = tokens[:, :-1]
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": tokens[:, 1:],
            "decoder_loss_weights": jnp.ones(inputs.shape, jnp.float32),
            "decoder_segment_ids": jnp.ones_like(inputs),
            "decoder_positions": jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)}


def init_state(trainable: optim.Flat, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable))


def _microbatches(batch: Batch, grad_accum: int) -> Batch:
    def cut(x):
        if x.shape[0] % grad_accum:
            raise UserError(f"batch size {x.shape[0]} is not divisible by grad_accum={grad_accum}")
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    return jax.tree.map(cut, batch)


def train_step(state: TrainState, frozen: optim.Flat, batch: Batch, *, config: ModelConfig,
               tx: optax.GradientTransformation, loss_cfg: LossConfig, grad_accum: int = 1,
               mesh: Mesh | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; gradients (accumulated over ``grad_accum`` micro-batches) of ``trainable`` only."""

    def loss_fn(trainable, micro):
        return loss_and_metrics(config, optim.combine(trainable, frozen, concat_slots=False), micro, loss_cfg, mesh)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (_, metrics), grads = grad_fn(state.trainable, batch)
    else:
        def body(acc, micro):
            (_, m), g = grad_fn(state.trainable, micro)
            return jax.tree.map(jnp.add, acc, (g, m)), None

        zeros_g = jax.tree.map(jnp.zeros_like, state.trainable)
        first = jax.tree.map(lambda x: x[0], _microbatches(batch, grad_accum))
        zeros_m = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(state.trainable, first)[0][1]))
        (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), _microbatches(batch, grad_accum))
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
        metrics = {k: (v if k == "tokens" else v / grad_accum) for k, v in metrics.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return TrainState(state.step + 1, trainable, opt_state), metrics


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec())


def jit_train_step(config: ModelConfig, tx: optax.GradientTransformation, loss_cfg: LossConfig,
                   grad_accum: int, mesh: Mesh | None, state_shardings=None, frozen_shardings=None):
    """The one jitted step (trainer, FLOP count, tests, benchmarks): ``(state, frozen, batch) -> (state,
    metrics)``, the whole state (params, optimizer state, step) donated (updated in place), the frozen
    tree not. Shardings follow the inputs' unless ``state_shardings`` (:func:`state_shardings`; and
    ``frozen_shardings``) pin them, the state's out_shardings equal to its in_shardings (it stays put
    step to step), with the batch split by the rules."""
    fn = functools.partial(train_step, config=config, tx=tx, loss_cfg=loss_cfg, grad_accum=grad_accum, mesh=mesh)
    if state_shardings is None:
        return jax.jit(fn, donate_argnums=(0,))
    if mesh is None:
        raise UserError("jit_train_step: pinned shardings need the mesh they live on")
    return jax.jit(fn, donate_argnums=(0,),
                   in_shardings=(state_shardings, frozen_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, None))


def split_for(phase: str) -> optim.Split:
    """Which parameters ``phase`` trains (expert training: slot 1, the owner's; ``expert.TRAINABLE`` is this)."""
    return {"pretrain": optim.ALL, "expert": optim.expert_slots(1), "dense": optim.ALL,
            "router_tune": optim.ROUTER_ONLY}[phase]


def resolve_mesh(shape: tuple[int, ...]) -> Mesh:
    """The (data, fsdp, expert, tensor) mesh of ``RunConfig.mesh``; one -1 axis takes the remaining devices."""
    n = jax.device_count()
    shape = list(shape)
    if shape.count(-1) > 1:
        raise UserError(f"at most one mesh axis may be -1, got {tuple(shape)}")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if n % rest:
            raise UserError(f"mesh {tuple(shape)} does not divide the {n} devices")
        shape[shape.index(-1)] = n // rest
    return make_mesh(*shape)


def shardings(config: ModelConfig, flat: optim.Flat, mesh: Mesh) -> dict:
    """Each leaf's sharding on the mesh, by its logical axes (cut slots keep theirs)."""
    axes = optim.flatten(model.logical_axes(config))
    return {k: named_sharding(mesh, axes[optim.parse_slot_key(k)[0]], np.shape(v)) for k, v in flat.items()}


def opt_state_shardings(tx: optax.GradientTransformation, trainable: optim.Flat, param_shardings: dict,
                        mesh: Mesh) -> Any:
    """The sharding of every leaf of ``tx.init(trainable)``, a tree of the optimizer state's structure.

    A leaf that mirrors a parameter (Adam's ``mu`` and ``nu``, any per-parameter state of the chain)
    gets that parameter's sharding from ``param_shardings``: matched through the optax state's
    structure (``optax.tree_map_params``, by key, never by shape), so two parameters of one shape
    keep their own. Masked-out leaves (``optax.MaskedNode``) stay as they are; every other leaf
    (step counts, statistics of another shape than their parameter) is replicated on ``mesh``.
    ``trainable`` may be abstract (``jax.ShapeDtypeStruct`` leaves).
    """
    replicated = NamedSharding(mesh, P())

    def like_param(leaf, sharding, param):
        if isinstance(leaf, optax.MaskedNode):
            return leaf
        return sharding if tuple(leaf.shape) == tuple(np.shape(param)) else replicated

    try:
        return optax.tree_map_params(tx, like_param, jax.eval_shape(tx.init, trainable), param_shardings,
                                     trainable, transform_non_params=lambda v: jax.tree.map(lambda _: replicated, v),
                                     is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    except ValueError as e:  # a tree mismatch: param_shardings is not keyed like trainable
        raise UserError(f"opt_state_shardings: param_shardings must have the keys of trainable: {e}") from None


def state_shardings(config: ModelConfig, tx: optax.GradientTransformation, trainable: optim.Flat,
                    mesh: Mesh) -> TrainState:
    """A :class:`TrainState` of shardings on ``mesh``: each trainable leaf by its logical axes
    (:func:`shardings`), its optimizer state like it (:func:`opt_state_shardings`), the step replicated."""
    params = shardings(config, trainable, mesh)
    return TrainState(step=NamedSharding(mesh, P()), trainable=params,
                      opt_state=opt_state_shardings(tx, trainable, params, mesh))


def init_sharded(trainable: optim.Flat, tx: optax.GradientTransformation, state_sh: TrainState) -> TrainState:
    """:func:`init_state` compiled with ``out_shardings=state_sh`` (:func:`state_shardings`): every
    optimizer-state leaf is born on its parameter's devices, never replicated first."""
    return jax.jit(functools.partial(init_state, tx=tx), out_shardings=state_sh)(trainable)


def abstract_state(trainable: optim.Flat, tx: optax.GradientTransformation, state_sh: TrainState) -> TrainState:
    """The state :func:`init_sharded` makes, as ``jax.ShapeDtypeStruct`` leaves with their shardings
    (nothing allocated: for AOT compilation and restore targets)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        jax.eval_shape(functools.partial(init_state, tx=tx), trainable), state_sh)


def place(config: ModelConfig, flat: optim.Flat, mesh: Mesh) -> optim.Flat:
    """Put a flat parameter dict onto the mesh by each leaf's logical axes (cut slots keep theirs)."""
    return {k: jax.device_put(flat[k], s) for k, s in shardings(config, flat, mesh).items()}

