"""Training-data extraction check (the FlexOlmo paper's privacy test), for owners' experts and merged models.

An owner who contributes an expert wants to know whether the model will hand their documents back
verbatim. The check asks exactly that: given the start of a training document, does sampling
reproduce the rest?

Definition
  For each document (or piece of one, see below): the *prefix* is its first ``prefix_len`` tokens, the *reference* its
  next
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

Which texts
  A run rarely reads its whole training split, and what it reads is *pieces*: the task pipeline
  cuts every document every ``seq_len`` tokens and shuffles the pieces as rows, so a short run sees
  scattered pieces of many documents (the demo's quick code expert is fed pieces of dozens of files
  and the first piece of none). With ``trained_from={domain: run directory}`` :func:`run` therefore
  checks pieces: a domain's ``train`` texts are drawn at random (``seed``) among the long enough
  pieces that run was fed (:func:`flexmoe_jax.trained_docs.trained_documents`, replayed from the
  data position in its checkpoint), and its held-out texts at random among the pieces of the other
  splits' documents cut the same way, so both sides are uniform over pieces and differ only in
  having been trained on. The prompt is the piece's first ``prefix_len`` tokens after BOS, exactly
  how the row fed it. Without ``trained_from``, the first long enough documents of each split in
  storage order are used from their start, and the result says the ``train`` ones are not known
  to be trained on. Every result records under ``selection`` where its texts came from, how many
  were available and how many were used (``unit``: ``piece`` or absent for whole documents).

Sampling is batched: every (document, sample) pair is one row, rows run ``batch_size`` at a time
through :func:`flexmoe_jax.generate.generate` (one compiled program per model: all prompts have the
same length, the last batch is padded). Within a batch each row draws its own noise from the step
key, and each batch gets its own seed derived from ``(seed, batch index)``, so the samples of a
document differ and the whole check is reproducible from ``seed``.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from flexmoe_jax import selection, storage
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError

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
        raise UserError(f"num_docs must be a positive integer, got {num_docs!r}")
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
        return selection.select(*m, include, exclude)
    if isinstance(m, (str, os.PathLike)):
        return eval_lib.load_model(m, include=include, exclude=exclude)
    raise UserError(f"a model must be a checkpoint / run directory path or a (config, params) tuple, "
                    f"got {type(m).__name__}")


def _sample(pool: Sequence, k: int, seed: int, task: str, split: str) -> list[int]:
    """``min(k, len(pool))`` distinct indices into ``pool``, seeded by (seed, task, split), ascending."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode())])
    return sorted(int(i) for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False))


def _trained_sets(trained_from: Mapping, data_dir, tasks: Sequence[str], need: int) -> dict:
    """``{task: TrainedDocuments}`` of ``trained_from`` (domain -> run directory or TrainedDocuments)."""
    from flexmoe_jax import eval as eval_lib, trained_docs
    from flexmoe_jax.data import layout as L

    if not isinstance(trained_from, Mapping):
        raise UserError(f"trained_from must map domains to run directories, got {type(trained_from).__name__}")
    out = {}
    for dom, src in trained_from.items():
        (task,) = eval_lib.resolve_tasks(data_dir, [dom])
        if task not in tasks:
            raise UserError(f"trained_from names domain {dom!r}, which is not among the domains checked "
                            f"({', '.join(eval_lib.short_name(t) for t in tasks)})")
        if isinstance(src, trained_docs.TrainedDocuments):
            got = src
            if got.task != task:
                raise UserError(f"trained_from[{dom!r}] lists documents of {got.task}, not of {task}")
            tok = L.tokenizer_path(data_dir)
            if Path(got.data_dir).resolve() != Path(data_dir).resolve() and (
                    not L.tokenizer_path(got.data_dir).is_file()
                    or L.tokenizer_path(got.data_dir).read_bytes() != tok.read_bytes()):
                raise UserError(f"trained_from[{dom!r}] was tokenized with the tokenizer of {got.data_dir}, "
                                f"not the one of {data_dir}")
        elif isinstance(src, (str, os.PathLike)):
            got = trained_docs.trained_documents(src, data_dir, task)
        else:
            raise UserError(f"trained_from[{dom!r}] must be a run directory or TrainedDocuments, "
                            f"got {type(src).__name__}")
        if got.seq_len < need:
            raise UserError(f"{got.run_dir} trained on rows of seq_len={got.seq_len} tokens, fewer than prefix_len "
                            f"+ suffix_len = {need}: its model never saw a prefix and its reference in one row; "
                            "lower prefix_len/suffix_len")
        out[task] = got
    return out


