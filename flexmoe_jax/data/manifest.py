"""A data directory's ``manifest.json``: what was built, from which arguments (keys per step)."""

from __future__ import annotations

import json
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def read_manifest(data_dir) -> dict:
    """The manifest of ``data_dir``; an empty one if it is missing or of another format."""
    p = Path(data_dir) / MANIFEST
    if not p.exists():
        return {"format": FORMAT_VERSION, "configs": {}}
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT_VERSION:
        return {"format": FORMAT_VERSION, "configs": {}}
    return m
