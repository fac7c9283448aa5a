"""Planted canaries (Carlini et al.'s secret sharer): random secrets of a fixed format inserted into an
owner's documents a known number of times, and the candidates each is ranked against.

A canary is ``PREFIX + secret`` with a secret of ``LENGTH`` random characters from ``ALPHABET``; its
exposure through an artifact is the rank of the true secret's score among ``candidates`` fresh
secrets of the same format (:func:`flexmoe_jax.privacy.attacks.exposure`). Nothing here knows the
data; :func:`plant` returns the documents with the canaries in.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from flexmoe_jax.errors import UserError

PREFIX = "my access code is "
ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
LENGTH = 8
REPEATS = (1, 4, 16)


@dataclasses.dataclass(frozen=True)
class Canary:
    secret: str
    repeats: int

    @property
    def text(self) -> str:
        return PREFIX + self.secret


def secrets(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` random secrets of the canary format."""
    idx = rng.integers(0, len(ALPHABET), size=(n, LENGTH))
    return ["".join(ALPHABET[i] for i in row) for row in idx]


def make(per_repeat: int = 4, repeats: Sequence[int] = REPEATS, seed: int = 0) -> list[Canary]:
    """``per_repeat`` canaries for each insertion count in ``repeats``."""
    rng = np.random.default_rng([seed, 0xCA7A])
    return [Canary(s, r) for r in repeats for s in secrets(per_repeat, rng)]


def plant(documents: Sequence[str], canaries: Sequence[Canary], seed: int = 0) -> list[str]:
    """The documents with each canary's text appended (as its own line) to ``repeats`` distinct,
    randomly chosen documents."""
    docs = list(documents)
    need = max((c.repeats for c in canaries), default=0)
    if need > len(docs):
        raise UserError(f"a canary inserted {need} times needs at least {need} documents, got {len(docs)}")
    rng = np.random.default_rng([seed, 0x9147])
    for c in canaries:
        for i in rng.choice(len(docs), size=c.repeats, replace=False):
            docs[i] = docs[i].rstrip("\n") + "\n" + c.text + "\n"
    return docs


def save(path: str | os.PathLike, canaries: Sequence[Canary]) -> Path:
    """Write the canaries (the owner keeps this file: it holds the secrets) as JSON."""
    path = Path(path)
    path.write_text(json.dumps({"prefix": PREFIX, "canaries": [dataclasses.asdict(c) for c in canaries]}, indent=1))
    return path


def load(path: str | os.PathLike) -> list[Canary]:
    try:
        raw = json.loads(Path(path).read_text())
        if raw.get("prefix") != PREFIX:
            raise ValueError(f"prefix {raw.get('prefix')!r} is not this version's {PREFIX!r}")
        return [Canary(str(c["secret"]), int(c["repeats"])) for c in raw["canaries"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a canary file written by flexmoe_jax.privacy.canaries.save ({e})") from e
