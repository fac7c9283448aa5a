"""The training-data extraction check: one model on token sequences (:func:`extraction_check`), and
every model on every domain's trained-on and held-out texts (:func:`run`). Definition: docs/privacy.md."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from flexmoe_jax import selection
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError
from flexmoe_jax.privacy.similarity import normalized_similarity
from flexmoe_jax.privacy.texts import select_texts, trained_sets

DEFAULT_PREFIX_LEN = 32
DEFAULT_SUFFIX_LEN = 32
DEFAULT_SAMPLES = 10
DEFAULT_THRESHOLD = 0.9
DEFAULT_NUM_DOCS = 100
DEFAULT_BATCH_SIZE = 64
SPLITS = ("train", "test")  # training documents, then the held-out control
BOS_ID = 0  # the decoder's BOS (= pad) in front of every training document


def _check_settings(config: ModelConfig, prefix_len, suffix_len, samples, threshold, batch_size) -> None:
    for name, v in (("prefix_len", prefix_len), ("suffix_len", suffix_len), ("samples", samples),
                    ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise UserError(f"{name} must be a positive integer, got {v!r}")
    if not 0 < threshold <= 1:
        raise UserError(f"threshold must be in (0, 1] (a normalized similarity), got {threshold}")
    need = 1 + prefix_len + suffix_len
    if config.max_seq_len < need:
        raise UserError(f"the model's max_seq_len={config.max_seq_len} is shorter than BOS + prefix_len "
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
        raise UserError(f"no document has prefix_len + suffix_len = {prefix_len + suffix_len} tokens "
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


def _load(m: Any, include, exclude) -> tuple[ModelConfig, Any]:
    from flexmoe_jax import eval as eval_lib

    if isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], ModelConfig):
        return selection.select(*m, include, exclude)
    if isinstance(m, (str, os.PathLike)):
        return eval_lib.load_model(m, include=include, exclude=exclude)
    raise UserError(f"a model must be a checkpoint / run directory path or a (config, params) tuple, "
                    f"got {type(m).__name__}")


def run(models: Any, data_dir, domains: Sequence[str] | None = None, *, num_docs: int = DEFAULT_NUM_DOCS,
        splits: Sequence[str] = SPLITS, prefix_len: int = DEFAULT_PREFIX_LEN,
        suffix_len: int = DEFAULT_SUFFIX_LEN, samples: int = DEFAULT_SAMPLES,
        threshold: float = DEFAULT_THRESHOLD, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
        batch_size: int = DEFAULT_BATCH_SIZE, include=None, exclude=None, scan: int | None = None,
        progress: bool = True, trained_from: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """Extraction check of every model on every domain's training and held-out documents.

    ``models``: ``{name: path | (config, params)}``, or a path / list of paths (named by
    :func:`flexmoe_jax.eval.default_name`). A path is a checkpoint, a merged model or a run
    directory holding ``model/``; ``include`` / ``exclude`` opt experts in / out of every model.
    ``domains``: closed-domain names (``humor``) or task names; default the domains of
    ``trained_from``, else every closed domain built in ``data_dir``.

    ``trained_from``: ``{domain: run directory}`` (or a
    :class:`flexmoe_jax.trained_docs.TrainedDocuments`): that domain's ``train`` texts are
    ``num_docs`` pieces drawn at random (``seed``) among the long enough pieces the run was fed, its
    held-out ones drawn the same way from the pieces of the other splits (docs/privacy.md). Domains
    not in it get the first ``num_docs`` long enough documents of each split in storage order
    (``scan`` bounds the reading), marked as not known to be trained on. The same texts go to every
    model.

    Returns ``{model: {domain: {split: extraction_check result}}}`` (JSON-ready); each result's
    ``selection`` says where its documents came from (``source``), whether they were trained on
    (``trained_on``: true, false for held-out, null for not known), how many long enough ones
    there were to draw from (``available``, null when not counted) and how many were used
    (``used``, = ``docs``), plus, for pieces, ``doc_indices`` (their documents' positions in the
    split, storage order), ``piece_indices`` and, for trained-on ones, the ``run`` they come from.
    """
    from flexmoe_jax import data, eval as eval_lib

    models = _named_models(models, include, exclude)
    if not splits:
        raise UserError("no splits to check: pass e.g. splits=('train', 'test')")
    if isinstance(splits, str) or any(s not in data.SPLITS for s in splits):
        raise UserError(f"splits must be a list of {', '.join(data.SPLITS)}, got {splits!r}")
    tasks = _tasks(data_dir, domains, trained_from)
    vocab = data.sentencepiece(data_dir).get_piece_size()

    if num_docs < 1:
        raise UserError(f"num_docs must be a positive integer, got {num_docs!r}")
    need = prefix_len + suffix_len
    trained = trained_sets(trained_from, data_dir, tasks, need) if trained_from else {}

    docs: dict[tuple[str, str], list[list[int]]] = {}
    chosen: dict[tuple[str, str], dict] = {}
    for task in tasks:
        for split in splits:
            docs[task, split], chosen[task, split] = select_texts(data_dir, task, split, trained.get(task),
                                                                  num_docs, need, seed, scan)

    results: dict[str, dict] = {}
    for name, m in models.items():
        config, params = _load(m, include, exclude)
        if vocab > config.vocab_size:
            raise UserError(f"the tokenizer of {data_dir} has {vocab} pieces but {name}'s vocabulary has "
                            f"{config.vocab_size}: use the data directory the model was trained with")
        results[name] = {}
        for task in tasks:
            dom = eval_lib.short_name(task)
            results[name][dom] = {
                split: {**extraction_check(config, params, docs[task, split], prefix_len=prefix_len,
                                           suffix_len=suffix_len, samples=samples, threshold=threshold,
                                           temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                                           progress=f"privacy {name} {dom}/{split}" if progress else False),
                        "selection": chosen[task, split]}
                for split in splits}
        del params
    return results


def _named_models(models: Any, include, exclude) -> dict:
    """``{name: model}`` from a map, a path or a list of paths (named by ``eval.default_name``)."""
    from flexmoe_jax import eval as eval_lib

    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if not isinstance(models, Mapping):
        names = [eval_lib.default_name(p, include, exclude) for p in models]
        if len(set(names)) != len(names):
            raise UserError(f"two models share the name derived from their path: {names}; pass a {{name: path}} map")
        models = dict(zip(names, models))
    if not models:
        raise UserError("no models to check: pass {name: path or (config, params)}")
    return models


def _tasks(data_dir, domains, trained_from) -> list[str]:
    """The task names to check: ``domains``, else those of ``trained_from``, else every closed domain built."""
    from flexmoe_jax import data, eval as eval_lib

    if domains is None and trained_from:
        domains = list(trained_from)
    if domains is None:
        known = set(data.register_tasks(data_dir))
        domains = [d for d in data.CLOSED_DOMAINS if f"{data.TASK_PREFIX}{d}" in known]
        if not domains:
            raise UserError(f"no closed domains built in {data_dir}: run `flexmoe data build` or pass domains")
    elif isinstance(domains, str):
        domains = [domains]
    return eval_lib.resolve_tasks(data_dir, domains)  # unknown domain -> ValueError, before any loading
