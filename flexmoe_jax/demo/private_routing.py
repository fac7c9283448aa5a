"""The demo's private routing: domain routing's quality against the privacy budget of the owners'
routing stats, and the privacy audit of everything each owner published.

- :func:`sweep`: the merged model under domain routing with every owner's stats released at each
  epsilon of :data:`EPSILONS` (and exact, the leaky reference), scored like the demo's rows; the
  default (train-expert's, epsilon 1) is the demo's own ``flexolmo_domain``. The releases are made
  here, in the builder's process, from each owner's data directory with the owner's seed (a
  simulation: a real owner runs ``flexmoe routing-stats`` itself); the public stats go through the
  same mechanism at the same epsilon (exact for the exact row).
- density routing (the experts as their own density models: nothing published but the weights) is
  scored beside them, with its price in inference FLOPs and its routing (each token's experts are
  those of the sub-model it went to).
- :func:`audit_owners`: ``flexmoe privacy audit`` of each owner's run directory (its released stats,
  its weights, its manifest), plus the same stats attacks on the exact counts for contrast; the
  attacker's reference is the exact public-data counts (public data is everyone's).
"""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe_jax import storage
from flexmoe_jax.demo import ablations, scoring
from flexmoe_jax.demo.experts import routing_seed
from flexmoe_jax.demo.workdir import Workdir, log

EPSILONS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
QUICK_EPSILONS = (1.0,)  # the quick demo (what the tests run) scores the default and exact only


def row(epsilon: float | None) -> str:
    return "flexolmo_domain_" + ("exact" if epsilon is None else f"eps{epsilon:g}")


def released_stats(w: Workdir, domains, epsilon: float | None) -> dict:
    """Every owner's and the public routing stats at ``epsilon`` (None: exact), cached under
    ``w.root/routing_release/``."""
    from flexmoe_jax import data, private_stats, routing

    d = w.root / "routing_release" / ("exact" if epsilon is None else f"eps{epsilon:g}")
    out = {}
    for name, task, ddir, seed in [*((x, f"flexmix_mini.{x}", w.owner_data(x), routing_seed(x)) for x in domains),
                                   (routing.PUBLIC, data.PUBLIC_MIXTURE, w.data, 0)]:
        f = d / f"{name}.npz"
        if not f.exists():
            kw = {} if epsilon is None else {"epsilon": epsilon, "seed": seed}
            private_stats.publish(ddir, task, name, exact=epsilon is None, seq_len=w.plan.seq_len, **kw).save(f)
        out[name] = routing.Stats.load(f)
    return out


DENSITY = "flexolmo_density"


def sweep(w: Workdir, merged: Path, domains, base: dict, experts: dict, epsilons=None) -> dict:
    """Score domain routing at every epsilon and exact, and density routing (nothing but the weights:
    each token goes to the owner model, or the public model, that best explains its document so far;
    the merged model restricted to {public, d} is owner d's model, so this is BTM's hard top-1 over
    the owners' 2-expert models). Writes and returns results/private_routing.json (rows of
    :func:`flexmoe_jax.demo.ablations.summarize`, plus each row's inference FLOPs per token against
    the merged model's)."""
    from flexmoe_jax import checkpoint, eval as eval_lib, flops

    anchor = w.root / "anchor" / "model"
    epsilons = epsilons or (QUICK_EPSILONS if w.plan.mode == "quick" else EPSILONS)
    models = {row(e): {"model": merged, "routing": "domain", "routing_stats": released_stats(w, domains, e)}
              for e in (*epsilons, None)}
    density = {DENSITY: {"model": lambda: eval_lib.density_scorer(*eval_lib.load_model(merged), name=DENSITY)}}
    results = scoring.evaluate_all(w, {**models, **density}, json_name="private_routing_results.json",
                                   groups=ablations.GROUPS)
    routes = scoring.routing_all(w, models, json_name="private_routing_routing.json", groups=ablations.GROUPS,
                                 scored=results)
    # density's routing (the experts of the sub-model each token went to) is counted in its scoring pass
    dens = results.get(DENSITY, {})
    if dens and all("routing" in r for d, r in dens.items() if d != eval_lib.AVERAGE):
        routes[DENSITY] = {d: r["routing"] for d, r in dens.items() if d != eval_lib.AVERAGE}
    summary = ablations.summarize(base, results, routes, list(domains), [*models, DENSITY])
    summary["rows"]["flexolmo (router rows only)"] = ablations.summarize(
        base, base, scoring.results(w, "routing.json"), list(domains), ["flexolmo"])["rows"]["flexolmo"]
    # Inference cost per token (forward = a third of flops_per_token): the merged model runs once; density
    # routing runs the public model and every owner's 2-expert model (as BTM runs its members).
    fwd = lambda cfg: flops.flops_per_token(cfg, w.plan.seq_len) / 3  # noqa: E731
    one = fwd(checkpoint.load_config(merged))
    members = fwd(checkpoint.load_config(anchor)) + sum(fwd(checkpoint.load_config(Path(experts[d]) / "model"))
                                                        for d in domains)
    for name, r in summary["rows"].items():
        r["inference_flops_vs_merged"] = round(members / one, 2) if name == DENSITY else 1.0
    storage.write_json(w.results / "private_routing.json", summary, sort_keys=False)
    (w.results / "private_routing.md").write_text(ablations.table(summary) + "\n")
    return summary


