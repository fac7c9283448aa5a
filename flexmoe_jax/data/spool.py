"""An owner's documents deduplicated and split on the way in, spooled to disk one split per file.

:class:`Spool` takes documents one at a time (:mod:`flexmoe_jax.data.readers` streams them) and
applies FlexMix-mini's hygiene (:mod:`flexmoe_jax.data.splits`: normalization, empty and exact
duplicate documents dropped, the split from the text's hash), writing each kept document as one JSON
line to ``DIR/<split>.jsonl`` and counting its bytes and tokens (the anchor's tokenizer, in chunks).
What stays in memory is one 16-byte digest per distinct document (for dedup) and a chunk of texts
being tokenized, never the corpus. :meth:`Spool.finish` applies the rule that with three or more
documents no split is empty (the smallest-hash document of the largest split moves), and returns
the per-split statistics and an order-independent key of the document set. :class:`SpooledSplit`
reads a split back as ``(hash, Doc)`` pairs for the tfds builder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from flexmoe_jax.data import splits
from flexmoe_jax.data.doc import Doc

CHUNK = 512  # documents tokenized per call


class SpooledSplit:
    """One spooled split: iterates ``(hash, Doc)`` from its file; ``len`` is its document count."""

    def __init__(self, path: Path, n: int):
        self.path, self.n = Path(path), n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[str, Doc]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                yield r["h"], Doc(text=r["text"], id=r["id"], source=r["source"])


class Spool:
    """Deduplicate, split and spool documents under ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, sp=None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sp = sp
        self.files = {s: open(self.dir / f"{s}.jsonl", "w", encoding="utf-8") for s in splits.SPLITS}
        self.rows = {s: {"docs": 0, "bytes": 0, "tokens": 0} for s in splits.SPLITS}
        self.seen: set[bytes] = set()
        self.dropped = {"candidates": 0, "empty": 0, "duplicates": 0}
        self._pending: dict[str, list[str]] = {s: [] for s in splits.SPLITS}
        self._sum = 0

    def add(self, doc: Doc) -> None:
        self.dropped["candidates"] += 1
        text = splits.normalize(doc.text)
        if not text:
            self.dropped["empty"] += 1
            return
        h = splits.doc_hash(text)
        digest = bytes.fromhex(h[:32])
        if digest in self.seen:
            self.dropped["duplicates"] += 1
            return
        self.seen.add(digest)
        self._sum = (self._sum + int(h, 16)) % (1 << 256)
        s = splits.split_of(h)
        self.files[s].write(json.dumps({"h": h, "text": text, "id": doc.id, "source": doc.source},
                                       ensure_ascii=False) + "\n")
        r = self.rows[s]
        r["docs"] += 1
        r["bytes"] += len(text.encode("utf-8"))
        self._pending[s].append(text)
        if len(self._pending[s]) >= CHUNK:
            self._count(s)

    def _count(self, s: str) -> None:
        if self.sp is not None and self._pending[s]:
            from flexmoe_jax.data.tokenizer import count_tokens

            self.rows[s]["tokens"] += int(sum(count_tokens(self.sp, self._pending[s])))
        self._pending[s] = []

    @property
    def unique(self) -> int:
        return len(self.seen)

    def key(self) -> str:
        """An order-independent digest of the set of distinct documents."""
        return f"{self._sum:064x}:{self.unique}"

    def _move(self, h: str, src: str, dst: str) -> None:
        """Move the document with hash ``h`` from split ``src`` to ``dst`` (a streaming rewrite of ``src``)."""
        tmp = self.dir / f"{src}.jsonl.tmp"
        moved = None
        with open(self.dir / f"{src}.jsonl", encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as out:
            for line in f:
                if moved is None and json.loads(line)["h"] == h:
                    moved = line
                    continue
                out.write(line)
        os.replace(tmp, self.dir / f"{src}.jsonl")
        with open(self.dir / f"{dst}.jsonl", "a", encoding="utf-8") as f:
            f.write(moved)
        text = json.loads(moved)["text"]
        n_tok = 0
        if self.sp is not None:
            from flexmoe_jax.data.tokenizer import count_tokens

            n_tok = int(count_tokens(self.sp, [text])[0])
        for s, sign in ((src, -1), (dst, 1)):
            self.rows[s]["docs"] += sign
            self.rows[s]["bytes"] += sign * len(text.encode("utf-8"))
            self.rows[s]["tokens"] += sign * n_tok

    def finish(self) -> dict[str, SpooledSplit]:
        """Close the files, count the last tokens, fill an empty validation/test split (3+ documents);
        returns the splits to read back."""
        for s in splits.SPLITS:
            self._count(s)
            self.files[s].close()
        if self.unique >= 3:
            for s in ("validation", "test"):
                if not self.rows[s]["docs"]:
                    donor = max(splits.SPLITS, key=lambda k: self.rows[k]["docs"])
                    with open(self.dir / f"{donor}.jsonl", encoding="utf-8") as f:
                        smallest = min(json.loads(line)["h"] for line in f)
                    self._move(smallest, donor, s)
        return {s: SpooledSplit(self.dir / f"{s}.jsonl", self.rows[s]["docs"]) for s in splits.SPLITS}
