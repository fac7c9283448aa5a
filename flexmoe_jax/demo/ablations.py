"""Routing ablations on a finished demo work directory: router inits, biases and routing modes, each
row merged and measured the same way, and the router knobs on the demo's own merged model (top-1/3,
public-data calibration, router tuning); ``WORKDIR/results/ablations.{json,md,png}``. See docs/demo.md.
"""

from __future__ import annotations

import time
from pathlib import Path

from flexmoe_jax import storage
from flexmoe_jax.demo import scoring
from flexmoe_jax.demo.experts import train_experts
from flexmoe_jax.demo.merging import calibrate, merge_experts, tune_router
from flexmoe_jax.demo.plan import recorded
from flexmoe_jax.demo.workdir import RESULTS, Phase, Workdir, compile_cache, complete
from flexmoe_jax.errors import UserError

# Expert set -> the gin bindings of its owners' train-expert runs ("" is the demo's own experts).
EXPERT_SETS = {
    "": (),
    "init_minilm": ('RunConfig.router_init="minilm"',),
    "init_random": ('RunConfig.router_init="random"',),
    "init_zeros": ('RunConfig.router_init="zeros"',),
    "replay": (),  # the demo's public-replay experts (RunConfig.public_replay)
    "route": ("RunConfig.public_replay=0.3", "LossConfig.route_weight=1.0"),  # replay + routing loss
    "bias_start": ("RunConfig.bias_init=-1.0", "OptimConfig.bias_lr_scale=10.0"),  # from -1, 10x its lr
    "bias_fixed": ("RunConfig.bias_init=-1.0", "OptimConfig.bias_lr_scale=0.0"),  # -1, never trained
    "kit_embedder": (),  # trained against an anchor kit of router-init method "embedder" (the paper's)
}
KIT_SETS = {"kit_embedder": "embedder"}  # expert set -> the anchor kit's router-init method
SET_LABELS = {"": "router init hidden (default)", "init_minilm": "router init minilm (sentence embedder)",
              "init_random": "router init random", "init_zeros": "router init zeros",
              "replay": "hidden + public replay", "route": "hidden + public replay + routing loss",
              "bias_start": "hidden, bias from -1 at 10x lr", "bias_fixed": "hidden, bias fixed at -1",
              "kit_embedder": "anchor kit, router init embedder (the paper's: one vector per domain, every layer)"}
MODES = ("top_k", "public_plus", "document_top_k", "document_public_plus", "domain")
# (expert set, keep the learned bias, routing modes)
ROWS = [("", True, MODES), ("", False, ("top_k", "public_plus", "domain")),
        ("init_minilm", True, ("top_k", "public_plus", "document_public_plus", "domain")),
        ("init_random", True, ("top_k", "public_plus", "document_public_plus", "domain")),
        ("init_zeros", True, ("top_k", "public_plus", "document_public_plus", "domain")),
        ("replay", True, ("top_k", "public_plus", "document_public_plus", "domain")),
        ("route", True, ("top_k", "public_plus", "document_public_plus", "domain")),
        ("bias_start", True, ("top_k", "public_plus", "domain")),
        ("bias_fixed", True, ("top_k", "public_plus", "domain")),
        ("kit_embedder", True, ("top_k", "public_plus", "document_public_plus", "domain"))]
# Router scores evaluated on the default experts: cosine with one temperature (not tuned).
COSINE = {"router_score": "cosine", "router_temperature": 0.1}
SCORED_ROWS = [("", True, ("top_k", "public_plus", "document_public_plus"))]
GROUPS = {"code": ("code", "techdocs"), "techdocs": ("code", "techdocs")}
# Router knobs on the demo's own merged model, top-k routing: row suffix -> how the model is made.
KNOBS = ("top1", "top3", "calibrated", "calibrated_q90", "router_tuned")
PARTS = ("routing", "knobs")  # what `flexmoe demo --ablations [PART ...]` runs


def knob_models(w: Workdir, anchor: Path, domains: list[str]) -> dict[str, dict]:
    """The router-knob rows, all top-k routed: the demo's experts merged without their biases (the
    reference's merge); the demo's merged model at top-1 / top-3, its biases calibrated on public
    text (mean margin, or the 0.9 quantile), its router tuned on public proxy data."""
    merged = w.root / "merged"
    nobias = merge_experts(w, anchor, {d: w.expert(d) for d in domains}, keep_bias=False)
    specs = {"top1": {"model": merged, "top_k": 1}, "top3": {"model": merged, "top_k": 3},
             "calibrated": {"model": calibrate(w, merged)},
             "calibrated_q90": {"model": calibrate(w, merged, quantile=0.9)},
             "router_tuned": {"model": tune_router(w, merged)}}
    base = row_name("", True, "top_k")
    return {row_name("", False, "top_k"): {"model": nobias, "routing": "top_k"},
            **{f"{base}/{k}": {**specs[k], "routing": "top_k"} for k in KNOBS}}


