"""Document hygiene shared by FlexMix-mini and owners' data: normalization, exact dedup, stable-hash
splits, per-split selection, and n-gram decontamination of the public mix.

- **Normalization** (:func:`normalize`): NFC, ``\\r\\n`` -> ``\\n``, trailing spaces stripped per line,
  leading/trailing blank lines dropped. The stored text is the normalized text.
- **Identity** (:func:`doc_hash`): SHA-256 of the normalized UTF-8 text. Two documents are exact
  duplicates iff their hashes are equal; only the first one (in source order) is kept.
- **Split** (:func:`split_of`): from the hash, so a document's split never depends on what else is
  in the corpus or on the caps: ``train`` 90 %, ``validation`` 5 %, ``test`` 5 %. Duplicates share a
  hash, hence a split: no document can be in two splits.
- **Selection** (:func:`select`): inside each split, documents are taken in hash order (a stable
  pseudo-random order) until the split's share of ``max_docs`` / ``max_bytes`` is reached; every split
  gets at least one document, so tiny test builds still have validation and test data. Raising a cap
  only adds documents.
- **Decontamination** (:class:`NgramIndex`): a public document is dropped when it shares any 13-word
  sequence with the closed corpora (the reference FlexMix keeps its closed sets out of the public mix).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from typing import Iterable, Iterator

import numpy as np

from flexmoe_jax.data.doc import Doc
from flexmoe_jax.errors import UserError

SPLITS = ("train", "validation", "test")
SPLIT_PERCENT = {"train": 90, "validation": 5, "test": 5}
NGRAM = 13


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def doc_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_of(h: str) -> str:
    bucket = int(h[:8], 16) % 100
    if bucket < SPLIT_PERCENT["train"]:
        return "train"
    return "validation" if bucket < SPLIT_PERCENT["train"] + SPLIT_PERCENT["validation"] else "test"


@dataclasses.dataclass
class Selection:
    """Documents per split (each a list of (hash, Doc) in hash order) and what was dropped."""

    splits: dict[str, list[tuple[str, Doc]]]
    stats: dict[str, int]


def dedup(docs: Iterable[Doc], stats: dict[str, int] | None = None) -> dict[str, Doc]:
    """Normalize, drop empty documents and exact duplicates; returns {hash: doc} in first-seen order."""
    stats = stats if stats is not None else {}
    seen: dict[str, Doc] = {}
    for d in docs:
        stats["candidates"] = stats.get("candidates", 0) + 1
        text = normalize(d.text)
        if not text:
            stats["empty"] = stats.get("empty", 0) + 1
            continue
        h = doc_hash(text)
        if h in seen:
            stats["duplicates"] = stats.get("duplicates", 0) + 1
            continue
        seen[h] = Doc(text=text, id=d.id, source=d.source)
    return seen


def _quotas(total: int | None, minimum: int) -> dict[str, int | None]:
    if total is None:
        return {s: None for s in SPLITS}
    small = {s: max(minimum, round(total * SPLIT_PERCENT[s] / 100)) for s in SPLITS if s != "train"}
    return {"train": max(minimum, total - sum(small.values())), **small}


SHARE = "share"  # test_bytes: the test split's usual share of max_bytes


def _byte_quotas(max_bytes: int | None, test_bytes: int | None | str,
                 train_bytes: int | None = None) -> dict[str, int | None]:
    """Byte quota per split; ``test_bytes`` (bytes, or None for every test document) replaces the
    test split's share when given. Train and validation quotas never depend on it. ``train_bytes``
    caps the train split further (held-out splits unchanged)."""
    q = _quotas(max_bytes, 1)
    if test_bytes != SHARE:
        q["test"] = test_bytes
    if train_bytes is not None:
        q["train"] = train_bytes if q["train"] is None else min(q["train"], train_bytes)
    return q


def select(docs: Iterable[Doc], max_docs: int | None = None, max_bytes: int | None = None,
           exclude: "NgramIndex | None" = None, test_bytes: int | None | str = SHARE,
           train_bytes: int | None = None) -> Selection:
    """Dedup, split by hash, then fill each split's quota in hash order (skipping contaminated docs)."""
    stats: dict[str, int] = {"candidates": 0, "empty": 0, "duplicates": 0, "contaminated": 0}
    unique = dedup(docs, stats)
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for h in unique:
        by_split[split_of(h)].append(h)
    doc_q, byte_q = _quotas(max_docs, 1), _byte_quotas(max_bytes, test_bytes, train_bytes)
    out: dict[str, list[tuple[str, Doc]]] = {}
    for s in SPLITS:
        taken, nbytes = [], 0
        for h in sorted(by_split[s]):
            if doc_q[s] is not None and len(taken) >= doc_q[s]:
                break
            if byte_q[s] is not None and taken and nbytes >= byte_q[s]:
                break
            d = unique[h]
            if exclude is not None and exclude.contains(d.text):
                stats["contaminated"] += 1
                continue
            taken.append((h, d))
            nbytes += len(d.text.encode("utf-8"))
        out[s] = taken
    return Selection(out, stats)


