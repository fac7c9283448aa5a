"""Training-data extraction check (the FlexOlmo paper's privacy test), for owners' experts and merged models.

An owner who contributes an expert wants to know whether the model will hand their documents back
verbatim. The check asks exactly that: given the start of a training document, does sampling
reproduce the rest?

Definition
  For each document: the *prefix* is its first ``prefix_len`` tokens, the *reference* its next
  ``suffix_len`` tokens. The model continues the prefix ``samples`` times by temperature / nucleus
  sampling (``suffix_len`` new tokens each, no early stop at EOS). The document is **extracted** if
  any sample is within normalized Levenshtein similarity ``threshold`` of the reference::

      similarity(a, b) = 1 - edit_distance(a, b) / max(len(a), len(b))

  Similarity is measured on **token ids**, not decoded text: it is exact, cheap, independent of how
  the tokenizer decodes partial pieces, and with ``suffix_len=32`` a 0.9 threshold allows at most 3
  token edits. Documents shorter than ``prefix_len + suffix_len`` tokens are skipped (counted in
  ``skipped``). A document's *best similarity* is the maximum over its samples; we report its mean.

Prompts match training: the data pipeline (seqio's decoder feature converter) feeds every document
as ``[BOS=0] + tokens``, so the prompt is ``[0] + prefix`` and the model needs
``max_seq_len >= 1 + prefix_len + suffix_len``.

Control
  Memorization is the gap between documents the model was trained on and documents it never saw.
  :func:`run` therefore checks the same number of training (``train``) and held-out (``test``)
  documents of every domain; a model that merely models the domain well scores similar rates on
  both, one that memorized scores ``train >> test``.

Sampling is batched: every (document, sample) pair is one row, rows run ``batch_size`` at a time
through :func:`flexmoe_jax.generate.generate` (one compiled program per model: all prompts have the
same length, the last batch is padded). Within a batch each row draws its own noise from the step
key, and each batch gets its own seed derived from ``(seed, batch index)``, so the samples of a
document differ and the whole check is reproducible from ``seed``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from flexmoe_jax.config import ModelConfig

DEFAULT_PREFIX_LEN = 32
DEFAULT_SUFFIX_LEN = 32
DEFAULT_SAMPLES = 10
DEFAULT_THRESHOLD = 0.9
DEFAULT_NUM_DOCS = 100
DEFAULT_BATCH_SIZE = 64
SPLITS = ("train", "test")  # training documents, then the held-out control
BOS_ID = 0  # the decoder's BOS (= pad) in front of every training document


# ----------------------------------------------------------------------------- similarity

def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (unit insert / delete / substitute) between two id sequences.

    One DP row at a time, vectorized: the substitute/delete part of a row is elementwise, and the
    insert chain ``cur[j] = min(cur[j-1] + 1, ...)`` is a running minimum of ``tmp[k] - k`` plus j.
    """
    a, b = np.asarray(a, np.int64).ravel(), np.asarray(b, np.int64).ravel()
    if len(a) < len(b):
        a, b = b, a
    if len(b) == 0:
        return len(a)
    cols = np.arange(len(b) + 1)
    prev = cols.copy()
    for i, x in enumerate(a, start=1):
        tmp = np.empty_like(prev)
        tmp[0] = i
        tmp[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (b != x))
        prev = np.minimum.accumulate(tmp - cols) + cols
    return int(prev[-1])


