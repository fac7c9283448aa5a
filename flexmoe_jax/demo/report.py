"""The demo's findings (numbers that answer the paper's claims) and its ``results/results.md``.

Everything here is computed from what the run measured: ``results.json`` (bits per byte, sample
sizes), its per-document scores (paired bootstrap intervals, :mod:`flexmoe_jax.evaluation.compare`),
``routing.json``, ``flops.json`` and ``privacy.json``. The sentences only say what the numbers carry.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from flexmoe_jax import storage

# Baselines and variants FlexOlmo is compared against, in report order.
# "soup", "btm": the paper's (from dense experts; BTM top-2); "_flexolmo_experts"/"_all": from the owners'
# 2-expert models (BTM over every member), informative variants that are not the paper's.
COMPARED = ("public", "soup", "soup_weighted", "soup_input", "btm", "btm_per_token", "btx", "unrestricted",
            "unrestricted_equal_data", "unrestricted_half_data", "soup_flexolmo_experts", "btm_all", "btx_alldata",
            "flexolmo_replay", "flexolmo_domain")
MAIN_PLOT = ("public", "soup", "btm", "btx", "unrestricted", "flexolmo", "flexolmo_domain")


def findings(results: dict, domains: list[str], routing: dict | None = None, docs: dict | None = None) -> dict:
    """Numbers that answer the paper's claims, from ``results`` (bits per byte), ``routing``
    (:func:`flexmoe_jax.demo.scoring.routing_all`) and ``docs`` (per-document scores: adds paired 95%
    bootstrap intervals to every headline difference)."""
    def bpb(m, d):
        return results[m][d]["bpb"]

    avg = {m: r["average"]["bpb"] for m, r in results.items() if "average" in r}
    f: dict = {"average_bpb": avg}
    f["flexolmo_vs_public"] = {d: bpb("flexolmo", d) - bpb("public", d) for d in [*domains, "public"]}
    f["flexolmo_beats_public_on"] = [d for d in domains if bpb("flexolmo", d) < bpb("public", d)]
    if "flexolmo_replay" in results:
        f["flexolmo_replay_beats_public_on"] = [d for d in domains if bpb("flexolmo_replay", d) < bpb("public", d)]
        f["flexolmo_replay_vs_public"] = {d: bpb("flexolmo_replay", d) - bpb("public", d) for d in [*domains, "public"]}
    f["relative_to_flexolmo_average"] = {m: (a - avg["flexolmo"]) / avg["flexolmo"] for m, a in avg.items()}
    def kept(m):
        out = {}
        for d in domains:
            own = f"expert_{d}"
            if own in results:
                gain = bpb("public", d) - bpb(own, d)
                out[d] = (bpb("public", d) - bpb(m, d)) / gain if gain > 0 else None
        return out

    f["share_of_owner_gain_kept"] = kept("flexolmo")
    # The paper's in-domain check: how much of the dense expert's gain the FFN-only expert reaches.
    reach = {}
    for d in domains:
        if f"expert_{d}" in results and f"dense_{d}" in results:
            dense_gain = bpb("public", d) - bpb(f"dense_{d}", d)
            reach[d] = (bpb("public", d) - bpb(f"expert_{d}", d)) / dense_gain if dense_gain > 0 else None
    if reach:
        f["expert_share_of_dense_gain"] = reach
    if "flexolmo_domain" in results:
        f["share_of_owner_gain_kept_domain_routing"] = kept("flexolmo_domain")
    if all(f"expert_{d}" in results for d in domains):
        # The owner oracle: each domain scored by its own owner's model, which is the merged model routed
        # perfectly to {public, owner}. The routing gap is FlexOlmo's distance to it.
        oracle = sum(bpb(f"expert_{d}", d) for d in domains) / len(domains)
        gap = avg["flexolmo"] - oracle
        f["routing_gap"] = {"oracle_average_bpb": oracle, "flexolmo_average_bpb": avg["flexolmo"],
                            "closed": {m: (avg["flexolmo"] - a) / gap if gap > 0 else None for m, a in avg.items()
                                       if m.startswith("flexolmo_") and "_minus_" not in m}}
    opt = {}
    for d in domains:
        name = f"flexolmo_minus_{d}"
        if name not in results:
            continue
        gain = bpb("public", d) - bpb("flexolmo", d)
        others = [o for o in [*domains, "public"] if o != d]
        opt[d] = {"gain_removed": (bpb(name, d) - bpb("flexolmo", d)) / gain if gain > 0 else None,
                  "bpb_change_own": bpb(name, d) - bpb("flexolmo", d),
                  "largest_relative_change_elsewhere": max(abs(bpb(name, o) - bpb("flexolmo", o)) / bpb("flexolmo", o)
                                                           for o in others)}
    f["opt_out"] = opt
    if routing:
        f["own_expert_share"] = {m: {d: r[d]["own"] for d in domains if d in r} for m, r in routing.items()}
    if docs:
        f["intervals"] = intervals(docs, domains, results)
    return f


def intervals(docs: dict, domains: list[str], results: dict) -> dict:
    """Paired 95% bootstrap intervals: each model's average bpb, each compared model's relative bpb
    difference to FlexOlmo (average and per domain), and each opt-out's bpb change on its own domain."""
    from flexmoe_jax.evaluation.compare import Comparison

    c = Comparison(docs, domains)
    out: dict = {"average_bpb": {m: c.interval(m) for m in docs if m in results}}
    out["vs_flexolmo"] = {}
    for m in COMPARED:
        if m in docs and "flexolmo" in docs:
            out["vs_flexolmo"][m] = {d: c.difference(m, "flexolmo", d) for d in ["average", *domains, "public"]}
    out["opt_out_change_own"] = {d: c.change(f"flexolmo_minus_{d}", "flexolmo", d) for d in domains
                                 if f"flexolmo_minus_{d}" in docs}
    return out


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def _ci(ci: list[float], pct: bool = True) -> str:
    return f"[{ci[0]:+.1%}, {ci[1]:+.1%}]" if pct else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def findings_text(f: dict, domains: list[str]) -> list[str]:
    """Plain sentences from :func:`findings` (no claim that the numbers do not carry)."""
    avg, rel = f["average_bpb"], f["relative_to_flexolmo_average"]
    ci = f.get("intervals", {})
    lines = []
    beat = f["flexolmo_beats_public_on"]
    lines.append(f"FlexOlmo beats the public model on {len(beat)}/{len(domains)} closed domains"
                 + (f" ({', '.join(beat)})" if beat else "") + f"; average bpb {avg['flexolmo']:.4f} vs "
                 f"{avg['public']:.4f}. On public data it changes bpb by {f['flexolmo_vs_public']['public']:+.4f}.")
    if "flexolmo_replay_beats_public_on" in f:
        rb = f["flexolmo_replay_beats_public_on"]
        lines.append(f"FlexOlmo with public replay ({len(rb)}/{len(domains)} closed domains beaten"
                     + (f": {', '.join(rb)}" if rb else "") + f"): average bpb {avg['flexolmo_replay']:.4f}; on public "
                     f"data {f['flexolmo_replay_vs_public']['public']:+.4f} vs the public model.")
    for m in COMPARED[1:]:
        if m in rel:
            better = "better" if rel[m] < 0 else "worse"
            line = f"{m}: average bpb {avg[m]:.4f}, {_pct(rel[m])} vs FlexOlmo ({better} than FlexOlmo"
            d = ci.get("vs_flexolmo", {}).get(m, {}).get("average")
            if d:
                line += f"; 95% interval {_ci(d['ci'])}" + ("" if d["excludes_zero"] else ", not significant")
            lines.append(line + ").")
    for m, shares in f.get("own_expert_share", {}).items():
        lines.append(f"{m} routes each domain's tokens to that domain's own expert (among its top-k, over all "
                     "layers) for: " + ", ".join(f"{d} {v:.0%}" for d, v in shares.items()) + ".")
    reach = {d: v for d, v in f.get("expert_share_of_dense_gain", {}).items() if v is not None}
    if reach:
        lines.append("Each owner's FFN-only expert reaches this share of its dense expert's gain over the public "
                     "model on its own domain (the paper: 80-103%): " + ", ".join(f"{d} {v:.0%}" for d, v in
                                                                             reach.items())
                     + f"; mean {sum(reach.values()) / len(reach):.0%}.")
    kept = {d: v for d, v in f["share_of_owner_gain_kept"].items() if v is not None}
    if kept:
        lines.append("Share of each owner's own gain over the public model that the merged model keeps on that "
                     "owner's domain: " + ", ".join(f"{d} {v:.0%}" for d, v in kept.items()) + ".")
    kept = {d: v for d, v in f.get("share_of_owner_gain_kept_domain_routing", {}).items() if v is not None}
    if kept:
        lines.append("The same with domain routing (flexolmo_domain): " + ", ".join(f"{d} {v:.0%}" for d, v in
                                                                                   kept.items()) + ".")
    gap = f.get("routing_gap")
    if gap:
        closed = {m: v for m, v in gap["closed"].items() if v is not None}
        lines.append(f"Routing gap: FlexOlmo {gap['flexolmo_average_bpb']:.4f} vs the owner oracle (each domain "
                     f"scored by its own owner's model) {gap['oracle_average_bpb']:.4f}; share of it closed: "
                     + ", ".join(f"{m} {v:.0%}" for m, v in closed.items()) + ".")
    for d, o in f["opt_out"].items():
        g = "n/a (no gain to remove)" if o["gain_removed"] is None else f"{o['gain_removed']:.0%} of FlexOlmo's gain"
        c = ci.get("opt_out_change_own", {}).get(d)
        lines.append(f"Opting out {d}: removes {g} on {d} (bpb {o['bpb_change_own']:+.4f}"
                     + (f", 95% interval {_ci(c, pct=False)}" if c else "") + "); largest relative "
                     f"change on any other domain {o['largest_relative_change_elsewhere']:.2%}.")
    return lines


