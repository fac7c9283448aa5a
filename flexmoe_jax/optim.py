"""Optimizers and the trainable/frozen split that makes expert training cheap.

FlexOlmo's expert training updates one slice of a stacked expert tensor (the
new expert's slot) and freezes everything else, including the public slot of
the same tensor. Optax masks work per leaf, so we split *parameters* instead:

- :func:`split` cuts the parameter tree into a ``trainable`` and a ``frozen``
  flat dict (paths like ``"layers/moe/gate"``); expert tensors can be cut along
  their expert axis so the new slot is its own leaf.
- The optimizer is built over ``trainable`` only: frozen parameters have no
  optimizer state at all, and the train step differentiates with respect to
  ``trainable`` only, so XLA never forms weight gradients of frozen matrices.
- :func:`combine` puts the tree back together inside the jitted forward.

``optax.masked`` is *not* used for freezing: it passes masked-out gradients
through unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from flexmoe_jax.errors import UserError

Flat = dict[str, jax.Array]

EXPERT_AXIS = 1  # layers/moe/* are [L, E, ...]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``final_lr_ratio * peak_lr``."""

    peak_lr: float = 1e-3
    warmup_steps: int = 10
    # None: the run's RunConfig.steps.
    total_steps: int | None = None
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # The reference trains experts with weight decay 0: with decay the frozen slices would drift.
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # The router bias's own learning rate, as a multiple of the schedule's (0: a fixed bias).
    bias_lr_scale: float = 1.0

    def __post_init__(self):
        if self.peak_lr <= 0 or (self.total_steps is not None and self.total_steps <= 0):
            raise UserError(f"OptimConfig: peak_lr and total_steps must be positive, got {self}")
        if self.bias_lr_scale < 0:
            raise UserError("OptimConfig: bias_lr_scale must be >= 0 (0 keeps the bias fixed), "
                            f"got {self.bias_lr_scale}")
        if self.total_steps is not None and not 0 <= self.warmup_steps <= self.total_steps:
            raise UserError(f"OptimConfig: warmup_steps={self.warmup_steps} must be in "
                            f"[0, total_steps={self.total_steps}]")


def schedule(cfg: OptimConfig) -> optax.Schedule:
    if cfg.total_steps is None:
        raise UserError("OptimConfig.total_steps is unset; use dataclasses.replace(cfg, total_steps=N)")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps, end_value=cfg.peak_lr * cfg.final_lr_ratio)


def _decays(path: str, leaf: jax.Array) -> bool:
    """Weight decay on matrices only (not norms, biases or 1-d scales)."""
    return leaf.ndim >= 2 and not path.endswith("norm")


def make_optimizer(cfg: OptimConfig, trainable: Flat) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW, over the trainable flat dict only; the router bias's updates
    scaled by ``bias_lr_scale`` (its own learning rate)."""
    decay_mask = {k: _decays(k, v) for k, v in trainable.items()}
    parts = [optax.clip_by_global_norm(cfg.clip_norm),
             optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                         weight_decay=cfg.weight_decay, mask=decay_mask)]
    if cfg.bias_lr_scale != 1.0:
        parts.append(optax.masked(optax.scale(cfg.bias_lr_scale),
                                  {k: k.startswith("layers/moe/bias") for k in trainable}))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------
# Trainable / frozen split
# ----------------------------------------------------------------------------

def flatten(params: Any) -> Flat:
    return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: Flat) -> Any:
    return traverse_util.unflatten_dict(flat, sep="/")


@dataclasses.dataclass(frozen=True)
class Split:
    """Which parameters train.

    ``patterns``: regexes over flat paths; a matching leaf trains whole.
    ``expert_slots``: expert slots (axis 1 of ``layers/moe/*``) that train; those
    leaves are cut so the trainable slots are separate arrays.
    """

    patterns: tuple[str, ...] = ()
    expert_slots: tuple[int, ...] = ()

    def leaf_trains(self, path: str) -> bool:
        return any(re.fullmatch(p, path) for p in self.patterns)


ALL = Split(patterns=(".*",))
ROUTER_ONLY = Split(patterns=(r"layers/moe/router", r"layers/moe/bias"))


def expert_slots(*slots: int) -> Split:
    """Train only these expert slots (their FFN, router rows and bias); freeze the rest."""
    return Split(expert_slots=tuple(sorted(slots)))


SLOT_SEP = "#"


def slot_key(path: str, slot: int) -> str:
    """The flat key of expert slot ``slot`` cut from the leaf at ``path`` (see :func:`split`)."""
    return f"{path}{SLOT_SEP}{slot}"


def parse_slot_key(key: str) -> tuple[str, int | None]:
    """``"path#slot"`` -> ``(path, slot)``; a key that is not a cut slot -> ``(key, None)``."""
    base, sep, slot = key.rpartition(SLOT_SEP)
    return (base, int(slot)) if sep else (key, None)


def _is_expert_leaf(path: str) -> bool:
    return path.startswith("layers/moe/")


def split(params: Any, spec: Split) -> tuple[Flat, Flat]:
    """(trainable, frozen) flat dicts. Expert leaves cut by slot get a ``#slot`` suffix."""
    trainable, frozen = {}, {}
    for path, leaf in flatten(params).items():
        if spec.expert_slots and _is_expert_leaf(path):
            for slot in range(leaf.shape[EXPERT_AXIS]):
                piece = jax.lax.slice_in_dim(leaf, slot, slot + 1, axis=EXPERT_AXIS)
                (trainable if slot in spec.expert_slots else frozen)[slot_key(path, slot)] = piece
        elif spec.leaf_trains(path):
            trainable[path] = leaf
        else:
            frozen[path] = leaf
    return trainable, frozen


def combine(trainable: Flat, frozen: Flat, concat_slots: bool = True) -> Any:
    """Inverse of :func:`split`: concatenate cut expert slots back in slot order.

    With ``concat_slots=False`` the cut pieces stay separate leaves named
    ``name#slot``; the model joins them inside each layer (see ``MoEFFN._slots``),
    which is what the train step uses so frozen slots get no weight gradients.
    """
    merged: dict[str, Any] = {}
    pieces: dict[str, dict[int, jax.Array]] = {}
    for flat in (frozen, trainable):
        for path, leaf in flat.items():
            base, slot = parse_slot_key(path)
            if slot is None or not concat_slots:
                merged[path] = leaf
            else:
                pieces.setdefault(base, {})[slot] = leaf
    for base, by_slot in pieces.items():
        merged[base] = jnp.concatenate([by_slot[s] for s in sorted(by_slot)], axis=EXPERT_AXIS)
    return unflatten(merged)


def state_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a tree (optimizer state accounting)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
