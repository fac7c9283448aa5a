"""Per-domain perplexity and bits per byte over the evaluation sample, with bootstrap intervals.

  documents drawn with a fixed seed across the split, or the whole split), each scored with the
  context of its own document piece. ``nll`` is the mean NLL per token (nats), ``ppl = exp(nll)``,
  ``bpb = summed NLL / ln 2 / UTF-8 bytes of the sampled documents`` (tokenizer-independent), with a
  95% bootstrap interval over documents (:mod:`flexmoe_jax.evaluation.bootstrap`).


Results are plain JSON: ``{domain: {"bpb", "ppl", "nll", "tokens", "bytes", "docs", "mc_acc",
"mc_acc_norm", "mc_items", "mc_choices", "seq_len"}}`` plus ``"average"`` over the closed domains
(macro means of bpb, nll, mc accuracies; ppl = exp(mean nll); tokens summed).
"""


import math
from typing import Callable, Mapping, Sequence

import numpy as np

from flexmoe_jax.data import eval_sample as sample_lib
from flexmoe_jax.errors import UserError
from flexmoe_jax.evaluation import bootstrap
from flexmoe_jax.evaluation.expert_use import ExpertUse, counts_routing
from flexmoe_jax.evaluation.multiple_choice import DEFAULT_MC_CHOICES, DEFAULT_MC_ITEMS, mc_items, score_mc
from flexmoe_jax.evaluation.scorers import Scorer
from flexmoe_jax.evaluation.tasks import AVERAGE, DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, resolve_tasks, short_name

REPLICATES = "_bpb_replicates"
PER_DOC = ("doc_nll", "doc_bytes", "doc_source")  # per-document keys, kept out of results.json


def perplexity(scorer: Scorer, task: str, data_dir, split: str = "test", seq_len: int = DEFAULT_SEQ_LEN,
               batch_size: int = DEFAULT_BATCH_SIZE, progress: Callable[[], None] | None = None,
               max_tokens: int | None = None, sample_seed: int = 0, max_doc_tokens: int | None = None,
               use: ExpertUse | None = None) -> dict:
    """Bits per byte, perplexity and NLL of a task's evaluation sample (:mod:`flexmoe_jax.data.eval_sample`:
    whole documents drawn with ``sample_seed`` up to ``max_tokens`` tokens, each cut to a window of
    about ``max_doc_tokens``; default every token of the whole split).

    Returns ``{"nll", "ppl", "bpb", "bpb_ci", "tokens", "bytes", "docs", "sample", "doc_nll", "doc_bytes",
    "doc_source"}`` plus the bootstrap replicates under :data:`REPLICATES` (a numpy array, dropped by
    :func:`evaluate`): ``bpb_ci`` the 95% bootstrap interval over documents, ``sample`` its size and what
    it was drawn from, ``doc_*`` per sampled document (summed NLL in nats, bytes, source number), what
    paired comparisons between models need (:class:`flexmoe_jax.evaluation.bootstrap.Paired`).
    ``use``: count the MoE ``scorer``'s routing of the sample into it, from the same forward passes.
    """
    s = sample_lib.draw(data_dir, task, split, seq_len, max_tokens, sample_seed, max_doc_tokens)
    high = int(s.rows["decoder_target_tokens"].max(initial=0))
    if high >= scorer.vocab_size:
        raise UserError(f"{task} has token id {high} but {scorer.name}'s vocabulary has {scorer.vocab_size} "
                        "entries: evaluate with the data directory (tokenizer) the model was trained with")
    doc_nll = sample_lib.score_docs(scorer.token_logprobs if use is None else use.scoring(scorer), s, batch_size,
                                    progress)
    tokens, n_bytes = int(s.doc_tokens.sum()), int(s.doc_bytes.sum())
    if tokens == 0:
        raise UserError(f"{task} split {split!r} has no tokens")
    nll = float(doc_nll.sum()) / tokens
    reps = bootstrap.bpb_replicates(doc_nll, s.doc_bytes, bootstrap.indices(s.doc_source, seed=short_name(task)))
    return {"nll": nll, "ppl": math.exp(nll), "bpb": float(doc_nll.sum()) / math.log(2) / n_bytes,
            "bpb_ci": bootstrap.interval(reps), "tokens": tokens, "bytes": n_bytes, "docs": s.num_docs,
            "sample": s.size(), "doc_nll": [float(x) for x in doc_nll],
            "doc_bytes": [int(x) for x in s.doc_bytes], "doc_source": [int(x) for x in s.doc_source],
            REPLICATES: reps}


