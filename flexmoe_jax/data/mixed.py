"""Mixed-domain evaluation documents: held-out text of two or three closed domains in one document.

Per-domain bits per byte rewards one model per document: a document of one domain is best served by
that domain's model, which BTM's and density routing's per-document choices find. Text that mixes
domains inside one document (a program with its documentation, a story quoting scripture) is where
token-level routing should beat any single owner's model. :func:`build` makes such documents with a
fixed seed from the closed domains' **test** splits (never trained on): each takes, from each of 2 or
3 distinct domains in random order, a run of whole lines of about ``part_chars`` characters from one
held-out document of that domain, joined by newlines. A document stays shorter than one evaluation
piece (``DEFAULT_SEQ_LEN`` tokens at the demo's tokenizers) so its domain switches happen inside the
context a model routes by, not at piece boundaries.

The documents are written like an owner's data (tfds ``flexmix_owner/NAME``, seqio task ``NAME``:
:mod:`flexmoe_jax.data.owner`), every one in the **test** split, its ``source`` naming its domains in
order (``"code+math"``), and its manifest marking ``"kind": "evaluation"`` with the seed and the
sizes. The same settings on the same data are a no-op. ``flexmoe eval --tasks mixed_domains`` scores
it; the per-domain average never includes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from flexmoe_jax.data import layout as L, splits
from flexmoe_jax.data.doc import Doc
from flexmoe_jax.errors import UserError
from flexmoe_jax.storage import write_json

MIXED_TASK = "mixed_domains"
DEFAULT_DOCS = 240
DEFAULT_PART_CHARS = 160  # about 50-90 tokens of most domains at a 1-4k vocabulary: 2-3 parts fit one piece


def _lines(text: str) -> list[str]:
    return [ln for ln in text.split("\n") if ln.strip()]


def part_of(text: str, part_chars: int, rng: np.random.Generator) -> str:
    """A run of whole non-blank lines of ``text`` starting at a random line, about ``part_chars``
    characters (at least one line; a single longer line is cut after the last word that fits)."""
    lines = _lines(text)
    if not lines:
        return ""
    start = int(rng.integers(len(lines)))
    out, n = [], 0
    for ln in lines[start:]:
        if out and n + len(ln) > part_chars:
            break
        out.append(ln)
        n += len(ln) + 1
    part = "\n".join(out)
    if len(part) > 2 * part_chars:
        cut = part.rfind(" ", 0, part_chars)
        part = part[: cut if cut > 0 else part_chars]
    return part


def make_documents(texts: dict[str, Sequence[str]], n_docs: int = DEFAULT_DOCS, parts: Sequence[int] = (2, 3),
                   part_chars: int = DEFAULT_PART_CHARS, seed: int = 0) -> list[Doc]:
    """Up to ``n_docs`` distinct mixed documents from ``texts`` ({domain: held-out documents}); see the
    module docstring. Documents alternate between the sizes in ``parts``; ``Doc.source`` is
    ``"+".join(domains)``. Fewer come back only when the held-out text cannot make more distinct ones
    (a duplicate draw is dropped; at most 20 draws per document)."""
    domains = [d for d in texts if any(_lines(t) for t in texts[d])]
    if len(domains) < min(parts):
        raise UserError(f"mixed documents need held-out text of at least {min(parts)} domains; got "
                        f"{sorted(domains)}")
    usable = {d: [t for t in texts[d] if _lines(t)] for d in domains}
    rng = np.random.default_rng(seed)
    docs, seen = [], set()
    for _ in range(20 * n_docs):
        if len(docs) == n_docs:
            break
        k = min(int(parts[len(docs) % len(parts)]), len(domains))
        chosen = [domains[j] for j in rng.choice(len(domains), size=k, replace=False)]
        text = "\n".join(part_of(usable[d][int(rng.integers(len(usable[d])))], part_chars, rng) for d in chosen)
        if splits.normalize(text) in seen:
            continue
        seen.add(splits.normalize(text))
        docs.append(Doc(text=text, id=f"mixed-{len(docs)}", source="+".join(chosen)))
    return docs


def build(data_dir, domains: Sequence[str] | None = None, name: str = MIXED_TASK, n_docs: int = DEFAULT_DOCS,
          parts: Sequence[int] = (2, 3), part_chars: int = DEFAULT_PART_CHARS, seed: int = 0, log=None) -> dict:
    """Write the mixed-domain documents of ``data_dir``'s closed domains (default: every one built)
    as the evaluation task ``name``; returns its manifest (see the module docstring)."""
    from flexmoe_jax.data import owner, tasks, tokenizer as T
    from flexmoe_jax.data.manifest import read_manifest
    from flexmoe_jax.data.sources import CLOSED_DOMAINS
    from flexmoe_jax.data.tfds_io import read_split_texts

    log = log or (lambda m: None)
    data_dir = Path(data_dir)
    built = read_manifest(data_dir).get("configs", {})
    domains = list(domains or [d for d in CLOSED_DOMAINS if d in built])
    missing = [d for d in domains if d not in built or not L.dataset_ready(data_dir, L.FLEXMIX_NAME, d)]
    if missing:
        raise UserError(f"no built domain(s) {missing} in {data_dir}: run `flexmoe data build` first")
    vocab_path = L.tokenizer_path(data_dir)
    settings = {"domains": domains, "n_docs": n_docs, "parts": list(parts), "part_chars": part_chars, "seed": seed,
                "data": {d: built[d].get("key") for d in domains},
                "vocab": hashlib.sha256(vocab_path.read_bytes()).hexdigest(), "format": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    man_path = L.owners_dir(data_dir) / f"{name}.json"
    if man_path.exists() and L.dataset_ready(data_dir, L.OWNER_NAME, name):
        old = json.loads(man_path.read_text())
        if old.get("key") == key:
            tasks.register_tasks(data_dir)
            return old
    owner.check_name(name, data_dir)
    texts = {d: read_split_texts(data_dir, L.FLEXMIX_NAME, d, "test") for d in domains}
    docs = splits.dedup(make_documents(texts, n_docs, parts, part_chars, seed))
    by_split = {s: [] for s in splits.SPLITS}
    by_split["test"] = sorted(docs.items())
    owner._write_tfds(data_dir, name, by_split, key)
    own = L.owners_dir(data_dir) / name
    own.mkdir(parents=True, exist_ok=True)
    (own / "spm.model").write_bytes(vocab_path.read_bytes())
    sp = T.processor(vocab_path)
    test = [d.text for _, d in by_split["test"]]
    mix: dict[str, int] = {}
    for _, d in by_split["test"]:
        mix[d.source] = mix.get(d.source, 0) + 1
    manifest = {"name": name, "key": key, "task": name, "tfds": L.tfds_name(L.OWNER_NAME, name), "kind": "evaluation",
                "made_by": "flexmoe_jax.data.mixed", **settings,
                "splits": {"train": {"docs": 0, "bytes": 0, "tokens": 0},
                           "validation": {"docs": 0, "bytes": 0, "tokens": 0},
                           "test": {"docs": len(test), "bytes": sum(len(t.encode("utf-8")) for t in test),
                                    "tokens": int(sum(T.count_tokens(sp, test)))}},
                "mixtures": dict(sorted(mix.items()))}
    write_json(man_path, manifest)
    tasks.register_tasks(data_dir)
    log(f"mixed-domain documents: {len(test)} test documents of {len(domains)} domains "
        f"({manifest['splits']['test']['tokens']:,} tokens) as task '{name}'")
    return manifest
