"""The evaluation sample: the held-out documents every model is scored on.

One sample per (data, task, split, seq_len, token budget, seed), shared by every model and by bits
per byte, routing statistics and multiple choice, so every comparison is paired on the same text.

- **Drawing.** Each source behind the task (a mixture has several) gets a share of the token budget
  in proportion to its tokens in the split; within a source, documents are taken in a seeded random
  order until that share is reached (the document that crosses it is kept whole). No budget: the
  whole split. Without a per-document cap every token of a sampled document is scored.
- **Per-document cap** (``max_doc_tokens``). A document longer than the cap is scored on one window of
  whole lines of about ``max_doc_tokens`` tokens, at a seeded random place in it (the same for every
  model), and its bytes are the window's. Why: the split's few long documents (a code module, a
  manual page) otherwise hold most of its tokens, so most of the scoring time goes to documents
  whose count, not length, decides the bootstrap interval; a window keeps every document in the
  sample and costs a fraction of the time (measured in docs/evaluation.md).
- **Packing.** As training sees text: tokens + EOS, cut into pieces of at most ``seq_len`` tokens,
  each piece its own segment (BOS = pad = 0 in front), pieces packed in order into rows. ``doc_of``
  names the sampled document of every target token, so scores come back per document.
- **Bytes.** Each document's UTF-8 length: bpb = summed NLL / ln 2 / summed bytes of the sample.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from flexmoe_jax.errors import UserError

FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")
EOS_ID = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    """Sampled documents of one split and their packed rows. Per document ``d`` (sample order):
    ``sources[doc_source[d]]`` is its dataset, ``doc_index[d]`` its position in that split (storage
    order), ``doc_bytes`` / ``doc_tokens`` the UTF-8 bytes and tokens (EOS included) of what is
    scored of it (the whole document, or its window under a ``max_doc_tokens`` cap), ``texts[d]`` that text."""

    task: str
    split: str
    seq_len: int
    seed: int
    max_tokens: int | None
    max_doc_tokens: int | None
    sources: tuple[str, ...]
    doc_source: np.ndarray
    doc_index: np.ndarray
    doc_bytes: np.ndarray
    doc_tokens: np.ndarray
    texts: tuple[str, ...]
    rows: dict[str, np.ndarray]
    doc_of: np.ndarray  # [rows, seq_len] int32: the document of each target token, -1 on padding
    split_docs: int
    split_tokens: int
    split_bytes: int
    docs_windowed: int = 0

    @property
    def num_docs(self) -> int:
        return len(self.doc_bytes)

    def size(self) -> dict:
        """What was scored and what it was drawn from (JSON-ready): documents, tokens, bytes."""
        per = {s: int(np.sum(self.doc_source == i)) for i, s in enumerate(self.sources)}
        return {"docs": self.num_docs, "tokens": int(self.doc_tokens.sum()), "bytes": int(self.doc_bytes.sum()),
                "docs_per_source": per, "split_docs": self.split_docs, "split_tokens": self.split_tokens,
                "split_bytes": self.split_bytes, "whole_split": self.num_docs == self.split_docs,
                "max_tokens": self.max_tokens, "max_doc_tokens": self.max_doc_tokens,
                "docs_windowed": self.docs_windowed, "seed": self.seed}

    def source_texts(self) -> dict[str, list[str]]:
        """The sampled documents' texts, per source, in sample order."""
        return {s: [t for t, k in zip(self.texts, self.doc_source) if k == i] for i, s in enumerate(self.sources)}

    def batches(self, batch_size: int) -> Iterator[tuple[slice, dict[str, np.ndarray]]]:
        """Fixed-shape batches of the rows (the last padded with all-zero rows); yields (rows, batch)."""
        n = len(self.doc_of)
        for lo in range(0, n, batch_size):
            chunk = {k: v[lo: lo + batch_size] for k, v in self.rows.items()}
            pad = batch_size - len(chunk[FEATURES[0]])
            if pad:
                chunk = {k: np.concatenate([v, np.zeros((pad, self.seq_len), v.dtype)]) for k, v in chunk.items()}
            yield slice(lo, min(lo + batch_size, n)), chunk

    def per_doc(self, values: np.ndarray) -> np.ndarray:
        """Sum a per-token array ``[rows, seq_len]`` over each document's tokens -> ``[num_docs]``."""
        mask = self.doc_of >= 0
        return np.bincount(self.doc_of[mask], weights=np.asarray(values, np.float64)[mask],
                           minlength=self.num_docs)


