"""Does a stronger public model close the gap between FlexOlmo's experts and dense experts?

FlexOlmo's expert trains one FFN slot per layer (and its router row) against the anchor's frozen
attention, embeddings and head; the paper's dense expert continues the whole anchor. In the demo the
dense experts are far better owner models, which is why the paper-form BTM (built from them) beats
FlexOlmo even with perfect routing (README). This measures how that gap moves with the anchor's
pretraining: for each anchor length it pretrains a new anchor (same data, sizes and schedule),
trains every owner's FlexOlmo expert and dense expert the demo's way (each in its own process on its
own data), and scores each owner model on its own domain and on public text (the public model on
every domain).

Measures per anchor length (:func:`measures`): the public model's bpb; per domain the owner's gain
over the public model with its FlexOlmo expert and with its dense expert; the closed-domain
averages of the *expert oracle* (each domain scored by its owner's 2-expert model: FlexOlmo routed
perfectly) and the *dense oracle* (by its dense expert: BTM routed perfectly), and the share of the
dense oracle's gain that the expert oracle reaches. ``WORKDIR/results/anchor_strength.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence

from flexmoe_jax import storage
from flexmoe_jax.demo import scoring
from flexmoe_jax.demo.datasets import owner_data_dir, share_public_rows
from flexmoe_jax.demo.experts import train_experts
from flexmoe_jax.demo.plan import recorded
from flexmoe_jax.demo.training import train_anchor
from flexmoe_jax.demo.workdir import Phase, Workdir, compile_cache, log
from flexmoe_jax.errors import UserError


def measures(results: dict, domains: Sequence[str]) -> dict:
    """The gap between FlexOlmo's experts and dense experts in one set of ``results`` (``public``,
    ``expert_<d>`` and ``dense_<d>`` scored on domain d and on public text)."""
    def bpb(m, d):
        return results[m][d]["bpb"]

    per = {}
    for d in domains:
        pub, exp, den = bpb("public", d), bpb(f"expert_{d}", d), bpb(f"dense_{d}", d)
        per[d] = {"public": pub, "expert": exp, "dense": den, "expert_gain": pub - exp, "dense_gain": pub - den,
                  "expert_share_of_dense_gain": (pub - exp) / (pub - den) if pub > den else None}

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs)

    public_avg = mean(p["public"] for p in per.values())
    expert_oracle, dense_oracle = mean(p["expert"] for p in per.values()), mean(p["dense"] for p in per.values())
    return {"public_model_on_public": bpb("public", "public"), "public_model_average": public_avg,
            "expert_oracle": expert_oracle, "dense_oracle": dense_oracle,
            "expert_share_of_dense_gain": ((public_avg - expert_oracle) / (public_avg - dense_oracle)
                                           if public_avg > dense_oracle else None),
            "experts_on_public": mean(bpb(f"expert_{d}", "public") for d in domains),
            "dense_on_public": mean(bpb(f"dense_{d}", "public") for d in domains),
            "per_domain": per}


def _workdir(base: Workdir, steps: int) -> Workdir:
    """The work directory of one anchor length, beside the demo's, reading the demo's data."""
    w = Workdir(base.root / f"anchor_steps_{steps}", dataclasses.replace(base.plan, anchor_steps=steps))
    w.claim()
    if not w.data.exists():
        os.symlink(base.data, w.data, target_is_directory=True)  # the same data and packed rows
    return w


def _score(w: Workdir, anchor: Path, trained: dict, domains: Sequence[str]) -> dict:
    """The public model on every domain, each owner's models on their own domain and public text."""
    from flexmoe_jax import eval as eval_lib

    p, out = w.plan, w.results / "results.json"
    models = [("public", anchor, None)]
    for d in domains:
        models += [(f"expert_{d}", trained[d, ""], [d, "public"]), (f"dense_{d}", trained[d, "dense"], [d, "public"])]
    for name, path, tasks in models:
        if name not in scoring.results(w):
            eval_lib.main_eval({name: path}, w.data, tasks=tasks, batch_size=p.eval_batch_size,
                               mc_items_per_domain=0, max_tokens=p.eval_tokens, max_doc_tokens=p.eval_doc_tokens,
                               json_out=out, routing="top_k", log=None, progress=True)
    return scoring.results(w)


def run(workdir, steps: Sequence[int], quick: bool = False, parallel: int = 2) -> dict:
    """For each anchor length in ``steps`` (beyond the demo's own): the anchor, the owners' experts
    and dense experts, their scores; with the demo's run as the first row. Returns the summary."""
    from flexmoe_jax import data

    base = Workdir(workdir, recorded(workdir, quick))
    done = scoring.results(base)
    domains = [d for d in data.CLOSED_DOMAINS if f"expert_{d}" in done and f"dense_{d}" in done]
    if "public" not in done or not domains:
        raise UserError(f"{base.root} holds no finished demo (results/results.json lacks the public model or the "
                        "owners' experts and dense experts): run `flexmoe demo` there first")
    if any(n < 1 for n in steps):
        raise UserError(f"anchor lengths must be positive step counts, got {list(steps)}")
    compile_cache(base)
    rows = {base.plan.anchor_steps: measures(done, domains)}
    for n in sorted(set(steps) - {base.plan.anchor_steps}):
        w = _workdir(base, n)
        with Phase(w, f"anchor_strength_{n}"):
            for d in domains:
                owner_data_dir(w.data, d, w.owner_data(d))
            anchor = train_anchor(w)
            share_public_rows(w, domains)
            trained = train_experts(w, anchor, [(d, v) for v in ("", "dense") for d in domains], parallel)
            rows[n] = measures(_score(w, anchor, trained, domains), domains)
    summary = {"plan": {"mode": base.plan.mode, "expert_steps": base.plan.expert_steps,
                        "tokens_per_step": base.plan.batch_size * base.plan.seq_len},
               "domains": domains, "rows": {str(k): v for k, v in sorted(rows.items())}}
    storage.write_json(base.results / "anchor_strength.json", summary, sort_keys=False)
    (base.results / "anchor_strength.md").write_text(table(summary) + "\n")
    return summary


def table(summary: dict) -> str:
    """Markdown: one row per anchor length."""
    doms = summary["domains"]
    lines = ["| anchor steps | public model: public / closed avg | expert oracle | dense oracle | expert share of "
             "the dense gain | per domain (" + ", ".join(doms) + ") | owners' models on public: expert / dense |",
             "|---:|---|---:|---:|---:|---|---|"]
    for n, r in summary["rows"].items():
        share = r["expert_share_of_dense_gain"]
        per = ", ".join("-" if r["per_domain"][d]["expert_share_of_dense_gain"] is None
                        else f"{r['per_domain'][d]['expert_share_of_dense_gain']:.0%}" for d in doms)
        lines.append(f"| {n} | {r['public_model_on_public']:.4f} / {r['public_model_average']:.4f} | "
                     f"{r['expert_oracle']:.4f} | {r['dense_oracle']:.4f} | "
                     f"{'-' if share is None else f'{share:.0%}'} | {per} | "
                     f"{r['experts_on_public']:.4f} / {r['dense_on_public']:.4f} |")
    return "\n".join(lines)


def main(workdir, steps: Sequence[int], quick: bool = False, parallel: int = 2) -> None:
    t0 = time.perf_counter()
    summary = run(workdir, steps, quick=quick, parallel=parallel)
    log(table(summary))
    log(f"anchor strength: {time.perf_counter() - t0:.0f} s; results in {Path(workdir) / 'results'}/anchor_strength.*")
