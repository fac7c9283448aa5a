"""``flexmoe demo``: the FlexOlmo mini-replication on FlexMix-mini, end to end, resumable.

Phases, in order (a rerun skips what is finished): data, anchor, experts, merge, btx, unrestricted,
routing_stats, evaluate, mixed (mixed-domain documents), routing, privacy, private_routing, audit, then the report in
``WORKDIR/results/`` (results.json, findings.json, results.md, plots, timing.json). See docs/demo.md.
"""

from __future__ import annotations

import json
import os
import time

from flexmoe_jax import storage
from flexmoe_jax.demo import baselines, inference_cost, merging, mixed_docs, private_routing, scoring
from flexmoe_jax.demo.budget import flops_table
from flexmoe_jax.demo.datasets import build_data, owner_data_dir, share_public_rows
from flexmoe_jax.demo.experts import train_experts
from flexmoe_jax.demo.lineup import Trained, scored_models
from flexmoe_jax.demo.plan import select
from flexmoe_jax.demo.report import write_report
from flexmoe_jax.demo.training import train_anchor
from flexmoe_jax.demo.workdir import Phase, Workdir, compile_cache, log

# The MoEs whose routing the report shows (results/routing.json).
ROUTED = ("flexolmo", "flexolmo_replay", "flexolmo_domain", "btx", "btx_alldata")


def train_all(w: Workdir, domains: list[str], parallel: int) -> Trained:
    """Every training phase, data to the unrestricted MoE, each timed in ``w``."""
    with Phase(w, "data"):
        build_data(w)
        for d in domains:
            owner_data_dir(w.data, d, w.owner_data(d))
    with Phase(w, "anchor"):
        anchor = train_anchor(w)
    with Phase(w, "experts"):
        share_public_rows(w, domains)
        trained = train_experts(w, anchor, [(d, v) for v in ("", "replay", "dense") for d in domains], parallel)
        experts = {d: trained[d, ""] for d in domains}
        experts_replay = {d: trained[d, "replay"] for d in domains}
        dense = {d: trained[d, "dense"] for d in domains}
    with Phase(w, "merge"):
        merged = merging.merge_experts(w, anchor, experts)
        merged_replay = merging.merge_experts(w, anchor, experts_replay, name="merged_replay")
    with Phase(w, "btx"):
        btx = baselines.train_btx(w, anchor, dense)
        btx_alldata = baselines.train_btx_alldata(w, merged)
    with Phase(w, "unrestricted"):
        unrestricted, u_steps = baselines.train_unrestricted(w, anchor, len(domains))
        unrestricted_data, ud_steps = baselines.train_unrestricted(w, anchor, len(domains), equal="data")
        unrestricted_half, _ = baselines.train_unrestricted(w, anchor, len(domains), equal="half_data")
    return Trained(anchor=anchor, experts=experts, experts_replay=experts_replay, dense=dense, merged=merged,
                   merged_replay=merged_replay, btx=btx,
                   btx_alldata=btx_alldata, unrestricted=unrestricted, unrestricted_data=unrestricted_data,
                   unrestricted_steps=u_steps, unrestricted_data_steps=ud_steps,
                   unrestricted_half_data=unrestricted_half)


def run(workdir: str | os.PathLike, quick: bool = False, parallel: int = 2, domains=None,
        plan: str | None = None) -> dict:
    """Run (or resume) the demo in ``workdir`` (``plan``: a :data:`flexmoe_jax.demo.plan.PLANS` name,
    default the full plan; ``quick`` the smoke test); returns ``{"results", "findings", "report"}``.

    DemoError when the work directory holds another mode's run, a corpus is missing or an owner's run fails.
    """
    from flexmoe_jax import data, eval as eval_lib

    t_start = time.perf_counter()
    w = Workdir(workdir, select(quick, plan))
    w.claim()
    compile_cache(w)
    domains = list(domains or data.CLOSED_DOMAINS)
    t = train_all(w, domains, parallel)
    with Phase(w, "routing_stats"):
        domain_stats = scoring.routing_stats(w, t.experts)
    models = scored_models(w, t, domains, domain_stats)
    with Phase(w, "evaluate"):
        results = scoring.evaluate_all(w, models)
    with Phase(w, "mixed"):
        mixed = mixed_docs.run(w, models, domains, t.merged)
    with Phase(w, "routing"):
        routes = scoring.routing_all(w, {m: models[m] for m in ROUTED}, scored=results)
    with Phase(w, "privacy"):
        priv = scoring.privacy_check(w, t.experts, t.merged)
    with Phase(w, "private_routing"):
        private = private_routing.sweep(w, t.merged, domains, results, t.experts)
    with Phase(w, "audit"):
        audits = private_routing.audit_owners(w, t.experts, t.merged)
    flops = flops_table(w, len(domains), t.unrestricted_steps, t.unrestricted_data_steps)
    from flexmoe_jax.demo.lineup import BTM_CONTEXT_TOKENS
    from flexmoe_jax.evaluation.tasks import DEFAULT_SEQ_LEN

    rows = [*results, *[r for r in private.get("rows", {}) if r not in results and r.isidentifier()]]
    costs = inference_cost.row_costs(rows, t.anchor, t.merged, {"btx": t.btx, "btx_alldata": t.btx_alldata,
                                     "unrestricted": t.unrestricted, "unrestricted_equal_data": t.unrestricted_data,
                                     "unrestricted_half_data": t.unrestricted_half_data},
                                     len(domains), min(DEFAULT_SEQ_LEN, w.plan.max_seq_len), w.plan.top_k,
                                     BTM_CONTEXT_TOKENS)
    storage.write_json(w.results / "inference_cost.json", costs, sort_keys=False)
    docs_file = eval_lib.docs_path(w.results / "results.json")
    docs = json.loads(docs_file.read_text()) if docs_file.exists() else None
    report = write_report(w, results, domains, flops, priv, routes, docs,
                          extra=private_routing.markdown(audits, private) + mixed_docs.markdown(mixed)
                          + inference_cost.markdown(costs))
    timing = {**w.timing(), "total_this_invocation": round(time.perf_counter() - t_start, 1)}
    storage.write_json(w.results / "timing.json", timing, sort_keys=False)
    log("\n" + report.read_text())
    log(f"results in {w.results}")
    return {"results": results, "findings": json.loads((w.results / "findings.json").read_text()),
            "report": str(report)}
