"""Every model the demo scores, by name, and how: the trained checkpoints and the ensembles built from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flexmoe_jax.demo.baselines import soup_weights
from flexmoe_jax.demo.workdir import Workdir
from flexmoe_jax.evaluation.input_soup import InputSoupScorer

# The paper-form BTM's temperature on the mean NLL of the context (fixed, not tuned on results).
BTM_TEMPERATURE = 0.1
# ... and how many tokens of each input its weights come from (a prompt-sized prefix; fixed, not tuned).
BTM_CONTEXT_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class Trained:
    """What the demo's training phases made: model directories (owners' by domain) and the
    unrestricted MoEs' step counts."""

    anchor: Path
    experts: dict[str, Path]
    experts_replay: dict[str, Path]
    dense: dict[str, Path]
    merged: Path
    merged_replay: Path
    btx: Path
    btx_alldata: Path
    unrestricted: Path
    unrestricted_data: Path
    unrestricted_steps: int
    unrestricted_data_steps: int
    unrestricted_half_data: Path | None = None  # the paper's "equal FLOPs" budget: half the owners' tokens


def _baselines(w: Workdir, t: Trained, domains: list[str], member) -> dict[str, dict]:
    """The owners' own models, soups, BTM, BTX and the unrestricted MoEs (scorers built lazily)."""
    from flexmoe_jax import eval as eval_lib

    anchor, experts, dense = t.anchor, t.experts, t.dense
    models: dict[str, dict] = {"public": {"model": lambda: member("public", anchor)}}
    models.update({f"expert_{d}": {"model": lambda d=d: member(f"expert_{d}", experts[d])} for d in domains})
    models.update({f"dense_{d}": {"model": lambda d=d: member(f"dense_{d}", dense[d])} for d in domains})
    # The paper's baselines, from the dense experts: a uniform soup (public model included) and BTM
    # over {public, dense experts} weighted by softmax(-mean NLL / T) of the input (its first tokens; a
    # multiple-choice question), top-2; btm_per_token recomputes the weights at every token from the
    # whole segment so far (on long in-domain documents that is perfect routing over the members).
    models["soup"] = {"model": lambda: eval_lib.soup_scorer(anchor, list(dense.values()))}
    # The weighted soup: mixing weights fit on public validation text only (soup_weights.py).
    models["soup_weighted"] = {"model": lambda: eval_lib.soup_scorer(anchor, list(dense.values()),
                                                                     weights=soup_weights(w, anchor, dense),
                                                                     name="soup_weighted")}

    def btm(name: str, context: str):
        return {"model": lambda: eval_lib.btm_scorer(member("public", anchor),
                                                     [member(f"dense_{d}", dense[d]) for d in domains],
                                                     top_k=w.plan.top_k, temperature=BTM_TEMPERATURE, mean=True,
                                                     context=context, context_tokens=BTM_CONTEXT_TOKENS, name=name)}

    models["btm"] = btm("btm", "input")
    models["btm_per_token"] = btm("btm_per_token", "segment")
    # The weighted soup in the paper's form: weights per input (each piece's prefix), from the same
    # members' likelihoods BTM weighs by.
    models["soup_input"] = {"model": lambda: InputSoupScorer(
        [eval_lib.load_model(anchor)] + [eval_lib.load_model(dense[d]) for d in domains],
        [member("public", anchor)] + [member(f"dense_{d}", dense[d]) for d in domains],
        temperature=BTM_TEMPERATURE, context_tokens=BTM_CONTEXT_TOKENS, name="soup_input")}
    # Informative variants built from the owners' 2-expert FlexOlmo models instead (not the paper's).
    models["soup_flexolmo_experts"] = {"model": lambda: eval_lib.soup_scorer(anchor, list(experts.values()))}
    models["btm_all"] = {"model": lambda: eval_lib.btm_scorer(member("public", anchor),
                                                              [member(f"expert_{d}", experts[d]) for d in domains])}
    models["btx"] = {"model": t.btx}
    models["btx_alldata"] = {"model": t.btx_alldata}
    models["unrestricted"] = {"model": t.unrestricted}
    models["unrestricted_equal_data"] = {"model": t.unrestricted_data}
    if t.unrestricted_half_data is not None:
        models["unrestricted_half_data"] = {"model": t.unrestricted_half_data}
    return models


def paper_ratio_row(t: Trained, top_k: int) -> tuple[str, int] | None:
    """``(row name, k)`` of FlexOlmo at the paper's active-parameter ratio to BTM top-``top_k``
    (:func:`flexmoe_jax.demo.inference_cost.paper_top_k`); None when that is the merged model's own top-k."""
    from flexmoe_jax.demo.inference_cost import config_of, paper_top_k

    k = paper_top_k(config_of(t.merged), config_of(t.anchor), top_k)
    return None if k == top_k else (f"flexolmo_top{k}", k)


def _flexolmo_variants(t: Trained, domains: list[str], domain_stats: dict, top_k: int) -> dict[str, dict]:
    """The merged model as merged (the reference's top-k routing), at the paper's active-parameter
    ratio to BTM top-k (:func:`paper_ratio_row`), with public replay, domain-routed (``domain_stats``:
    :func:`flexmoe_jax.demo.scoring.routing_stats`) and each owner opted out. The router knobs (no
    bias, top-1/3, calibration, router tuning) are ablations (:mod:`.ablations`)."""
    merged = t.merged
    models = {"flexolmo": {"model": merged}}
    wide = paper_ratio_row(t, top_k)
    if wide:
        models[wide[0]] = {"model": merged, "top_k": wide[1]}
    models.update({"flexolmo_replay": {"model": t.merged_replay},
                   "flexolmo_domain": {"model": merged, "routing": "domain", "routing_stats": domain_stats}})
    models.update({f"flexolmo_minus_{d}": {"model": merged, "exclude": [d]} for d in domains})
    return models


def scored_models(w: Workdir, t: Trained, domains: list[str], domain_stats: dict) -> dict[str, dict]:
    """``{name: spec}`` for :func:`flexmoe_jax.demo.scoring.evaluate_all`, in report order; the owner
    models and the public one share one cached scorer each, so BTM reuses their log-probs."""
    from flexmoe_jax import eval as eval_lib

    shared: dict[str, eval_lib.CachedScorer] = {}

    def member(name: str, path: Path):
        if name not in shared:
            shared[name] = eval_lib.CachedScorer(eval_lib.ModelScorer.from_checkpoint(path, name=name))
        return shared[name]

    return {**_baselines(w, t, domains, member), **_flexolmo_variants(t, domains, domain_stats, w.plan.top_k)}
