"""The document record every source yields, and the error raised when a source is not installed."""

from __future__ import annotations

import dataclasses

from flexmoe_jax.errors import FlexmoeError


class SourceMissing(FlexmoeError, FileNotFoundError):
    """A corpus is not installed; the message names the package that provides it."""


@dataclasses.dataclass(frozen=True)
class Doc:
    """One document: its text, a stable id inside its source, and the source's name."""

    text: str
    id: str
    source: str
