"""In-process training runs of the demo: the shared RunConfig/OptimConfig builders and the dense anchor."""

from __future__ import annotations

from pathlib import Path

from flexmoe_jax.demo.workdir import Workdir, complete


def run_config(w: Workdir, **kw):
    """A RunConfig on ``w.data`` with the plan's batch shape; ``kw`` (``steps`` required) overrides."""
    from flexmoe_jax import trainer

    p = w.plan
    base = dict(data_dir=str(w.data), batch_size=p.batch_size, seq_len=p.seq_len, log_every=10)
    base.update(kw)
    base.setdefault("checkpoint_every", max(base["steps"] // 2, 1))
    return trainer.RunConfig(**base)


def optim_config(steps: int, weight_decay: float, peak_lr: float):
    """The demo's schedule: warmup over a tenth of ``steps``."""
    from flexmoe_jax import optim

    return optim.OptimConfig(peak_lr=peak_lr, warmup_steps=max(1, steps // 10), weight_decay=weight_decay,
                             total_steps=steps)


def train_anchor(w: Workdir) -> Path:
    """The public dense model, pretrained on the public mix (skipped when finished); its model directory."""
    from flexmoe_jax import data, trainer

    out = w.root / "anchor"
    if not complete(out / "model"):
        p = w.plan
        rc = run_config(w, phase="pretrain", task=data.PUBLIC_MIXTURE, steps=p.anchor_steps)
        trainer.run(out, p.model_config(), rc, optim_config(p.anchor_steps, 0.1, p.peak_lr))
    return out / "model"
