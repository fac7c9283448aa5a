"""The merged FlexOlmo models of the demo: the merge, public-data bias calibration and router tuning."""

from __future__ import annotations

from pathlib import Path

from flexmoe_jax.demo.workdir import Workdir, complete


def public_routing_stats(w: Workdir) -> Path:
    """The public data's routing stats (the builder counts the public data), released through the
    owners' mechanism so the experts' models are estimated alike (flexmoe_jax.private_stats); its file."""
    from flexmoe_jax import data, private_stats, routing

    f = w.root / "public_routing_stats.npz"
    if not f.exists():
        private_stats.fit(w.data, data.PUBLIC_MIXTURE, routing.PUBLIC, seq_len=w.plan.seq_len, seed=0).save(f)
    return f


def merge_experts(w: Workdir, anchor: Path, experts: dict[str, Path], keep_bias: bool = True,
                  name: str | None = None) -> Path:
    """FlexOlmo's merge, top-k of the plan, into ``w.root/name`` (skipped when finished);
    ``keep_bias=False`` is the reference's (experts' learned biases dropped)."""
    from flexmoe_jax import merge

    out = w.root / (name or ("merged" if keep_bias else "merged_nobias"))
    if not complete(out):  # each owner's routing stats are found in its run directory
        merge.merge(anchor, [experts[d] for d in experts], out, top_k=w.plan.top_k, keep_bias=keep_bias,
                    progress=True, routing_stats={"public": public_routing_stats(w)})
    return out


def calibrate(w: Workdir, merged: Path, quantile: float | None = None) -> Path:
    """Public-data bias calibration of the merged router: each expert's mean margin over the
    public expert (or its ``quantile``) on public text brought to <= 0. Returns the checkpoint."""
    from flexmoe_jax import checkpoint, data, loading, router_tune

    out = w.root / ("flexolmo_cal" if quantile is None else f"flexolmo_cal_q{round(quantile * 100)}")
    if not complete(out):
        config, params = loading.load(merged)
        data.register_tasks(w.data)
        p = w.plan
        batches = data.batches(data.PUBLIC_MIXTURE, "train", p.batch_size, p.seq_len, w.data, seed=7)
        config, params, report = router_tune.calibrate_bias(config, params, batches, p.calibration_batches,
                                                            quantile=quantile)
        checkpoint.save(out, config, params, metadata={"calibrated_from": str(merged), "calibration": report})
    return out


def tune_router(w: Workdir, merged: Path) -> Path:
    """The merged model's router rows tuned on public proxy data (:func:`flexmoe_jax.router_tune.tune`)."""
    from flexmoe_jax import router_tune

    out = w.root / "flexolmo_rt"
    if not complete(out / "model"):
        p = w.plan
        router_tune.tune(merged, out, w.data, top_k=p.top_k, per_expert=p.rt_per_expert, public=p.rt_public,
                         pool=p.rt_pool, gin_params=[f"RunConfig.steps={p.router_tune_steps}",
                                                     f"RunConfig.batch_size={p.batch_size}",
                                                     f"RunConfig.seq_len={p.seq_len}",
                                                     f"RunConfig.checkpoint_every={p.router_tune_steps}",
                                                     f"OptimConfig.warmup_steps={max(1, p.router_tune_steps // 10)}"])
    return out / "model"