def public_exact(w: Workdir) -> Path:
    """The exact public-data counts: what any attacker can compute from the public data."""
    from flexmoe_jax import data, routing

    f = w.root / "public_exact_stats.npz"
    if not f.exists():
        routing.fit(w.data, data.PUBLIC_MIXTURE, routing.PUBLIC, seq_len=w.plan.seq_len).save(f)
    return f


def audit_owners(w: Workdir, experts: dict, merged: Path) -> dict:
    """``results/audit.json``: per owner, the audit of its run directory (released stats, weights,
    manifest) and of its exact counts (stats attacks only); the merged model's manifest findings."""
    from flexmoe_jax import loading
    from flexmoe_jax.privacy import audit

    f = w.results / "audit.json"
    done = json.loads(f.read_text()) if f.exists() else {}
    ref = public_exact(w)
    released_stats(w, list(experts), None)  # the exact counts, for the contrast
    anchor = w.root / "anchor" / "model"
    for d, run in experts.items():
        if d in done:
            continue
        data_dir = w.owner_data(d)
        published = audit.audit(run, data_dir, anchor=anchor, reference_stats=ref, extraction=False)
        leaky = audit.audit(run, data_dir, anchor=anchor, reference_stats=ref, extraction=False,
                            stats_file=w.root / "routing_release" / "exact" / f"{d}.npz", weights=False)
        done[d] = {"published": published, "exact_stats": leaky}
        v = published["verdict"]
        log(f"   audit {d}: {'PASS' if v['pass'] else 'FAIL'}; stats membership AUC max "
            f"{_num(v.get('stats_membership_auc_max'))} "
            f"(exact counts: {_num(leaky['verdict'].get('stats_membership_auc_max'))})")
        storage.write_json(f, done, sort_keys=False)
    done["merged_manifest"] = audit.manifest_findings(loading.read_manifest(merged), "merged manifest")
    storage.write_json(f, done, sort_keys=False)
    return done


def _num(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def markdown(audits: dict, summary: dict | None) -> list[str]:
    """The report's section: the epsilon curve and each owner's audit, side by side."""
    from flexmoe_jax.privacy import audit

    lines = []
    if summary:
        lines += ["## Domain routing against the privacy budget of the routing stats", "",
                  "Each owner's stats released at (epsilon, 1e-6)-DP per document (flexmoe_jax.private_stats); "
                  "epsilon 1 is the default. Rows as in the ablations (docs/demo.md):", "",
                  ablations.table(summary), ""]
    owners = {k: v for k, v in audits.items() if k != "merged_manifest"}
    if owners:
        lines += ["## Privacy audit of what each owner published", "",
                  "| owner | stats: max membership AUC (released / exact) | weights: max membership AUC | "
                  "stats reconstruction (chains in trained / held-out) | manifest | verdict |",
                  "|---|---|---|---|---|---|"]
        for d, r in owners.items():
            pub, ex = r["published"], r["exact_stats"]
            wmax = max((m["auc"] for m in pub["artifacts"].get("weights", {}).get("membership", {}).values()),
                       default=None)
            ch = pub["artifacts"].get("stats", {}).get("chains", {})
            lines.append(f"| {d} | {_num(pub['verdict'].get('stats_membership_auc_max'))} / "
                         f"{_num(ex['verdict'].get('stats_membership_auc_max'))} | {_num(wmax)} | "
                         f"{ch.get('in_trained', 0):.1%} / {ch.get('in_held_out', 0):.1%} | "
                         f"{'clean' if pub['verdict']['manifest_pass'] else 'records owner details'} | "
                         f"{'PASS' if pub['verdict']['pass'] else 'FAIL'} |")
        lines += ["", "Per owner (results/audit.json):", ""]
        for d, r in owners.items():
            lines += [audit.markdown(r["published"]), ""]
        found = audits.get("merged_manifest")
        lines.append("- the merged model's manifest: " + ("records nothing of the owners' side" if not found
                                                           else "records " + ", ".join(found)))
    return lines