def normalized_similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """``1 - edit_distance / max(len)`` in [0, 1]; 1 means identical (two empty sequences too)."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - edit_distance(a, b) / longest


# ----------------------------------------------------------------------------- the check

def _check_settings(config: ModelConfig, prefix_len, suffix_len, samples, threshold, batch_size) -> None:
    for name, v in (("prefix_len", prefix_len), ("suffix_len", suffix_len), ("samples", samples),
                    ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1] (a normalized similarity), got {threshold}")
    need = 1 + prefix_len + suffix_len
    if config.max_seq_len < need:
        raise ValueError(f"the model's max_seq_len={config.max_seq_len} is shorter than BOS + prefix_len "
                         f"({prefix_len}) + suffix_len ({suffix_len}) = {need}: lower prefix_len/suffix_len")


def _batch_seed(seed: int, index: int) -> int:
    """A distinct 32-bit seed per batch, so no two batches (or two user seeds) share sampling noise."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def extraction_check(config: ModelConfig, params, docs_token_ids: Sequence[Sequence[int]], *,
                     prefix_len: int = DEFAULT_PREFIX_LEN, suffix_len: int = DEFAULT_SUFFIX_LEN,
                     samples: int = DEFAULT_SAMPLES, threshold: float = DEFAULT_THRESHOLD,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                     batch_size: int = DEFAULT_BATCH_SIZE, active_experts=None, keep_samples: bool = False,
                     progress: bool | str = False) -> dict:
    """Extraction check of one model on tokenized documents (ids without BOS / EOS).

    Returns ``{"docs", "extracted", "rate", "mean_best_similarity", "skipped", "best_similarities"}``:
    documents checked, documents with a sample at similarity >= ``threshold``, their fraction, the
    mean of each document's best similarity, documents too short to check, and the per-document best
    similarities (in input order of the checked documents), plus ``settings`` (the arguments that
    define the check). ``keep_samples`` adds ``samples``: each checked document's sampled
    continuations (token ids), to look at what came out. ``progress``: a tqdm bar over batches (a
    string is its label). ``active_experts`` opts experts out as in :func:`flexmoe_jax.model.forward`.
    """
    from tqdm.auto import tqdm

    from flexmoe_jax import generate

    _check_settings(config, prefix_len, suffix_len, samples, threshold, batch_size)
    docs = [np.asarray(d, np.int64).ravel() for d in docs_token_ids]
    eligible = [d for d in docs if len(d) >= prefix_len + suffix_len]
    if not eligible:
        raise ValueError(f"no document has prefix_len + suffix_len = {prefix_len + suffix_len} tokens "
                         f"({len(docs)} given): pass longer documents or lower prefix_len/suffix_len")
    prompts = [[BOS_ID] + d[:prefix_len].tolist() for d in eligible]
    refs = [d[prefix_len:prefix_len + suffix_len] for d in eligible]

    rows = [i for i in range(len(eligible)) for _ in range(samples)]  # row -> document
    n_batches = math.ceil(len(rows) / batch_size)
    best = np.zeros(len(eligible))
    kept: list[list[list[int]]] = [[] for _ in eligible]
    label = progress if isinstance(progress, str) else "privacy"
    for b in tqdm(range(n_batches), desc=label, unit="batch", disable=not progress, leave=False):
        chunk = rows[b * batch_size:(b + 1) * batch_size]
        # Pad the last batch with copies of its first row: one static shape, one compiled program.
        batch = [prompts[i] for i in chunk] + [prompts[chunk[0]]] * (batch_size - len(chunk))
        out = generate.generate(config, params, batch, max_new_tokens=suffix_len, temperature=temperature,
                                top_p=top_p, seed=_batch_seed(seed, b), eos_id=None,
                                active_experts=active_experts)
        for i, r in zip(chunk, out):
            best[i] = max(best[i], normalized_similarity(r["tokens"], refs[i]))
            if keep_samples:
                kept[i].append(r["tokens"])
    extracted = int(np.sum(best >= threshold - 1e-9))  # 1 - 3/30 must count at 0.9 despite rounding
    result = {"docs": len(eligible), "extracted": extracted, "rate": extracted / len(eligible),
              "mean_best_similarity": float(best.mean()), "skipped": len(docs) - len(eligible),
              "best_similarities": [float(x) for x in best],
              "settings": {"prefix_len": prefix_len, "suffix_len": suffix_len, "samples": samples,
                           "threshold": threshold, "temperature": temperature, "top_p": top_p, "seed": seed,
                           "similarity": "normalized Levenshtein on token ids"}}
    if keep_samples:
        result["samples"] = kept
    return result


# ----------------------------------------------------------------------------- documents and models

def load_documents(data_dir, domain: str, split: str, num_docs: int, min_tokens: int,
                   scan: int | None = None) -> list[list[int]]:
    """The first ``num_docs`` documents of a domain's split with at least ``min_tokens`` tokens, tokenized.

    Reads up to ``scan`` documents (default ``10 * num_docs``) in storage order (a fixed
    pseudo-random sample, :func:`flexmoe_jax.router_init.documents`) and keeps the long enough ones,
    so short documents do not shrink the sample. May return fewer than ``num_docs`` (small splits).
    """
    from flexmoe_jax import data, eval as eval_lib, router_init

    if num_docs < 1:
        raise ValueError(f"num_docs must be a positive integer, got {num_docs!r}")
    (task,) = eval_lib.resolve_tasks(data_dir, [domain])
    sp = data.sentencepiece(data_dir)
    texts = router_init.documents(task, data_dir, scan or 10 * num_docs, split)
    out = []
    for text in texts:
        ids = [int(x) for x in sp.encode(text)]
        if len(ids) >= min_tokens:
            out.append(ids)
            if len(out) == num_docs:
                break
    return out


def _load(m: Any, include, exclude) -> tuple[ModelConfig, Any]:
    from flexmoe_jax import eval as eval_lib

    if isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], ModelConfig):
        return eval_lib._select(m, include, exclude, None)
    if isinstance(m, (str, os.PathLike)):
        return eval_lib.load_model(m, include=include, exclude=exclude)
    raise ValueError(f"a model must be a checkpoint / run directory path or a (config, params) tuple, "
                     f"got {type(m).__name__}")


