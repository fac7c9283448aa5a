"""Scoring the demo's models: bits per byte and multiple choice, routing, and the privacy check."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from flexmoe_jax import storage
from flexmoe_jax.demo.experts import routing_seed
from flexmoe_jax.demo.merging import public_routing_stats
from flexmoe_jax.demo.workdir import Workdir, log


def results(w: Workdir, name: str = "results.json") -> dict:
    """``results/name`` of ``w`` as a dict ({} before any model was scored)."""
    f = w.results / name
    return json.loads(f.read_text()) if f.exists() else {}


def evaluate_all(w: Workdir, models: dict[str, dict], json_name: str = "results.json",
                 groups: Mapping[str, Sequence[str]] | None = None, tasks: Sequence[str] | None = None) -> dict:
    """Evaluate each ``{name: {"model": path|scorer-factory, "exclude"/"top_k"/"routing"/"routing_stats": ...}}``
    not yet in ``results/json_name`` on ``tasks`` (default every domain and the public mix); returns every
    result there. An MoE's results carry its routing (``groups``: see :func:`flexmoe_jax.eval.evaluate`),
    counted in the same forward passes."""
    from flexmoe_jax import eval as eval_lib

    p = w.plan
    done = results(w, json_name)
    for name, spec in models.items():
        if name in done:
            continue
        t0 = time.perf_counter()
        m = spec["model"]
        m = m() if callable(m) else m
        eval_lib.main_eval({name: m}, w.data, exclude=spec.get("exclude"), top_k=spec.get("top_k"),
                           routing=spec.get("routing", "top_k"), routing_stats=spec.get("routing_stats"),
                           score=spec.get("score"), batch_size=p.eval_batch_size, mc_items_per_domain=p.mc_items,
                           max_tokens=p.eval_tokens, max_doc_tokens=p.eval_doc_tokens, routing_groups=groups,
                           json_out=w.results / json_name, log=None, progress=True, tasks=tasks)
        w.record(f"eval_{name}" + ("" if json_name == "results.json" else f"_{Path(json_name).stem}"),
                 time.perf_counter() - t0)
        r = results(w, json_name)[name]
        shown = ", ".join(f"{k} bpb {v['bpb']:.4f}" for k, v in r.items() if isinstance(v, dict) and "bpb" in v
                          and (k in ("average", "public") or tasks and k in tasks))
        log(f"   {name}: {shown} ({time.perf_counter() - t0:.0f} s)")
    return results(w, json_name)


def routing_stats(w: Workdir, experts: dict[str, Path]) -> dict:
    """Each expert's token counts for domain routing (:mod:`flexmoe_jax.routing`): the owners' as their
    own ``train-expert`` processes wrote them (an owner run before they existed counts them now, in a
    ``flexmoe routing-stats`` process given only its own data), the public one from the public data."""
    from flexmoe_jax import routing

    out = {}
    for d, run in experts.items():
        f = Path(run) / routing.STATS_FILE
        if not f.exists():
            subprocess.run([sys.executable, "-m", "flexmoe_jax.cli", "routing-stats", "--data_dir",
                            str(w.owner_data(d)), "--task", f"flexmix_mini.{d}", "--name", d, "--out", str(f),
                            "--routing_seed", str(routing_seed(d))],
                           check=True, capture_output=True, text=True)
        out[d] = routing.Stats.load(f)
    out[routing.PUBLIC] = routing.Stats.load(public_routing_stats(w))
    return out


def routing_all(w: Workdir, models: dict[str, dict], json_name: str = "routing.json",
                groups: Mapping[str, Sequence[str]] | None = None, scored: Mapping[str, dict] | None = None) -> dict:
    """Where each MoE sends each domain's tokens, as ``results/json_name``: from its evaluation
    results (``scored``, :func:`evaluate_all`), which count it in the scoring passes; a model scored
    before evaluations did (an older work directory) is counted by :func:`flexmoe_jax.eval.routing`."""
    from flexmoe_jax import eval as eval_lib

    f = w.results / json_name
    done = json.loads(f.read_text()) if f.exists() else {}
    for name, spec in models.items():
        per = (scored or {}).get(name, {})
        if name in done:
            continue
        if per and all("routing" in r for d, r in per.items() if d != eval_lib.AVERAGE):
            done[name] = {d: r["routing"] for d, r in per.items() if d != eval_lib.AVERAGE}
            continue
        config, params = eval_lib.load_model(spec["model"], exclude=spec.get("exclude"), top_k=spec.get("top_k"))
        stats = spec.get("routing_stats")
        if spec.get("routing") == "domain" and stats is None:  # the ones the merged model carries
            stats = eval_lib.checkpoint_routing_stats(spec["model"], config.names)
        done[name] = eval_lib.routing(config, params, w.data, seq_len=w.plan.seq_len,
                                      batch_size=w.plan.eval_batch_size, max_tokens=w.plan.eval_tokens,
                                      max_doc_tokens=w.plan.eval_doc_tokens,
                                      mode=spec.get("routing"), routing_stats=stats,
                                      groups=groups, score=spec.get("score"))
        storage.write_json(f, done, sort_keys=False)  # (each slow count kept as soon as it is made)
    storage.write_json(f, done, sort_keys=False)
    return done


def privacy_check(w: Workdir, experts: dict[str, Path], merged: Path) -> dict:
    """The paper's extraction check: each owner's expert on pieces of documents its run was fed
    (replayed from the run's saved data position, :mod:`flexmoe_jax.trained_docs`), the merged model
    on every domain's; pieces of held-out documents of the same domains are the control.
    Kept in ``results/privacy.json``."""
    from flexmoe_jax import privacy, trained_docs

    f = w.results / "privacy.json"
    if f.exists():
        done = json.loads(f.read_text())
        if all(r.get("selection", {}).get("unit") == "piece"  # made before runs' fed pieces were read
               for per in done.values() for dom in per.values() for r in dom.values()):
            return done
    trained = {d: trained_docs.trained_documents(run, w.data, d) for d, run in experts.items()}
    models = {f"expert_{d}": {"model": path, "domains": [d]} for d, path in experts.items()}
    models["flexolmo"] = {"model": merged, "domains": list(experts)}
    out = {}
    for name, spec in models.items():
        # One generation batch per (domain, split): every sample of every checked document at once.
        out.update(privacy.run({name: spec["model"]}, w.data, spec["domains"], num_docs=w.plan.privacy_docs,
                               trained_from={d: trained[d] for d in spec["domains"]},
                               batch_size=w.plan.privacy_docs * privacy.DEFAULT_SAMPLES, progress=True))
    storage.write_json(f, out, sort_keys=False)
    return out
