"""The demo's mixed-domain evaluation: documents that splice held-out text of two or three domains.

Per-domain bits per byte rewards one model per document, which the owner oracle (each domain scored
by its own owner's model) and BTM's per-document weights deliver. On mixed documents
(:mod:`flexmoe_jax.data.mixed`) no single owner model fits the whole document, so this phase asks the
paper's question where it can be answered: does token-level routing (FlexOlmo's router, and the
private routings) beat the best single owner model *chosen per document with hindsight*? That
oracle (``owner_per_doc_oracle``: for each document the owner model with the lowest NLL on it, and
``dense_per_doc_oracle`` the same over the dense experts) is computed from the per-document scores,
so it costs no forward pass; paired 95% intervals compare every model with it on the same documents.
"""

from __future__ import annotations

import json
import math

import numpy as np

from flexmoe_jax import storage
from flexmoe_jax.demo.workdir import Workdir, log

JSON = "mixed.json"
ORACLES = {"owner_per_doc_oracle": "expert_", "dense_per_doc_oracle": "dense_"}
# The rows scored on the mixed documents besides every owner's and dense expert (report order).
ROWS = ("public", "soup", "soup_input", "btm", "btm_per_token", "btx", "unrestricted", "unrestricted_equal_data",
        "unrestricted_half_data", "flexolmo", "flexolmo_domain", "flexolmo_density")


def run(w: Workdir, models: dict[str, dict], domains: list[str], merged) -> dict:
    """Build the mixed documents in ``w.data``, score the :data:`ROWS` and every owner's models on
    them (``results/mixed.json``), and return :func:`summarize` of it (also ``results/mixed_summary.json``)."""
    from flexmoe_jax import eval as eval_lib
    from flexmoe_jax.data import mixed
    from flexmoe_jax.demo import scoring

    man = mixed.build(w.data, domains, n_docs=w.plan.mixed_docs, seed=0, log=lambda m: log(f"   {m}"))
    wide = [n for n in models if n.startswith("flexolmo_top")]  # FlexOlmo at the paper's active-parameter ratio
    rows = {n: models[n] for n in (*ROWS[:-1], *wide, *[f"{k}{d}" for k in ORACLES.values() for d in domains])
            if n in models}
    rows["flexolmo_density"] = {"model": lambda: eval_lib.density_scorer(*eval_lib.load_model(merged),
                                                                         name="flexolmo_density")}
    res = scoring.evaluate_all(w, rows, json_name=JSON, tasks=[mixed.MIXED_TASK])
    docs = json.loads(eval_lib.docs_path(w.results / JSON).read_text())
    out = summarize(res, docs, domains, mixed.MIXED_TASK)
    out["documents"] = {k: man[k] for k in ("n_docs", "parts", "part_chars", "seed", "mixtures")}
    out["documents"]["tokens"] = man["splits"]["test"]["tokens"]
    storage.write_json(w.results / "mixed_summary.json", out, sort_keys=False)
    return out


def oracle_docs(docs: dict, prefix: str, domains: list[str], task: str) -> dict | None:
    """Per-document scores of the per-document oracle over the models ``prefix + domain``: each
    document's lowest NLL among them, and which model gave it (None if any is missing)."""
    names = [f"{prefix}{d}" for d in domains]
    if not all(n in docs and task in docs[n] for n in names):
        return None
    nll = np.array([docs[n][task]["doc_nll"] for n in names], np.float64)  # [owners, docs]
    first = docs[names[0]][task]
    return {task: {"doc_nll": nll.min(0).tolist(), "doc_bytes": first["doc_bytes"], "doc_source": first["doc_source"],
                   "picked": [domains[i] for i in nll.argmin(0)]}}


def summarize(results: dict, docs: dict, domains: list[str], task: str) -> dict:
    """``{"bpb": {model: bpb on the mixed documents (oracles included)}, "vs_owner_oracle": {model:
    paired 95% interval of (bpb - oracle) / oracle}, "oracle_picks": {domain: share of documents}}``."""
    from flexmoe_jax.evaluation.compare import Comparison

    docs = {m: {task: d[task]} for m, d in docs.items() if task in d}
    bpb = {m: r[task]["bpb"] for m, r in results.items() if task in r}
    picks = {}
    for name, prefix in ORACLES.items():
        o = oracle_docs(docs, prefix, domains, task)
        if o is None:
            continue
        d = o[task]
        bpb[name] = float(np.sum(d["doc_nll"])) / math.log(2) / float(np.sum(d["doc_bytes"]))
        if name == "owner_per_doc_oracle":
            picks = {x: d["picked"].count(x) / len(d["picked"]) for x in domains}
        docs[name] = {task: {k: d[k] for k in ("doc_nll", "doc_bytes", "doc_source")}}
    out: dict = {"bpb": dict(sorted(bpb.items(), key=lambda kv: kv[1])), "oracle_picks": picks}
    if "owner_per_doc_oracle" in docs:
        cmp = Comparison(docs, closed=[])
        out["vs_owner_oracle"] = {m: cmp.difference(m, "owner_per_doc_oracle", task)
                                  for m in bpb if m != "owner_per_doc_oracle"}
    return out


def markdown(summary: dict) -> list[str]:
    """The report's section on the mixed documents."""
    d = summary.get("documents", {})
    lines = ["", "## Mixed-domain documents", "",
             f"{d.get('n_docs', '?')} documents ({d.get('tokens', 0):,} tokens), each splicing runs of whole lines "
             f"(about {d.get('part_chars', '?')} characters each) from held-out test documents of "
             f"{' or '.join(str(k) for k in d.get('parts', []))} closed domains (seed {d.get('seed', '?')}; "
             "flexmoe_jax.data.mixed). `owner_per_doc_oracle`: each document scored by the one owner model "
             "that fits it best, chosen with hindsight; `dense_per_doc_oracle` the same over the dense experts. "
             "Difference: (bpb - oracle) / oracle, paired 95% bootstrap interval over documents.", "",
             "| model | bpb | vs owner_per_doc_oracle |", "|---|---:|---|"]
    vs = summary.get("vs_owner_oracle", {})
    oracle = summary.get("bpb", {}).get("owner_per_doc_oracle")
    for m, b in summary.get("bpb", {}).items():
        ci = vs.get(m)
        cell = "-" if ci is None or not oracle else (f"{(b - oracle) / oracle:+.1%} [{ci['ci'][0]:+.1%}, "
                                                     f"{ci['ci'][1]:+.1%}]" + ("" if ci["excludes_zero"] else " (ns)"))
        lines.append(f"| {m} | {b:.4f} | {cell} |")
    picks = summary.get("oracle_picks")
    if picks:
        lines += ["", "The owner oracle's picks: " + ", ".join(f"{k} {v:.0%}" for k, v in picks.items()) + "."]
    return lines