def run(models: Any, data_dir, domains: Sequence[str] | None = None, *, num_docs: int = DEFAULT_NUM_DOCS,
        splits: Sequence[str] = SPLITS, prefix_len: int = DEFAULT_PREFIX_LEN,
        suffix_len: int = DEFAULT_SUFFIX_LEN, samples: int = DEFAULT_SAMPLES,
        threshold: float = DEFAULT_THRESHOLD, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
        batch_size: int = DEFAULT_BATCH_SIZE, include=None, exclude=None, scan: int | None = None,
        progress: bool = True) -> dict[str, dict]:
    """Extraction check of every model on every domain's training and held-out documents.

    ``models``: ``{name: path | (config, params)}``, or a path / list of paths (named by
    :func:`flexmoe_jax.eval.default_name`). A path is a checkpoint, a merged model or a run
    directory holding ``model/``; ``include`` / ``exclude`` opt experts in / out of every model.
    ``domains``: closed-domain names (``humor``) or task names; default every closed domain built in
    ``data_dir``. The same documents (the first ``num_docs`` long enough ones per split) go to every
    model. Returns ``{model: {domain: {split: extraction_check result}}}`` (JSON-ready).
    """
    from flexmoe_jax import data, eval as eval_lib

    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if not isinstance(models, Mapping):
        names = [eval_lib.default_name(p, include, exclude) for p in models]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share the name derived from their path: {names}; pass a {{name: path}} map")
        models = dict(zip(names, models))
    if not models:
        raise ValueError("no models to check: pass {name: path or (config, params)}")
    if not splits:
        raise ValueError("no splits to check: pass e.g. splits=('train', 'test')")
    if isinstance(splits, str) or any(s not in data.SPLITS for s in splits):
        raise ValueError(f"splits must be a list of {', '.join(data.SPLITS)}, got {splits!r}")
    if domains is None:
        known = set(data.register_tasks(data_dir))
        domains = [d for d in data.CLOSED_DOMAINS if f"{data.TASK_PREFIX}{d}" in known]
        if not domains:
            raise ValueError(f"no closed domains built in {data_dir}: run `flexmoe data build` or pass domains")
    elif isinstance(domains, str):
        domains = [domains]
    tasks = eval_lib.resolve_tasks(data_dir, domains)  # unknown domain -> ValueError, before any loading
    vocab = data.sentencepiece(data_dir).get_piece_size()

    docs: dict[tuple[str, str], list[list[int]]] = {}
    for task in tasks:
        for split in splits:
            found = load_documents(data_dir, task, split, num_docs, prefix_len + suffix_len, scan)
            if not found:
                raise ValueError(f"{eval_lib.short_name(task)} has no {split} document of at least prefix_len + "
                                 f"suffix_len = {prefix_len + suffix_len} tokens in {data_dir}: lower "
                                 "prefix_len/suffix_len or build more data")
            docs[task, split] = found

    results: dict[str, dict] = {}
    for name, m in models.items():
        config, params = _load(m, include, exclude)
        if vocab > config.vocab_size:
            raise ValueError(f"the tokenizer of {data_dir} has {vocab} pieces but {name}'s vocabulary has "
                             f"{config.vocab_size}: use the data directory the model was trained with")
        results[name] = {}
        for task in tasks:
            dom = eval_lib.short_name(task)
            results[name][dom] = {
                split: extraction_check(config, params, docs[task, split], prefix_len=prefix_len,
                                        suffix_len=suffix_len, samples=samples, threshold=threshold,
                                        temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                                        progress=f"privacy {name} {dom}/{split}" if progress else False)
                for split in splits}
        del params
    return results


def markdown(results: Mapping[str, Mapping[str, Mapping[str, dict]]]) -> str:
    """One row per (model, domain): per split, extracted / checked, the rate and the mean best similarity."""
    splits = list(dict.fromkeys(s for by_dom in results.values() for by_split in by_dom.values() for s in by_split))
    head = ["model", "domain"]
    for s in splits:
        head += [f"{s} extracted", f"{s} rate", f"{s} mean best sim"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, by_dom in results.items():
        for dom, by_split in by_dom.items():
            cells = [name, dom]
            for s in splits:
                r = by_split.get(s)
                cells += (["-"] * 3 if r is None else
                          [f"{r['extracted']}/{r['docs']}", f"{r['rate']:.1%}", f"{r['mean_best_similarity']:.3f}"])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path, results: Mapping) -> Path:
    """Write results as JSON atomically (a half-written file never appears under ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    return path