def row_name(expert_set: str, keep_bias: bool, mode: str, score: dict | None = None) -> str:
    return "/".join([expert_set or "hidden", "bias" if keep_bias else "nobias", mode]) + (
        f"/cosine{score['router_temperature']}" if score else "")


def run(workdir, quick: bool = False, parallel: int = 2, rows=ROWS, scored_rows=SCORED_ROWS,
        knobs: bool = True) -> dict:
    """Train the missing expert sets, merge, evaluate every row (and the :data:`KNOBS` rows); write
    and return the summary."""
    from flexmoe_jax import anchor_kit, data, loading

    w = Workdir(workdir, recorded(workdir, quick))
    compile_cache(w)
    base = scoring.results(w)
    domains = [d for d in data.CLOSED_DOMAINS if f"expert_{d}" in base]
    if "flexolmo" not in base or not domains:
        raise UserError(f"{w.root} holds no finished demo (results/results.json lacks flexolmo or the "
                        "owners' experts): run `flexmoe demo` there first (or `flexmoe demo --ablations`)")
    anchor = w.root / "anchor" / "model"
    sets = sorted({r[0] for r in [*rows, *scored_rows]})
    anchors = {v: anchor for v in sets}
    with Phase(w, "ablation_experts"):
        for v in sets:
            if v in KIT_SETS:
                anchors[v] = w.root / f"anchor_kit_{KIT_SETS[v]}"
                if not complete(anchors[v]):
                    anchor_kit.build(anchor, w.data, anchors[v], method=KIT_SETS[v], seq_len=w.plan.seq_len)
        trained = {}
        for a in sorted(set(anchors.values())):
            jobs = [(d, v) for v in sets if anchors[v] == a for d in domains]
            trained.update(train_experts(w, a, jobs, parallel, binds=EXPERT_SETS))
    models, biases = {}, {}
    with Phase(w, "ablation_merge"):
        for (v, keep_bias, modes), score in [(r, None) for r in rows] + [(r, COSINE) for r in scored_rows]:
            name = "merged" + (f"_{v}" if v else "") + ("" if keep_bias else "_nobias")
            merged = merge_experts(w, anchors[v], {d: trained[d, v] for d in domains},
                                   keep_bias=keep_bias, name=name)
            biases[name] = learned_bias(merged)
            for m in modes:
                spec = models[row_name(v, keep_bias, m, score)] = {"model": merged, "routing": m, "score": score}
                if m == "domain" and not loading.read_routing_stats(merged, ("public", *domains)):
                    # merged before merges carried routing stats: the same files, given directly
                    spec["routing_stats"] = scoring.routing_stats(w, {d: trained[d, v] for d in domains})
    if knobs:
        with Phase(w, "ablation_knobs"):
            models.update(knob_models(w, anchor, domains))
    with Phase(w, "ablation_eval"):
        results = scoring.evaluate_all(w, models, json_name="ablations_results.json", groups=GROUPS)
    with Phase(w, "ablation_routing"):
        routes = scoring.routing_all(w, models, json_name="ablations_routing.json", groups=GROUPS, scored=results)
    summary = summarize(base, results, routes, domains, list(models))
    summary["learned_bias"] = biases
    write(w.results, summary)
    return summary


def learned_bias(merged) -> dict[str, float] | None:
    """Each expert's router bias as the forward pass uses it (clamped to <= 0), averaged over layers."""
    import numpy as np

    from flexmoe_jax import loading

    config, params = loading.load(merged)
    if not config.expert_bias:
        return None
    b = np.minimum(np.asarray(params["layers"]["moe"]["bias"]), 0.0).mean(axis=0)
    return {n: round(float(v), 4) for n, v in zip(config.names, b)}


