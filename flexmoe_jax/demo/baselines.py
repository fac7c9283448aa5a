"""The demo's baselines: the weighted soup's weights, BTX (the paper's and on all data), the unrestricted MoE."""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe_jax import storage
from flexmoe_jax.demo.budget import step_flops
from flexmoe_jax.demo.training import optim_config, run_config
from flexmoe_jax.demo.workdir import Workdir, complete
from flexmoe_jax.errors import UserError


def soup_weights(w: Workdir, anchor: Path, dense: dict[str, Path]) -> list[float]:
    """The weighted soup's weights over {public, dense experts}, fit on public validation batches
    (the builder holds public data only); kept in ``results/soup_weights.json``."""
    from flexmoe_jax import data, eval as eval_lib, soup_weights as sw

    f = w.results / "soup_weights.json"
    members = ["public", *dense]
    if f.exists() and json.loads(f.read_text()).get("members") == members:
        return json.loads(f.read_text())["weights"]
    data.register_tasks(w.data)
    p = w.plan
    batches = data.batches(data.PUBLIC_MIXTURE, "validation", p.batch_size, p.seq_len, w.data, seed=11)
    weights, report = sw.fit([eval_lib.load_model(anchor)] + [eval_lib.load_model(dense[d]) for d in dense],
                             batches, steps=p.soup_weight_steps)
    storage.write_json(f, {"members": members, **report}, sort_keys=False)
    return report["weights"]


def train_btx(w: Workdir, anchor: Path, dense: dict[str, Path]) -> Path:
    """BTX as in the paper: the public model's and the dense experts' FFNs as one MoE's experts, the rest
    averaged (:func:`flexmoe_jax.baselines.btx_init`), then trained on public data only."""
    from flexmoe_jax import baselines, checkpoint, data, trainer

    out = w.root / "btx_public"
    if not complete(out / "model"):
        p = w.plan
        a_config, a_params = checkpoint.load(anchor)
        config, params = baselines.btx_init(a_config, a_params, {d: checkpoint.load(run / "model")[1]
                                                                 for d, run in dense.items()}, p.top_k)
        rc = run_config(w, phase="pretrain", task=data.PUBLIC_MIXTURE, steps=p.btx_steps)
        trainer.run(out, config, rc, optim_config(p.btx_steps, 0.0, p.peak_lr), params=params)
    return out / "model"


def train_btx_alldata(w: Workdir, merged: Path) -> Path:
    """The merged FlexOlmo, then every parameter trained jointly on all data (closed data included:
    breaks the data restriction; an informative variant, not the paper's BTX)."""
    from flexmoe_jax import data, loading, trainer

    out = w.root / "btx"
    if not complete(out / "model"):
        p = w.plan
        config, params = loading.load(merged)
        rc = run_config(w, phase="pretrain", task=data.ALL_MIXTURE, steps=p.btx_steps)
        trainer.run(out, config, rc, optim_config(p.btx_steps, 0.0, p.peak_lr), params=params)
    return out / "model"


def train_unrestricted(w: Workdir, anchor: Path, n_owners: int, equal: str = "flops") -> tuple[Path, int]:
    """The anchor upcycled to ``unrestricted_experts`` experts, trained jointly on all data, at the
    paper's two budgets: ``equal="flops"``, the training FLOPs all owners spent together (compiled
    counts, :func:`~flexmoe_jax.demo.budget.step_flops`); ``equal="data"``, as many tokens as all
    owners together; ``equal="half_data"``, half as many (the paper's "equal FLOPs" row, about half its
    owners' data). Returns (model directory, steps); UserError for another ``equal``."""
    from flexmoe_jax import baselines, checkpoint, data, trainer

    p = w.plan
    a_config, a_params = checkpoint.load(anchor)
    config, params = baselines.upcycle(a_config, a_params, p.unrestricted_experts, p.top_k)
    per_step = step_flops(w, n_owners)
    if equal == "flops":
        steps = max(1, round(p.expert_steps * n_owners * per_step["expert"]["compiled"]
                             / per_step["unrestricted"]["compiled"]))
    elif equal == "data":
        steps = p.expert_steps * n_owners  # the same batch shape: the same tokens
    elif equal == "half_data":
        steps = max(1, p.expert_steps * n_owners // 2)
    else:
        raise UserError(f"equal must be 'flops', 'data' or 'half_data', got {equal!r}")
    out = w.root / {"flops": "unrestricted", "data": "unrestricted_equal_data",
                    "half_data": "unrestricted_half_data"}[equal]
    if not complete(out / "model"):
        rc = run_config(w, phase="pretrain", task=data.ALL_MIXTURE, steps=steps)
        trainer.run(out, config, rc, optim_config(steps, 0.0, p.peak_lr), params=params)
    return out / "model", steps
