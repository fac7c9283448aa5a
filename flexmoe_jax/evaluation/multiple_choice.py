"""A held-out multiple-choice suite built from each domain's test text, scored lm-eval style.

  As lm-eval-harness does multiple choice, from held-out text of each domain: the context is a
  document's first line(s) (at least ``MC_MIN_CONTEXT`` characters), the true continuation is its
  next non-blank line; a document with no such split is cut inside its first line, between
  sentences, else between clauses (after ":" or ";", as in a dictionary entry "word (pos): gloss").
  The distractors are K-1 units of the same kind (lines, sentences, clauses) from *other* documents of the
  same source and split, distinct from the truth, from each other and from every unit of the
  item's own document, and matched in length: drawn at random from the ``MC_LENGTH_POOL x
  (K-1)`` candidates closest in characters to the truth (summed log-likelihood favours short
  strings; with free-length distractors every model "chooses" the shortest dictionary gloss).
  Documents with no usable split, or too few distinct distractors, are skipped. Item choice, distractors and the truth's
  position are seeded, so the suite is the same
  for every model. Each choice is scored by its summed log-likelihood given the context
  (``mc_acc``) and by that divided by its UTF-8 length (``mc_acc_norm``, lm-eval's acc_norm).
  Pieces are encoded as lm-eval's ``_encode_pair`` does (whole text, context prefix split off).
"""


import dataclasses
import functools
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from flexmoe_jax.data import eval_sample as sample_lib
from flexmoe_jax.errors import UserError
from flexmoe_jax.evaluation.scorers import Batch, Scorer
from flexmoe_jax.evaluation.tasks import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN, short_name

DEFAULT_MC_ITEMS = 100
DEFAULT_MC_CHOICES = 4

# Multiple-choice item limits (characters). Short enough that context + choice fit the default
# seq_len with any reasonable tokenizer; longer ones are left-truncated as lm-eval does.
MC_MIN_CONTEXT = 20
MC_MAX_CONTEXT = 400
MC_MIN_CHOICE = 8
MC_MAX_CHOICE = 160
MC_LENGTH_POOL = 5  # distractors come from the (choices - 1) x this candidates closest in length to the truth


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One question: choose ``choices[label]`` as the continuation of ``context``."""

    domain: str
    source: str      # the dataset config (or owner task) the document came from
    doc: int         # the document's index in its split (storage order)
    mode: str        # "line", "sentence" or "clause": what kind of unit the choices are
    context: str
    choices: tuple[str, ...]
    label: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Where a line may be cut when it has no usable line break: after a sentence end, else after a
# clause mark (a dictionary entry's "word (pos): gloss; example").
_CUTS = {"sentence": re.compile(r"(?<=[.!?])\s+(?=\S)"), "clause": re.compile(r"(?<=[:;])\s+(?=\S)")}
MODES = ("line", "sentence", "clause")


def _ok_choice(unit: str) -> bool:
    return MC_MIN_CHOICE <= len(unit.strip()) <= MC_MAX_CHOICE


def _norm(unit: str) -> str:
    return " ".join(unit.split())


def _pieces(line: str, mode: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence (or clause) of a line."""
    bounds, start = [], 0
    for m in _CUTS[mode].finditer(line):
        bounds.append((start, m.start()))
        start = m.end()
    bounds.append((start, len(line)))
    return [(a, b) for a, b in bounds if line[a:b].strip()]


def _doc_units(text: str) -> dict[str, list[str]]:
    """Every usable line, sentence and clause of a document: the distractor pools."""
    lines = [ln.rstrip() for ln in text.split("\n") if ln.strip()]
    out = {"line": [ln for ln in lines if _ok_choice(ln)]}
    for mode in ("sentence", "clause"):
        out[mode] = [u for u in (ln[a:b].strip() for ln in lines for a, b in _pieces(ln, mode)) if _ok_choice(u)]
    return out


def split_document(text: str) -> tuple[str, str, str] | None:
    """(context, true continuation, mode) of a document, or None if it has no well-posed split.

    ``line``: the shortest run of first lines with at least ``MC_MIN_CONTEXT`` characters whose
    next non-blank line is a usable choice; the context keeps its newlines (it ends with one) and
    the continuation is that line. Documents with no such split are cut inside their first line:
    ``sentence`` after a sentence end, else ``clause`` after a ":" or ";"; the context runs up to
    the cut and the continuation is " " + the next sentence (clause).
    """
    lines = text.split("\n")
    for i in range(len(lines) - 1):
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j == len(lines):
            break
        context = "\n".join(lines[:j]) + "\n"
        if len(context) > MC_MAX_CONTEXT:
            break
        if len(context.strip()) >= MC_MIN_CONTEXT and _ok_choice(lines[j]):
            return context, lines[j].rstrip(), "line"
    first = next((ln for ln in lines if ln.strip()), "")
    prefix = text[: text.index(first)] if first else ""
    for mode in ("sentence", "clause"):
        cuts = _pieces(first, mode)
        for k in range(len(cuts) - 1):
            context = prefix + first[: cuts[k][1]]
            if len(context) > MC_MAX_CONTEXT:
                break
            truth = first[cuts[k + 1][0]: cuts[k + 1][1]].strip()
            if len(context.strip()) >= MC_MIN_CONTEXT and _ok_choice(truth):
                return context, " " + truth, mode
    return None