def score_docs(logprobs: Callable[[dict], np.ndarray], sample: Sample, batch_size: int,
               progress: Callable[[], None] | None = None) -> np.ndarray:
    """Summed NLL (nats) of each sampled document under ``logprobs(batch) -> [B, S]`` log-probs."""
    lp = np.zeros(sample.doc_of.shape, np.float64)
    for rows, batch in sample.batches(batch_size):
        lp[rows] = np.asarray(logprobs(batch), np.float64)[: rows.stop - rows.start]
        if progress:
            progress()
    return -sample.per_doc(lp)


# ----------------------------------------------------------------------------- drawing

def sources(data_dir, task: str) -> list[tuple[str, str]]:
    """(tfds builder name, config) of every dataset behind a task or mixture name."""
    from flexmoe_jax.data import layout as L, sources as S

    if task == L.PUBLIC_MIXTURE:
        return [(L.FLEXMIX_NAME, c) for c in S.PUBLIC_SOURCES if L.dataset_ready(data_dir, L.FLEXMIX_NAME, c)]
    if task.startswith(L.TASK_PREFIX):
        return [(L.FLEXMIX_NAME, task[len(L.TASK_PREFIX):])]
    return [(L.OWNER_NAME, task)]


def stamp(data_dir, task: str) -> tuple:
    """Modification times of the files that define a task's data (a rebuild changes them)."""
    from flexmoe_jax.data import layout as L, pipeline

    d = Path(data_dir).resolve()
    return tuple(f.stat().st_mtime_ns if f.exists() else None
                 for f in (d / pipeline.MANIFEST, L.owners_dir(d) / f"{task}.json"))


def draw(data_dir, task: str, split: str = "test", seq_len: int = 128, max_tokens: int | None = None,
         seed: int = 0, max_doc_tokens: int | None = None) -> Sample:
    """The evaluation sample of a task's split (see the module docstring); cached per process."""
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be a positive token budget or None (the whole split), got {max_tokens}")
    if max_doc_tokens is not None and max_doc_tokens < 2:
        raise UserError(f"max_doc_tokens must be a per-document cap of at least 2 tokens or None (whole documents), "
                        f"got {max_doc_tokens}")
    d = str(Path(data_dir).resolve())
    return _draw_cached(d, stamp(d, task), task, split, int(seq_len), max_tokens, int(seed), max_doc_tokens)


def window(text: str, n_tokens: int, cap: int, rng: np.random.Generator) -> tuple[int, int]:
    """(start, end) in characters of about ``cap`` of a document's ``n_tokens`` tokens, whole lines.

    The width in characters is the document's length times ``cap / n_tokens``; the start (uniform
    over the places the window fits) moves
    back to the beginning of its line and the end forward to the end of its line, so the window is
    text a reader could have seen on its own (a document starts at a line start too)."""
    width = max(1, int(len(text) * cap / n_tokens))
    at = int(rng.integers(0, max(1, len(text) - width + 1)))
    start = text.rfind("\n", 0, at) + 1
    end = text.find("\n", max(start, at + width - 1))
    return start, len(text) if end < 0 else end + 1