def summarize(base: dict, results: dict, routes: dict, domains: list[str], names: list[str]) -> dict:
    """Every row's measures from the demo's (``base``) and the ablation's results: closed-domain average
    bpb, share of the routing gap closed, public bpb vs the public model, each owner's gain kept, own-expert
    and group shares (docs/demo.md defines each)."""
    def bpb(r, d):
        return r[d]["bpb"]

    def avg(r):
        return sum(bpb(r, d) for d in domains) / len(domains)

    public, flex = base["public"], base["flexolmo"]
    oracle = {d: bpb(base[f"expert_{d}"], d) for d in domains}
    oracle_avg = sum(oracle.values()) / len(domains)
    rows = {}
    for n in names:
        r, rt = results[n], routes.get(n, {})
        rows[n] = {
            "average_bpb": avg(r),
            "gap_closed": (avg(flex) - avg(r)) / (avg(flex) - oracle_avg),
            "public_bpb": bpb(r, "public"),
            "public_vs_public_model": bpb(r, "public") / bpb(public, "public") - 1,
            "gain_kept": {d: (bpb(public, d) - bpb(r, d)) / (bpb(public, d) - oracle[d]) for d in domains},
            "own_share": {d: rt[d]["own"] for d in domains if d in rt},
            "code_or_techdocs": rt.get("code", {}).get("group"),
            "public_share_of_public": rt.get("public", {}).get("picked", {}).get("public"),
            "bpb": {d: bpb(r, d) for d in [*domains, "public"]},
        }
    baselines = ("soup", "soup_weighted", "soup_input", "btm", "btm_per_token", "btx", "unrestricted",
                 "soup_flexolmo_experts", "btm_all", "btx_alldata")
    return {"reference": {"flexolmo_top_k": avg(flex), "oracle": oracle_avg,
                          "public_model_public": bpb(public, "public"),
                          **{b: avg(base[b]) for b in baselines if b in base}},
            "domains": domains, "rows": rows}


def table(summary: dict) -> str:
    """Markdown: one line per row."""
    doms = summary["domains"]
    head = ("| expert set / bias / routing | avg bpb | gap closed | public vs public model | min gain kept | "
            "own share (" + ", ".join(doms) + ") | code or techdocs | public->public |")
    lines = [head, "|" + "---|" * 8]
    for n, r in summary["rows"].items():
        own = ", ".join(f"{r['own_share'][d]:.0%}" for d in doms if d in r["own_share"])
        ct = "-" if r["code_or_techdocs"] is None else f"{r['code_or_techdocs']:.0%}"
        pp = "-" if r["public_share_of_public"] is None else f"{r['public_share_of_public']:.0%}"
        lines.append(f"| {n} | {r['average_bpb']:.4f} | {r['gap_closed']:.0%} | {r['public_vs_public_model']:+.1%} | "
                     f"{min(r['gain_kept'].values()):.0%} | {own} | {ct} | {pp} |")
    ref = summary["reference"]
    lines.append("")
    others = [k for k in ref if k not in ("flexolmo_top_k", "oracle", "public_model_public")]
    lines.append(f"Reference (closed-domain average bpb): FlexOlmo top-k {ref['flexolmo_top_k']:.4f}, oracle "
                 f"(each owner's own model) {ref['oracle']:.4f}" + "".join(f", {k} {ref[k]:.4f}" for k in others)
                 + f"; public model on public {ref['public_model_public']:.4f}.")
    for name, b in (summary.get("learned_bias") or {}).items():
        if b:
            lines.append(f"- router bias of {name} (mean over layers, as used): "
                         + ", ".join(f"{n} {v:+.3f}" for n, v in b.items()))
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """Gap closed and the smallest own-expert share, per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["rows"])
    rows = [summary["rows"][n] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * len(names) + 1.5), sharey=True)
    y = range(len(names))
    axes[0].barh(y, [r["gap_closed"] for r in rows], color="tab:blue")
    axes[0].axvline(0.8, color="k", ls="--", lw=0.8)
    axes[0].set_xlabel("share of the routing gap closed (target 0.8)")
    axes[1].barh(y, [min(r["own_share"].values()) if r["own_share"] else 0 for r in rows], color="tab:orange")
    axes[1].axvline(0.8, color="k", ls="--", lw=0.8)
    axes[1].set_xlabel("smallest own-expert share over the closed domains (target 0.8)")
    axes[0].set_yticks(list(y), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write(results_dir: Path, summary: dict) -> None:
    storage.write_json(results_dir / "ablations.json", summary, sort_keys=False)
    (results_dir / "ablations.md").write_text(table(summary) + "\n")
    plot(summary, results_dir / "ablations.png")


def main(workdir, quick: bool = False, parallel: int = 2, parts: tuple[str, ...] = PARTS) -> None:
    """``flexmoe demo --ablations [PART ...]``: the routing rows (new expert sets), the router knobs, or both."""
    t0 = time.perf_counter()
    routing = "routing" in parts
    summary = run(workdir, quick=quick, parallel=parallel, rows=ROWS if routing else [],
                  scored_rows=SCORED_ROWS if routing else [], knobs="knobs" in parts)
    print(table(summary))
    print(f"ablations: {time.perf_counter() - t0:.0f} s; results in {Path(workdir) / RESULTS}/ablations.*")