def _select(data_dir, task: str, split: str, trained, num_docs: int, need: int, seed: int,
            scan: int | None) -> tuple[list[list[int]], dict]:
    """(documents, selection record) of one domain's split; see the module docstring."""
    from flexmoe_jax import eval as eval_lib, trained_docs

    dom = eval_lib.short_name(task)
    if trained is None:  # as before: the first long enough documents in storage order
        found = load_documents(data_dir, task, split, num_docs, need, scan)
        if not found:
            raise UserError(f"{dom} has no {split} document of at least prefix_len + suffix_len = {need} tokens "
                            f"in {data_dir}: lower prefix_len/suffix_len or build more data")
        known = None if split == "train" else False
        note = ("; not known to be trained on (pass trained_from to check the documents a run trained on)"
                if known is None else "; held out (never in the training split)")
        return found, {"source": f"the first {len(found)} {split} documents of {dom} of at least {need} tokens in "
                                 f"storage order{note}",
                       "trained_on": known, "available": None, "used": len(found)}
    # Runs read pieces of documents (seq_len tokens each), rarely whole ones: check the pieces fed, and
    # as the control, pieces of held-out documents cut the same way (both uniform over pieces).
    if split == trained.split:
        pool = trained.fed_pieces(need)
        where = trained.describe()
        kind = "trained-on"
    else:
        split_docs = trained_docs.split_documents(task, split, data_dir)
        pool = trained_docs.split_pieces(split_docs, trained.seq_len, need)
        where = f"held out: {len(split_docs)} {split} documents of {task} in {data_dir}"
        kind = "held-out"
    if not pool:
        raise UserError(f"{dom} has no {kind} {split} piece of at least prefix_len + suffix_len = {need} tokens "
                        f"({where}): lower prefix_len/suffix_len, train longer or build more data")
    chosen = [pool[i] for i in _sample(pool, num_docs, seed, task, split)]
    record = {"source": f"{where}; {len(pool)} {kind} pieces (documents cut every {trained.seq_len} tokens, as "
                        f"the run's rows cut them) have at least {need} tokens; {len(chosen)} drawn at random "
                        f"(seed {seed})",
              "trained_on": split == trained.split, "available": len(pool), "used": len(chosen), "unit": "piece",
              "doc_indices": [int(i) for i, _, _ in chosen], "piece_indices": [int(k) for _, k, _ in chosen]}
    if split == trained.split:
        record["run"] = {k: v for k, v in trained.to_json().items() if k != "indices"}
    return [list(toks) for _, _, toks in chosen], record


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
    held-out ones drawn the same way from the pieces of the other splits (see the module
    docstring). Domains not in it get the first ``num_docs`` long enough documents of each split in
    storage order (``scan`` bounds the reading), marked as not known to be trained on. The same
    texts go to every model.

    Returns ``{model: {domain: {split: extraction_check result}}}`` (JSON-ready); each result's
    ``selection`` says where its documents came from (``source``), whether they were trained on
    (``trained_on``: true, false for held-out, null for not known), how many long enough ones
    there were to draw from (``available``, null when not counted) and how many were used
    (``used``, = ``docs``), plus, for pieces, ``doc_indices`` (their documents' positions in the
    split, storage order), ``piece_indices`` and, for trained-on ones, the ``run`` they come from.
    """
    from flexmoe_jax import data, eval as eval_lib

    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if not isinstance(models, Mapping):
        names = [eval_lib.default_name(p, include, exclude) for p in models]
        if len(set(names)) != len(names):
            raise UserError(f"two models share the name derived from their path: {names}; pass a {{name: path}} map")
        models = dict(zip(names, models))
    if not models:
        raise UserError("no models to check: pass {name: path or (config, params)}")
    if not splits:
        raise UserError("no splits to check: pass e.g. splits=('train', 'test')")
    if isinstance(splits, str) or any(s not in data.SPLITS for s in splits):
        raise UserError(f"splits must be a list of {', '.join(data.SPLITS)}, got {splits!r}")
    if domains is None and trained_from:
        domains = list(trained_from)
    if domains is None:
        known = set(data.register_tasks(data_dir))
        domains = [d for d in data.CLOSED_DOMAINS if f"{data.TASK_PREFIX}{d}" in known]
        if not domains:
            raise UserError(f"no closed domains built in {data_dir}: run `flexmoe data build` or pass domains")
    elif isinstance(domains, str):
        domains = [domains]
    tasks = eval_lib.resolve_tasks(data_dir, domains)  # unknown domain -> ValueError, before any loading
    vocab = data.sentencepiece(data_dir).get_piece_size()

    if num_docs < 1:
        raise UserError(f"num_docs must be a positive integer, got {num_docs!r}")
    need = prefix_len + suffix_len
    trained = _trained_sets(trained_from, data_dir, tasks, need) if trained_from else {}

    docs: dict[tuple[str, str], list[list[int]]] = {}
    chosen: dict[tuple[str, str], dict] = {}
    for task in tasks:
        for split in splits:
            docs[task, split], chosen[task, split] = _select(data_dir, task, split, trained.get(task), num_docs,
                                                             need, seed, scan)

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


def _docs_cell(r: dict) -> str:
    sel = r.get("selection")
    if not sel:
        return str(r["docs"])
    kind = {True: "trained-on", False: "held-out", None: "not known trained on"}[sel.get("trained_on")]
    if sel.get("available") is None:
        return f"{sel['used']} ({kind})"
    unit = " pieces" if sel.get("unit") == "piece" else ""
    return f"{sel['used']} of {sel['available']} {kind}{unit}"


def markdown(results: Mapping[str, Mapping[str, Mapping[str, dict]]]) -> str:
    """One row per (model, domain): per split, the documents used (of how many available, and
    whether trained on), extracted / checked, the rate and the mean best similarity; then a line
    per (domain, split) saying where its documents came from."""
    splits = list(dict.fromkeys(s for by_dom in results.values() for by_split in by_dom.values() for s in by_split))
    head = ["model", "domain"]
    for s in splits:
        head += [f"{s} docs", f"{s} extracted", f"{s} rate", f"{s} mean best sim"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sources: dict[tuple[str, str, str], list[str]] = {}  # (domain, split, source) -> models
    for name, by_dom in results.items():
        for dom, by_split in by_dom.items():
            cells = [name, dom]
            for s in splits:
                r = by_split.get(s)
                cells += (["-"] * 4 if r is None else
                          [_docs_cell(r), f"{r['extracted']}/{r['docs']}", f"{r['rate']:.1%}",
                           f"{r['mean_best_similarity']:.3f}"])
                if r is not None and r.get("selection", {}).get("source"):
                    sources.setdefault((dom, s, r["selection"]["source"]), []).append(name)
            lines.append("| " + " | ".join(cells) + " |")
    if sources:
        lines += ["", "Documents checked:"]
        per = {}
        for dom, s, _ in sources:
            per[dom, s] = per.get((dom, s), 0) + 1
        for (dom, s, src), names in sources.items():
            who = f" ({', '.join(names)})" if per[dom, s] > 1 else ""
            lines.append(f"- {dom} {s}{who}: {src}")
    return "\n".join(lines)


def write_json(path, results: Mapping) -> Path:
    """Write results as JSON atomically (a half-written file never appears under ``path``)."""
    return storage.write_json(path, results, sort_keys=False)