def select_generated(generate, max_docs: int | None, max_bytes: int | None,
                     test_bytes: int | str = SHARE, train_bytes: int | None = None) -> Selection:
    """Selection for generated corpora (math): ``generate(split, n_docs, n_bytes)`` yields docs.

    Each split is generated from its own seeds, so the split quotas are met without generating 20x
    more than needed; exact duplicates within and across splits (train first) are still removed.
    """
    stats: dict[str, int] = {"candidates": 0, "empty": 0, "duplicates": 0, "contaminated": 0}
    if test_bytes is None:
        raise UserError("a generated corpus has no 'every test document': give test_bytes in bytes")
    doc_q, byte_q = _quotas(max_docs, 1), _byte_quotas(max_bytes, test_bytes, train_bytes)
    seen: set[str] = set()
    out = {}
    for s in SPLITS:
        taken = []
        for d in generate(s, doc_q[s], byte_q[s]):
            stats["candidates"] += 1
            text = normalize(d.text)
            if not text:
                stats["empty"] += 1
                continue
            h = doc_hash(text)
            if h in seen:
                stats["duplicates"] += 1
                continue
            seen.add(h)
            taken.append((h, Doc(text=text, id=d.id, source=d.source)))
        out[s] = sorted(taken, key=lambda t: t[0])
    return Selection(out, stats)


def assign_splits(unique: dict[str, Doc]) -> dict[str, list[tuple[str, Doc]]]:
    """Every document to its hash split (owners' data: no caps). With 3+ documents, an empty
    validation or test split takes the train document(s) with the smallest hash, so that both exist."""
    out: dict[str, list[tuple[str, Doc]]] = {s: [] for s in SPLITS}
    for h in sorted(unique):
        out[split_of(h)].append((h, unique[h]))
    if len(unique) >= 3:
        for s in ("validation", "test"):
            if not out[s]:
                donor = max(("train", "validation", "test"), key=lambda k: len(out[k]))
                out[s].append(out[donor].pop(0))
    return out


# ------------------------------------------------------------------------------ decontamination
_WORD = re.compile(r"\w+")


def _word_hashes(text: str, cache: dict[str, int]) -> np.ndarray:
    out = []
    for w in _WORD.findall(text.lower()):
        h = cache.get(w)
        if h is None:
            h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") | 1
            cache[w] = h
        out.append(h)
    return np.array(out, dtype=np.uint64)


def _ngram_hashes(words: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """Rolling 64-bit hashes of every n-word window (wrapping uint64 arithmetic)."""
    if len(words) < n:
        return np.zeros((0,), np.uint64)
    m = len(words) - n + 1
    acc = np.zeros(m, np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for k in range(n):
            acc = acc * mult + words[k:k + m]
    return acc


class NgramIndex:
    """Sorted unique 13-gram hashes of a set of documents; ``contains(text)`` tests any overlap."""

    def __init__(self, hashes: np.ndarray, sorted_unique: bool = False):
        h = np.asarray(hashes, np.uint64)
        if not sorted_unique:  # (np.unique is slow on large uint64 arrays in numpy 2.x)
            h = np.sort(h)
            h = h[np.concatenate([[True], h[1:] != h[:-1]])] if len(h) else h
        self.hashes = h
        self._words: dict[str, int] = {}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "NgramIndex":
        cache: dict[str, int] = {}
        parts = [_ngram_hashes(_word_hashes(t, cache)) for t in texts]
        return cls(np.concatenate(parts) if parts else np.zeros((0,), np.uint64))

    def contains(self, text: str) -> bool:
        grams = _ngram_hashes(_word_hashes(text, self._words))
        if not len(grams) or not len(self.hashes):
            return False
        pos = np.searchsorted(self.hashes, grams)
        pos = np.minimum(pos, len(self.hashes) - 1)
        return bool(np.any(self.hashes[pos] == grams))

    def __len__(self) -> int:
        return len(self.hashes)


def iter_texts(docs: Iterable[Doc]) -> Iterator[str]:
    for d in docs:
        t = normalize(d.text)
        if t:
            yield t