def sample_table(results: dict) -> list[str]:
    """What every model was scored on: per domain, the sample's documents, tokens and bytes; the
    public model's 95% interval as +-% of its bpb, and the documents a +-1% interval would need at
    that spread (the half-width shrinks as 1/sqrt(documents))."""
    model = "public" if "public" in results else next(iter(results))
    rows = ["| domain | documents | tokens | bytes | of the test split (documents / tokens) "
            f"| {model} bpb +-95% | documents for +-1% |", "|---|---:|---:|---:|---|---:|---:|"]
    for d, r in results[model].items():
        s = r.get("sample") if isinstance(r, dict) else None
        if not s:
            continue
        whole = "all" if s["whole_split"] else f"{s['docs']}/{s['split_docs']} / {s['tokens']}/{s['split_tokens']}"
        half = (r["bpb_ci"][1] - r["bpb_ci"][0]) / 2 / r["bpb"] if r.get("bpb_ci") else None
        spread = (f"{half:.1%} | {math.ceil(round(s['docs'] * (half / 0.01) ** 2, 6)):,}" if half is not None
                  else "- | -")
        rows.append(f"| {d} | {s['docs']} | {s['tokens']:,} | {s['bytes']:,} | {whole} | {spread} |")
    return rows


def interval_table(f: dict, domains: list[str]) -> list[str]:
    """Each compared model's relative bpb difference to FlexOlmo, per domain, with paired 95% intervals."""
    vs = f.get("intervals", {}).get("vs_flexolmo", {})
    if not vs:
        return []
    cols = ["average", *domains, "public"]
    rows = ["| model vs FlexOlmo | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m, per in vs.items():
        cells = []
        for d in cols:
            x = per.get(d)
            cells.append("–" if x is None else _ci(x["ci"]) + ("" if x["excludes_zero"] else " (ns)"))
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return rows


def _plan_flag(mode: str) -> str:
    """The ``flexmoe demo`` flag that selects plan ``mode``."""
    return {"quick": " --quick", "full": ""}.get(mode, f" --plan {mode}")


# The paper's Table 1 grouping of the results table.
GROUPS = (("Public model", ("public",)),
          ("Individual experts (each owner's own model; the paper's dense experts)", ("expert_", "dense_")),
          ("Prior merging methods (the paper's: soup, btm, btx; after them variants that are not the paper's; "
           "btx_alldata trains on closed data: breaks the data restriction)",
           ("soup", "soup_weighted", "soup_input", "btm", "btm_per_token", "btx", "soup_flexolmo_experts",
            "btm_all", "btx_alldata")),
          ("Unrestricted MoE (trained on all data jointly: breaks the data restriction)",
           ("unrestricted", "unrestricted_equal_data", "unrestricted_half_data")),
          ("FlexOlmo variants", ("flexolmo",)))


def grouped_tables(results: dict) -> list[str]:
    """Bits per byte in the paper's Table 1 groups (every model in exactly one group), best of each
    column in bold."""
    from flexmoe_jax import eval as eval_lib

    cols = eval_lib._columns(results)
    best = {c: min(r[c]["bpb"] for r in results.values() if c in r) for c in cols}
    out = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    left = dict(results)
    for title, members in GROUPS:
        names = [m for m in results if m in left and (m in members or any(
            m.startswith(p) for p in members if p.endswith("_") or p == "flexolmo"))]
        if not names:
            continue
        out.append(f"| **{title}** |" + " |" * len(cols))
        for m in names:
            left.pop(m)
            cells = [("**{:.4f}**" if results[m][c]["bpb"] == best[c] else "{:.4f}").format(results[m][c]["bpb"])
                     if c in results[m] else "–" for c in cols]
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    for m in left:
        cells = (f"{results[m][c]['bpb']:.4f}" if c in results[m] else "–" for c in cols)
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out + [""]


def _plots(w, results: dict, domains: list[str]) -> None:
    """baselines.png (relative to the public model, per domain), experts.png and opt_out.png."""
    from flexmoe_jax import eval as eval_lib

    main = [m for m in MAIN_PLOT if m in results]
    eval_lib.plot({m: results[m] for m in main}, w.results / "baselines.png", relative_to="public")
    eval_lib.plot({m: results[m] for m in ["public", *[f"expert_{d}" for d in domains],
                                           *[f"dense_{d}" for d in domains], "flexolmo"]
                   if m in results}, w.results / "experts.png", relative_to="public")
    eval_lib.plot({m: results[m] for m in ["flexolmo", *[f"flexolmo_minus_{d}" for d in domains]]
                   if m in results}, w.results / "opt_out.png")


def _setup(w, domains: list[str]) -> list[str]:
    """The title and what was run: sizes, recipes, baselines, the evaluation sample and wall time."""
    p = w.plan
    timing = w.timing()
    wall = sum(v for k, v in timing.items() if not k.startswith(("expert_", "eval_", "total_")))  # phases only
    sw_file = w.results / "soup_weights.json"
    sw = json.loads(sw_file.read_text()) if sw_file.exists() else None
    soup_w = ("weights " + ", ".join(f"{m} {x:.3f}" for m, x in zip(sw["members"], sw["weights"])) +
              f"; {sw['steps']} Adam steps; held-out public loss {sw['heldout_loss_uniform']:.4f} uniform -> "
              f"{sw['heldout_loss_fitted']:.4f} fitted" if sw else "not run")
    sample = ("every document of each held-out test split" if p.eval_tokens is None else
              f"whole documents of each held-out test split drawn with a fixed seed up to {p.eval_tokens:,} "
              "tokens per domain (a mixture's sources in proportion)")
    if p.eval_doc_tokens is not None:
        sample += (f", a document longer than {p.eval_doc_tokens:,} tokens scored on one seeded window of whole "
                   "lines that long")
    return [f"# FlexOlmo on FlexMix-mini ({p.mode} mode)", "",
            f"Made by `flexmoe demo{_plan_flag(p.mode)} --workdir {w.root}`; every number "
            "below was measured in that run.", "",
            f"- anchor: dense OLMo-2 d_model={p.d_model}, {p.n_layers} layers, vocab {p.vocab_size}, "
            f"{p.anchor_steps} steps on the public mix; batch {p.batch_size} x {p.seq_len} tokens everywhere",
            f"- experts: {', '.join(domains)}; {p.expert_steps} steps each, each in its own process with only "
            "its own data; merged top-2, router biases kept",
            f"- flexolmo_replay: the same owners, each also replaying public data ({p.public_replay:.0%} of its "
            "training rows; RunConfig.public_replay), merged the same way",
            f"- dense_<domain>: each owner's dense expert (the whole anchor, {p.expert_steps} steps on its own data, "
            "flexmoe train-dense); soup: their uniform average with the public model; soup_weighted: the same "
            f"average with mixing weights fit on public validation text only ({soup_w}); btm: the public model and "
            "the dense experts, weights softmax(-mean NLL / T) of the input (each document piece's first "
            "tokens; a multiple-choice question) over the top-2, renormalized (the paper's baselines); "
            "soup_input: the soup averaged with those weights (all members) per input, the input's own "
            "tokens scored by the uniform soup; "
            "btm_per_token: the same with the weights recomputed at every token from the piece so far; "
            "soup_flexolmo_experts / btm_all: the same from the owners' 2-expert models, BTM "
            "over every member (not the paper's)",
            "- flexolmo_domain: the same merged model with domain routing (flexmoe_jax.routing); the router knobs "
            "(no bias, top-1/3, calibration, router tuning) are in `flexmoe demo --ablations`",
            "- BTX: the public and dense experts' "
            f"FFNs as one MoE, the rest averaged, {p.btx_steps} steps on public data only (the paper's); btx_alldata: "
            f"the merged FlexOlmo, {p.btx_steps} steps on all data (breaks the data restriction); "
            f"unrestricted MoE {p.unrestricted_experts} experts top-{p.top_k} trained jointly on all data at the "
            "paper's two budgets: the owners' total training FLOPs as compiled (unrestricted), and their total "
            "tokens (unrestricted_equal_data); unrestricted_half_data: half their tokens (the paper's equal-FLOPs "
            "row trained on about half the data)",
            f"- evaluation: {sample}; the same documents for every model, for bits per byte, routing and "
            f"{p.mc_items} multiple-choice items per domain; bits per byte are the sampled documents' summed NLL "
            "over their UTF-8 bytes; intervals are 95% bootstrap intervals over documents, paired between models",
            f"- wall time: {wall:.0f} s",
            "", "## Findings", ""]


def _flops_lines(flops: dict) -> list[str]:
    """The training FLOPs table."""
    lines = ["## Training FLOPs", "",
             "Counted by XLA in each phase's compiled training step (matmuls, through loops; see "
             "flexmoe_jax/flops.py) times its steps; the 6N estimate (6 x active parameters per token, "
             "plus attention) beside it. An owner's expert step skips the frozen public slot's weight "
             "gradients, which 6N does not see.", "",
             "| model | beyond the anchor | vs FlexOlmo's experts | total | 6N: beyond the anchor | 6N: vs FlexOlmo |",
             "|---|---:|---:|---:|---:|---:|"]
    return lines + [f"| {k} | {v['beyond_anchor']:.3g} | {v['vs_flexolmo']:.2f}x | {v['total']:.3g} | "
                    f"{v['beyond_anchor_6n']:.3g} | {v['vs_flexolmo_6n']:.2f}x |" for k, v in flops.items()]


def write_report(w, results: dict, domains: list[str], flops: dict, privacy: dict | None,
                 routing: dict | None = None, docs: dict | None = None, extra: list[str] | None = None) -> Path:
    """``results/results.md`` (plus findings.json, flops.json and the plots) of demo work directory ``w``
    (a :class:`~flexmoe_jax.demo.workdir.Workdir`); ``extra``: more Markdown lines (private routing and
    the audit) after the extraction check. Returns the path of results.md."""
    from flexmoe_jax import eval as eval_lib

    f = findings(results, domains, routing, docs)
    storage.write_json(w.results / "findings.json", f, sort_keys=False)
    _plots(w, results, domains)
    lines = _setup(w, domains)
    lines += [f"- {x}" for x in findings_text(f, domains)]
    lines += ["", "## Evaluation sample", "", *sample_table(results), ""]
    table = interval_table(f, domains)
    if table:
        lines += ["## Each model's bpb relative to FlexOlmo's, paired 95% intervals", "",
                  "(bpb_model - bpb_flexolmo) / bpb_flexolmo. Positive: FlexOlmo is better. (ns): the interval "
                  "contains 0.", "", *table, ""]
    lines += ["## Results", "", "Bits per byte (lower is better), grouped as the paper's Table 1:", "",
              *grouped_tables(results), "Every model, with multiple choice:", "", eval_lib.results_table(results)]
    lines += _flops_lines(flops)
    if privacy:
        from flexmoe_jax import privacy as privacy_lib

        lines += ["", "## Training-data extraction", "", privacy_lib.markdown(privacy)]
    if extra:
        lines += ["", *extra]
    lines += ["", "Plots: baselines.png, experts.png, opt_out.png. Raw numbers: results.json (per-document scores: "
              "results.docs.json), findings.json, flops.json, timing.json" + (", routing.json" if routing else "")
              + (", privacy.json" if privacy else "") + (", private_routing.json, audit.json" if extra else "")
              + ".", ""]
    out = w.results / "results.md"
    out.write_text("\n".join(lines))
    storage.write_json(w.results / "flops.json", flops, sort_keys=False)
    return out
