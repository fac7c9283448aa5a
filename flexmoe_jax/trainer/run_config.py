"""What a training run is (:class:`RunConfig`, gin-configurable) and how it fails (:class:`TrainingError`)."""

from __future__ import annotations

import dataclasses

import gin

from flexmoe_jax.errors import FlexmoeError, UserError
from flexmoe_jax.train import PHASES


class TrainingError(FlexmoeError, RuntimeError):
    """Training cannot continue (non-finite loss, disk full, incompatible resume state).

    ``flexmoe train`` prints it as one line and exits with status 2.
    """


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to train on and for how long; model/optimizer settings live in their own configs."""

    phase: str = "pretrain"
    task: str = "flexmix_mini.public"
    data_dir: str = "flexmoe_data"
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    # (data, fsdp, expert, tensor); -1 on one axis takes the remaining devices.
    mesh: tuple[int, int, int, int] = (-1, 1, 1, 1)
    # expert / router_tune phases
    anchor: str = ""
    expert_name: str = ""
    # Router rows of the new expert: "hidden" (the anchor's own mean FFN input on public vs domain
    # data, per layer), "minilm" (a sentence embedder's mean over router_init_docs documents of each,
    # projected by a map fitted on public data; pip install 'flexmoe_jax[embed]'), "random" or
    # "zeros"; see flexmoe_jax.router_init.
    router_init: str = "hidden"
    router_init_batches: int = 8
    router_init_docs: int = 256
    public_task: str = "flexmix_mini.public"
    # Expert phase: share of training rows drawn from public_task (public replay); 0 trains on the
    # owner's task alone, as the reference does. The router init still reads the owner's task only.
    public_replay: float = 0.0
    # Expert phase: the owner's router bias starts here (<= 0: the forward pass clamps it to <= 0, so
    # from 0 it can only go down; from below it can move both ways). OptimConfig.bias_lr_scale sets its
    # learning rate (0: fixed at this value).
    bias_init: float = 0.0
    # Optional license tag recorded in the expert's manifest (e.g. "CC-BY-4.0", "internal-only").
    license: str = ""

    def __post_init__(self):
        if self.phase not in PHASES:
            raise UserError(f"RunConfig.phase must be one of {PHASES}, got {self.phase!r}")
        if self.phase == "expert" and (not self.anchor or not self.expert_name):
            raise UserError("expert training needs RunConfig.anchor (the public checkpoint) and "
                            "RunConfig.expert_name (this owner's domain)")
        if self.phase == "dense" and not self.anchor:
            raise UserError("dense expert training needs RunConfig.anchor (the public checkpoint it continues)")
        from flexmoe_jax.router_init import METHODS

        if self.router_init not in METHODS:
            raise UserError(f"RunConfig.router_init must be one of {METHODS}, got {self.router_init!r}")
        if self.bias_init > 0:
            raise UserError("RunConfig.bias_init must be <= 0 (the router clamps the bias to <= 0), "
                            f"got {self.bias_init}")
        if not 0 <= self.public_replay < 1:
            raise UserError(f"RunConfig.public_replay must be in [0, 1), got {self.public_replay}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"RunConfig.{name} must be positive, got {getattr(self, name)}")
