"""Reporting: the markdown table, the plot, the JSON files, and :func:`main_eval` (``flexmoe eval``)."""


import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flexmoe_jax import selection, storage
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.evaluation.models import default_name
from flexmoe_jax.evaluation.multiple_choice import DEFAULT_MC_CHOICES, DEFAULT_MC_ITEMS
from flexmoe_jax.evaluation.perplexity import PER_DOC, evaluate
from flexmoe_jax.evaluation.scorers import ModelScorer, Scorer
from flexmoe_jax.evaluation.tasks import AVERAGE, DEFAULT_BATCH_SIZE, PUBLIC, resolve_tasks


def _columns(results: Mapping[str, Mapping[str, dict]]) -> list[str]:
    from flexmoe_jax.data import CLOSED_DOMAINS

    seen = []
    for per in results.values():
        for d in per:
            if d not in seen:
                seen.append(d)
    order = [d for d in CLOSED_DOMAINS if d in seen] + [d for d in seen if d not in CLOSED_DOMAINS
                                                         and d not in (PUBLIC, AVERAGE)]
    return order + [d for d in (PUBLIC, AVERAGE) if d in seen]


def results_table(results: Mapping[str, Mapping[str, dict]]) -> str:
    """Markdown: one table of bits per byte and one of MC accuracy; rows models, columns domains +
    average; the best value of each column in bold."""
    cols = _columns(results)
    out = []
    for key, title, better in (("bpb", "bits per byte (lower is better)", min),
                               ("mc_acc", "multiple-choice accuracy (higher is better)", max),
                               ("mc_acc_norm", "multiple-choice accuracy, length-normalized (higher is better)", max)):
        vals = {m: {d: per.get(d, {}).get(key) for d in cols} for m, per in results.items()}
        if not any(v is not None for row in vals.values() for v in row.values()):
            continue
        best = {d: better([row[d] for row in vals.values() if row[d] is not None], default=None) for d in cols}
        fmt = "{:.4f}" if key == "bpb" else "{:.3f}"
        out.append(f"### {title}\n")
        out.append("| model | " + " | ".join(cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        for m, row in vals.items():
            cells = []
            for d in cols:
                v = row[d]
                s = "–" if v is None else fmt.format(v)
                cells.append(f"**{s}**" if v is not None and v == best[d] and len(vals) > 1 else s)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(results: Mapping[str, Mapping[str, dict]], path: str | os.PathLike, relative_to: str | None = None) -> Path:
    """A PNG of per-domain bits per byte per model (grouped bars), plus MC accuracy if measured (with
    binomial standard-error bars: a handful of items per domain is noise, and the bars say so).
    ``relative_to``: plot each model's relative bpb change against that model instead (a 5% difference
    is then visible); that model itself is left out."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not results:
        raise UserError("no results to plot")
    cols = _columns(results)
    base = results.get(relative_to) if relative_to is not None else None
    if relative_to is not None and base is None:
        raise UserError(f"cannot plot relative to {relative_to!r}: it is not among the results {list(results)}")
    models = [m for m in results if m != relative_to]
    panels = [("bpb", "bits per byte (lower is better)" if base is None else
               f"bits per byte, relative change vs {relative_to} (lower is better)")]
    if any(per.get(d, {}).get("mc_acc") is not None for per in results.values() for d in cols):
        panels.append(("mc_acc", "multiple-choice accuracy"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.2 * len(cols) * max(1, len(models)) ** 0.5 + 2),
                                                      3.6 * len(panels)), squeeze=False)
    width = 0.8 / len(models)
    x = np.arange(len(cols))
    colors = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")  # one distinct color per model
    for ax, (key, title) in zip(axes[:, 0], panels):
        for i, m in enumerate(models):
            vals = [results[m].get(d, {}).get(key) for d in cols]
            if key == "bpb" and base is not None:
                vals = [None if v is None or d not in base else v / base[d]["bpb"] - 1 for v, d in zip(vals, cols)]
            err = None
            if key == "mc_acc":  # binomial standard error over the domain's items
                n = [results[m].get(d, {}).get("mc_items") or 0 for d in cols]
                err = [np.sqrt(v * (1 - v) / k) if v is not None and k else np.nan for v, k in zip(vals, n)]
            ax.bar(x + (i - (len(models) - 1) / 2) * width, [np.nan if v is None else v for v in vals], width,
                   label=m, color=colors(i % colors.N), yerr=err, capsize=2 if err else 0)
        if key == "bpb" and base is not None:
            ax.axhline(0, color="k", lw=0.8)
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_xticks(x, cols)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    # Outside the axes, so no bar is hidden behind it.
    axes[0, 0].legend(fontsize="small", ncol=max(1, len(models) // 12 + 1), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = storage.resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(path):  # one object write: published whole
        with path.open("wb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")  # keep the legend outside the axes in the image
    plt.close(fig)
    os.replace(tmp, path)
    return path


def docs_path(json_out: str | os.PathLike) -> Path:
    """Where :func:`main_eval` keeps the per-document scores beside ``json_out`` (``x.json`` -> ``x.docs.json``)."""
    p = storage.resolve(json_out)
    return p.with_name(p.stem + ".docs.json")


def strip_per_doc(results: Mapping[str, dict]) -> dict:
    """A model's results without the per-document lists (:data:`PER_DOC`)."""
    return {d: {k: v for k, v in r.items() if k not in PER_DOC} for d, r in results.items()}


DENSITY = "density"  # routing by the experts' own likelihoods (evaluation.ensembles.density_scorer)


def main_eval(models: Any, data_dir, *, names: Sequence[str] | None = None,
              include: Sequence[str | int] | None = None, exclude: Sequence[str | int] | None = None,
              top_k: int | None = None, tasks: Sequence[str] | None = None, split: str = "test",
              seq_len: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
              mc_items_per_domain: int = DEFAULT_MC_ITEMS, mc_choices: int = DEFAULT_MC_CHOICES,
              json_out: str | os.PathLike | None = None, table_out: str | os.PathLike | None = None,
              plot_out: str | os.PathLike | None = None, update: bool = True, progress: bool = True,
              log: Callable[[str], None] | None = print, max_tokens: int | None = None,
              sample_seed: int = 0, max_doc_tokens: int | None = None, routing: str | None = None,
              routing_stats: Mapping | None = None, score: Mapping | None = None,
              routing_groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict]:
    """What ``flexmoe eval`` runs: evaluate models, write JSON / markdown / PNG, print the table.

    ``models``: one checkpoint path (plain or merged checkpoint, or a run directory), a list of
    them, or a ``{name: path | Scorer | (config, params)}`` map (baselines from
    :func:`soup_scorer` / :func:`btm_scorer` go in here). ``include`` / ``exclude`` / ``top_k``
    apply to every path (opt-in/opt-out at load, ``loading.load``); ``names`` name the paths
    (default :func:`default_name`, e.g. ``merged_minus_code``). With ``update`` an existing
    ``json_out`` keeps its other models' results (the demo adds models one call at a time);
    the table and plot then show every model in the file. ``max_tokens`` / ``sample_seed`` / ``max_doc_tokens``: each
    domain's evaluation sample (:func:`perplexity`). ``routing`` / ``routing_stats`` / ``score``: the
    routing mode and router scores of every model loaded here (:class:`ModelScorer`); ``routing_groups``: see
    :func:`evaluate`. The per-document scores stay out
    of ``json_out``;
    they go to :func:`docs_path` of it (what paired bootstrap comparisons read). Returns
    ``{name: results}`` of this call, per-document scores included.
    """
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if isinstance(models, Mapping):
        if names is not None:
            raise UserError("names= is for a list of checkpoint paths; a map already names its models")
        entries = list(models.items())
    else:
        models = list(models)
        if names is not None and len(names) != len(models):
            raise UserError(f"{len(names)} names for {len(models)} checkpoints")
        entries = [(names[i] if names else default_name(p, include, exclude), p) for i, p in enumerate(models)]
    if len({n for n, _ in entries}) != len(entries):
        raise UserError(f"two models share a name: {[n for n, _ in entries]}; give names=")
    if not entries:
        raise UserError("no models to evaluate")
    prior: dict = {}
    if json_out is not None and update and storage.resolve(json_out).exists():
        try:
            prior = json.loads(storage.resolve(json_out).read_text())
        except ValueError as e:
            raise UserError(f"{json_out} is not a results JSON file ({e}); remove it or pass another --json") from None
        if not isinstance(prior, dict):
            raise UserError(f"{json_out} does not hold a {{model: results}} map; remove it or pass another --json")
    task_names = resolve_tasks(data_dir, tasks)  # fail on a bad task before loading any model
    new: dict[str, dict] = {}
    for name, m in entries:
        if isinstance(m, Scorer):
            scorer = m
        elif routing == DENSITY:
            from flexmoe_jax.evaluation.ensembles import density_scorer
            from flexmoe_jax.evaluation.models import load_model

            if routing_stats is not None or score:
                raise UserError("density routing uses no routing stats or router scores: drop them")
            cp = (selection.select(*m, include, exclude, top_k) if isinstance(m, tuple)
                  else load_model(m, include=include, exclude=exclude, top_k=top_k))
            scorer = density_scorer(*cp, name=name)
        elif isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], ModelConfig):
            scorer = ModelScorer(*selection.select(*m, include, exclude, top_k), name=name, routing=routing,
                                 routing_stats=routing_stats, score=score)
        else:
            scorer = ModelScorer.from_checkpoint(m, include=include, exclude=exclude, top_k=top_k, name=name,
                                                 routing=routing, routing_stats=routing_stats, score=score)
        new[name] = evaluate(scorer, data_dir, task_names, split, seq_len, batch_size, mc_items_per_domain,
                             mc_choices, progress=progress, max_tokens=max_tokens, sample_seed=sample_seed,
                             max_doc_tokens=max_doc_tokens, routing_groups=routing_groups)
    everything = {**prior, **{n: strip_per_doc(r) for n, r in new.items()}}
    if json_out is not None:
        docs_file = docs_path(json_out)
        docs = json.loads(docs_file.read_text()) if update and docs_file.exists() else {}
        for n, r in new.items():
            docs[n] = {d: {k: v[k] for k in PER_DOC} for d, v in r.items() if "doc_nll" in v}
        storage.write_json(docs_file, docs, sort_keys=False)
        storage.write_json(json_out, everything, sort_keys=False)
    table = results_table(everything)
    if table_out is not None:
        storage.resolve(table_out).parent.mkdir(parents=True, exist_ok=True)
        storage.write_text(storage.resolve(table_out), table + "\n")
    if plot_out is not None:
        plot(everything, plot_out)
    if log is not None:
        log(table)
    return new