def build_mc_items(texts: Sequence[str], domain: str, source: str, n_items: int = DEFAULT_MC_ITEMS,
                   n_choices: int = DEFAULT_MC_CHOICES, seed: int = 0) -> list[MCItem]:
    """Up to ``n_items`` well-posed items from the documents ``texts`` of one source (deterministic)."""
    if n_choices < 2:
        raise UserError(f"a multiple-choice item needs at least 2 choices, got {n_choices}")
    units = [_doc_units(t) for t in texts]
    splits = [split_document(t) for t in texts]
    eligible = [i for i, s in enumerate(splits) if s is not None]
    src = zlib.crc32(source.encode())
    if len(eligible) > n_items:
        rng = np.random.default_rng([seed, src])
        eligible = sorted(int(i) for i in rng.choice(eligible, n_items, replace=False))
    pools: dict[str, list[tuple[int, str]]] = {}
    for mode in MODES:
        seen, pool = set(), []
        for i, u in enumerate(units):
            for x in u[mode]:
                if _norm(x) not in seen:  # one copy of each distinct unit (the first document's)
                    seen.add(_norm(x))
                    pool.append((i, x))
        pools[mode] = pool
    items = []
    for i in eligible:
        context, truth, mode = splits[i]
        own = {_norm(x) for m in MODES for x in units[i][m]} | {_norm(truth)}
        cands = [x for d, x in pools[mode] if d != i and _norm(x) not in own]
        if len(cands) < n_choices - 1:
            continue
        rng = np.random.default_rng([seed, src, i])
        # Length-matched distractors: drawn from the candidates closest in length to the truth.
        # Summed log-likelihood favours short strings, so free-length distractors make the item
        # a length test (a dictionary's "toecap (noun):" beats every real definition).
        order = rng.permutation(len(cands))  # random tie-break among equal lengths
        order = sorted(order, key=lambda j: abs(len(_norm(cands[j])) - len(_norm(truth))))
        near = order[: MC_LENGTH_POOL * (n_choices - 1)]
        picked = [cands[j] for j in sorted(rng.choice(near, n_choices - 1, replace=False))]
        if mode != "line":
            picked = [" " + x.strip() for x in picked]
        label = int(rng.integers(n_choices))
        choices = picked[:label] + [truth] + picked[label:]
        items.append(MCItem(domain, source, i, mode, context, tuple(choices), label))
    return items


def mc_items(data_dir, task: str, split: str = "test", n_items: int = DEFAULT_MC_ITEMS,
             n_choices: int = DEFAULT_MC_CHOICES, seed: int = 0, max_tokens: int | None = None,
             sample_seed: int = 0, max_doc_tokens: int | None = None) -> list[MCItem]:
    """The multiple-choice items of a task (``flexmix_mini.<d>``, ``flexmix_mini.public``, or an
    owner's task), built from the documents of its evaluation sample (``max_tokens`` / ``sample_seed`` /
    ``max_doc_tokens``,
    :func:`flexmoe_jax.data.eval_sample.draw`; default the whole split). A mixture's items come from
    each source in turn, distractors from the same source's sampled documents.

    Cached per process (keyed on the manifests' times, so a rebuild or re-registration is seen): every
    model of a comparison is scored on the same items without re-reading the text.
    """
    d = str(Path(data_dir).resolve())
    return list(_mc_items_cached(d, sample_lib.stamp(d, task), task, split, n_items, n_choices, seed, max_tokens,
                                 sample_seed, max_doc_tokens))


@functools.lru_cache(maxsize=64)
def _mc_items_cached(data_dir: str, stamp, task: str, split: str, n_items: int, n_choices: int,
                     seed: int, max_tokens: int | None, sample_seed: int,
                     max_doc_tokens: int | None) -> tuple[MCItem, ...]:
    del stamp  # part of the cache key only
    domain = short_name(task)
    s = sample_lib.draw(data_dir, task, split, DEFAULT_SEQ_LEN, max_tokens, sample_seed, max_doc_tokens)
    texts = s.source_texts()
    per_source = [build_mc_items(t, domain, config, n_items, n_choices, seed) for config, t in texts.items()]
    out = []
    for k in range(max((len(x) for x in per_source), default=0)):  # round robin over the sources
        out += [x[k] for x in per_source if k < len(x)]
    return tuple(out[:n_items])