@functools.lru_cache(maxsize=32)
def _draw_cached(data_dir: str, _stamp, task: str, split: str, seq_len: int, max_tokens: int | None,
                 seed: int, max_doc_tokens: int | None) -> Sample:
    from flexmoe_jax import data
    from flexmoe_jax.data.pipeline import read_split_texts

    sp = data.sentencepiece(data_dir)
    per_source = []
    for name, config in sources(data_dir, task):
        texts = read_split_texts(data_dir, name, config, split)
        ids = [list(x) + [EOS_ID] for x in sp.encode(texts)] if texts else []
        per_source.append((config, texts, ids))
    if not any(texts for _, texts, _ in per_source):
        raise UserError(f"{task} has no documents in its {split!r} split in {data_dir}")
    total = sum(len(x) for _, _, ids in per_source for x in ids)
    def cost(n: int) -> int:  # tokens scored of a document of n tokens
        return n if max_doc_tokens is None else min(n, max_doc_tokens)

    total_cost = sum(cost(len(x)) for _, _, ids in per_source for x in ids)
    chosen = []  # (source number, index in split)
    for k, (config, texts, ids) in enumerate(per_source):
        order = np.random.default_rng([seed, zlib.crc32(config.encode())]).permutation(len(texts))
        if max_tokens is None:
            chosen += [(k, int(i)) for i in range(len(texts))]
            continue
        share = max_tokens * sum(cost(len(x)) for x in ids) / total_cost
        got = 0
        for i in order:
            if got >= share:
                break
            chosen.append((k, int(i)))
            got += cost(len(ids[i]))
    texts, doc_ids, windowed = [], [], 0
    for k, i in chosen:
        config, text, ids = per_source[k][0], per_source[k][1][i], per_source[k][2][i]
        if max_doc_tokens is not None and len(ids) > max_doc_tokens:
            rng = np.random.default_rng([seed, zlib.crc32(config.encode()), i])
            lo, hi = window(text, len(ids), max_doc_tokens, rng)
            if hi - lo < len(text):  # (a document of a few long lines may be one whole-line window)
                ids = list(sp.encode(text[lo:hi])) + ([EOS_ID] if hi == len(text) else [])
                text, windowed = text[lo:hi], windowed + 1
        texts.append(text)
        doc_ids.append(ids)
    pieces = [ids[lo: lo + seq_len] for ids in doc_ids for lo in range(0, len(ids), seq_len)]
    owner = [n for n, ids in enumerate(doc_ids) for _ in range(math.ceil(len(ids) / seq_len))]
    rows, doc_of = _pack(pieces, owner, seq_len)
    return Sample(task=task, split=split, seq_len=seq_len, seed=seed, max_tokens=max_tokens,
                  max_doc_tokens=max_doc_tokens,                  sources=tuple(c for c, _, _ in per_source),
                  doc_source=np.array([k for k, _ in chosen], np.int32), doc_index=np.array([i for _, i in chosen]),
                  doc_bytes=np.array([len(t.encode("utf-8")) for t in texts], np.int64),
                  doc_tokens=np.array([len(x) for x in doc_ids], np.int64), texts=tuple(texts),
                  rows=rows, doc_of=doc_of, split_docs=sum(len(t) for _, t, _ in per_source), split_tokens=total,
                  split_bytes=sum(len(t.encode("utf-8")) for _, texts, _ in per_source for t in texts),
                  docs_windowed=windowed)


def _pack(pieces: list[list[int]], owner: list[int], seq_len: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pieces (each <= seq_len tokens) in order into rows, seqio's packed decoder layout."""
    starts, row, used = [], 0, 0
    for p in pieces:
        if used + len(p) > seq_len:
            row, used = row + 1, 0
        starts.append((row, used))
        used += len(p)
    n = row + 1 if pieces else 0
    out = {f: np.zeros((n, seq_len), np.int32) for f in FEATURES}
    doc_of = np.full((n, seq_len), -1, np.int32)
    seg = np.zeros(n, np.int32)
    for p, d, (r, c) in zip(pieces, owner, starts):
        m = len(p)
        seg[r] += 1
        out["decoder_target_tokens"][r, c: c + m] = p
        out["decoder_input_tokens"][r, c + 1: c + m] = p[:-1]  # BOS (0) first
        out["decoder_loss_weights"][r, c: c + m] = 1
        out["decoder_segment_ids"][r, c: c + m] = seg[r]
        out["decoder_positions"][r, c: c + m] = np.arange(m)
        doc_of[r, c: c + m] = d
    return out, doc_of