def evaluate(scorer: Scorer, data_dir, tasks: Sequence[str] | None = None, split: str = "test",
             seq_len: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             mc_items_per_domain: int = DEFAULT_MC_ITEMS, mc_choices: int = DEFAULT_MC_CHOICES,
             seed: int = 0, progress: bool = True, max_tokens: int | None = None, sample_seed: int = 0,
             max_doc_tokens: int | None = None, routing_groups: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Per-domain perplexity / bits per byte and multiple-choice accuracy of one scorer.

    ``tasks``: domain names (``humor``, ``public``) or task names; default every closed domain
    built in ``data_dir`` plus ``public``. ``seq_len`` default: :data:`DEFAULT_SEQ_LEN` capped at
    the model's ``max_seq_len``. ``max_tokens`` / ``sample_seed`` / ``max_doc_tokens``: each domain's evaluation sample
    (see :func:`perplexity`; the multiple-choice items come from the same documents).
    ``mc_items_per_domain=0`` skips the multiple-choice suite. An MoE scorer's metrics include
    ``"routing"`` (:class:`flexmoe_jax.evaluation.expert_use.ExpertUse`: which experts each domain's tokens
    reached, counted in the same forward passes; ``routing_groups`` {domain: expert names} adds ``group``).
    Returns ``{domain: metrics, ..., "average": metrics over the closed domains}`` (JSON-ready).
    """
    from tqdm.auto import tqdm

    from flexmoe_jax import data

    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, scorer.max_seq_len)
    if seq_len <= 1 or seq_len > scorer.max_seq_len:
        raise UserError(f"seq_len={seq_len} must be in [2, {scorer.max_seq_len}] ({scorer.name}'s max_seq_len)")
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    task_names = resolve_tasks(data_dir, tasks)
    sp = data.sentencepiece(data_dir)
    if sp.get_piece_size() > scorer.vocab_size:
        raise UserError(f"the tokenizer of {data_dir} has {sp.get_piece_size()} pieces but {scorer.name}'s "
                        f"vocabulary has {scorer.vocab_size}: evaluate with the data directory the model was "
                        "trained with")
    results: dict[str, dict] = {}
    bar = tqdm(desc=f"eval {scorer.name}", unit="batch", disable=not progress, leave=False)
    try:
        for task in task_names:
            dom = short_name(task)
            bar.set_postfix_str(dom)
            use = (ExpertUse(scorer.config.names, dom, (routing_groups or {}).get(dom, ()))
                   if counts_routing(scorer) else None)
            r = perplexity(scorer, task, data_dir, split, seq_len, batch_size, progress=bar.update,
                           max_tokens=max_tokens, sample_seed=sample_seed, max_doc_tokens=max_doc_tokens, use=use)
            if use is not None:
                r["routing"] = use.result()
            if mc_items_per_domain > 0:
                items = mc_items(data_dir, task, split, mc_items_per_domain, mc_choices, seed, max_tokens, sample_seed,
                                 max_doc_tokens)
                r.update(score_mc(scorer, items, sp, seq_len, batch_size))
                r["mc_choices"] = mc_choices
            r["seq_len"] = seq_len
            results[dom] = r
    finally:
        bar.close()
    reps = {d: r.pop(REPLICATES) for d, r in results.items()}
    avg = average(results)
    if avg is not None:
        avg["bpb_ci"] = bootstrap.interval(np.mean([reps[d] for d in avg["domains"]], axis=0))
        results[AVERAGE] = avg
    return results


def average(results: Mapping[str, dict]) -> dict | None:
    """Macro average over the closed domains present (None if there are none): mean bpb, nll and
    MC accuracies (over domains that have items), ppl = exp(mean nll), tokens and items summed."""
    from flexmoe_jax.data import CLOSED_DOMAINS

    doms = [d for d in CLOSED_DOMAINS if d in results]
    if not doms:
        return None
    rs = [results[d] for d in doms]
    out = {"domains": doms, "bpb": float(np.mean([r["bpb"] for r in rs])),
           "nll": float(np.mean([r["nll"] for r in rs])), "tokens": int(sum(r["tokens"] for r in rs))}
    out["ppl"] = math.exp(out["nll"])
    for k in ("mc_acc", "mc_acc_norm"):
        vals = [r[k] for r in rs if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    out["mc_items"] = int(sum(r.get("mc_items", 0) for r in rs))
    return out