def _encode_pair(sp, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval-harness's ``_encode_pair``: trailing spaces move to the continuation, the whole text is
    encoded once and the context's own encoding length splits it."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = sp.encode(context + continuation)
    ctx = sp.encode(context)
    return whole[: len(ctx)], whole[len(ctx):]


def mc_rows(items: Sequence[MCItem], sp, seq_len: int) -> tuple[Batch, np.ndarray, list[tuple[int, int]]]:
    """One packed row per (item, choice): ``[BOS=0] + context + choice`` left-truncated to fit.

    Returns the batch features, the scoring mask [R, S] (1 on the choice's targets) and the
    (item, choice) of each row. The features' ``decoder_prompt_mask`` is 1 on the context's targets
    (the question: what the paper-form BTM weighs its members by).
    """
    rows, owners = [], []
    for q, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            ctx, cont = _encode_pair(sp, item.context, choice)
            if not cont:
                raise UserError(f"choice {choice!r} of item {q} encodes to no tokens")
            toks = [0] + ctx + cont
            window = toks[-(seq_len + 1):]
            rows.append((window, min(len(cont), seq_len)))
            owners.append((q, c))
    n = len(rows)
    feats = {k: np.zeros((n, seq_len), np.int32) for k in
             ("decoder_input_tokens", "decoder_target_tokens", "decoder_positions", "decoder_segment_ids",
              "decoder_loss_weights", "decoder_prompt_mask")}
    mask = np.zeros((n, seq_len), np.float32)
    for r, (window, n_cont) in enumerate(rows):
        t = len(window) - 1
        feats["decoder_input_tokens"][r, :t] = window[:-1]
        feats["decoder_target_tokens"][r, :t] = window[1:]
        feats["decoder_positions"][r, :t] = np.arange(t)
        feats["decoder_segment_ids"][r, :t] = 1
        feats["decoder_loss_weights"][r, :t] = 1
        feats["decoder_prompt_mask"][r, :t - n_cont] = 1
        mask[r, t - n_cont: t] = 1.0
    return feats, mask, owners


def _batched(feats: Batch, batch_size: int) -> Iterable[tuple[int, Batch]]:
    """Fixed-shape batches (the last padded with all-zero rows) so one compiled program serves all."""
    n = len(next(iter(feats.values())))
    for lo in range(0, n, batch_size):
        chunk = {k: v[lo: lo + batch_size] for k, v in feats.items()}
        pad = batch_size - len(chunk["decoder_input_tokens"])
        if pad:
            chunk = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
        yield n - lo if pad else batch_size, chunk


def choice_loglikelihoods(scorer: Scorer, items: Sequence[MCItem], sp, seq_len: int,
                          batch_size: int = DEFAULT_BATCH_SIZE) -> list[np.ndarray]:
    """Summed log-likelihood of every choice of every item given its context (one array per item)."""
    if not items:
        return []
    feats, mask, owners = mc_rows(items, sp, seq_len)
    sums = []
    for lo, (real, chunk) in zip(range(0, len(mask), batch_size), _batched(feats, batch_size)):
        lp = scorer.token_logprobs(chunk)[:real]
        sums.append(np.sum(lp.astype(np.float64) * mask[lo: lo + real], axis=1))
    flat = np.concatenate(sums)
    out = [np.zeros(len(it.choices)) for it in items]
    for (q, c), v in zip(owners, flat):
        out[q][c] = v
    return out


def score_mc(scorer: Scorer, items: Sequence[MCItem], sp, seq_len: int,
             batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """``{"mc_acc", "mc_acc_norm", "mc_items"}``: accuracy by log-likelihood and by log-likelihood
    per UTF-8 byte of the choice (None when there are no items)."""
    lls = choice_loglikelihoods(scorer, items, sp, seq_len, batch_size)
    if not items:
        return {"mc_acc": None, "mc_acc_norm": None, "mc_items": 0}
    acc = [int(np.argmax(ll)) == it.label for ll, it in zip(lls, items)]
    norm = [int(np.argmax(ll / np.array([len(c.encode("utf-8")) for c in it.choices]))) == it.label
            for ll, it in zip(lls, items)]
    return {"mc_acc": float(np.mean(acc)), "mc_acc_norm": float(np.mean(norm)), "mc_items": len(items)}
