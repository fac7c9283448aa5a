"""The FlexMix-mini configs and their sources: names, packages, licenses, availability, documents.

Each config is a real third-party corpus obtainable offline from Debian packages (``math``: a pinned
PyPI generator, :mod:`flexmoe_jax.data.mathgen`); how each is read is in
:mod:`flexmoe_jax.data.corpora`. No TensorFlow here. Table of sources and licenses: docs/data.md.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

from flexmoe_jax.data import corpora as C
from flexmoe_jax.data.doc import Doc, SourceMissing
from flexmoe_jax.errors import UserError

CLOSED_DOMAINS = ("code", "math", "literature", "humor", "techdocs")
PUBLIC_SOURCES = ("public_gcide", "public_wordnet", "public_foldoc")
CONFIGS = CLOSED_DOMAINS + PUBLIC_SOURCES
# Closed corpora the public mix is decontaminated against (math is generated, see splits.py).
DECONTAMINATE_AGAINST = ("code", "literature", "humor", "techdocs")


@dataclasses.dataclass(frozen=True)
class Source:
    config: str
    description: str
    packages: tuple[str, ...]  # Debian packages (apt) that provide it; empty for pip-based sources
    license: str
    url: str
    locate: Callable[[], list[Path]]  # the paths that must exist; raises SourceMissing otherwise
    read: Callable[[], Iterator[Doc]] | None  # None for generated sources (math)

    @property
    def is_public(self) -> bool:
        return self.config in PUBLIC_SOURCES


def _locate_math() -> list[Path]:
    return []  # installed on demand into an isolated directory, see mathgen.py


SOURCES: dict[str, Source] = {s.config: s for s in [
    Source("code", "Python 3.11 standard library source files (tests, encodings tables and "
           "generated files excluded)", C.CODE_PACKAGES, "PSF-2.0",
           "https://docs.python.org/3.11/license.html", C.locate_code, C.read_code),
    Source("math", "DeepMind mathematics_dataset 1.0.1 generator (train modules), run in an isolated "
           "environment with sympy 1.5.1; question/answer worksheets", (), "Apache-2.0 (generator)",
           "https://pypi.org/project/mathematics-dataset/", _locate_math, None),
    Source("literature", "King James Version of the Bible (1611), one document per chapter",
           C.BIBLE_PACKAGES, "public domain (text); GPL-2.0-or-later (bible-kjv program)",
           "https://packages.debian.org/bookworm/bible-kjv-text", C.locate_bible, C.read_bible),
    Source("humor", "BSD fortune cookie files (English, non-offensive set), one document per cookie",
           C.FORTUNE_PACKAGES, "BSD-4-Clause (fortune-mod); quotes by their cited authors",
           "https://packages.debian.org/bookworm/fortunes", C.locate_fortunes, C.read_fortunes),
    Source("techdocs", "Python 3.11 documentation, reStructuredText sources, one document per page",
           C.DOC_PACKAGES, "PSF-2.0", "https://packages.debian.org/bookworm/python3.11-doc",
           C.locate_docs, C.read_docs),
    Source("public_gcide", "GNU Collaborative International Dictionary of English 0.48 (Webster 1913 "
           "+ additions), one document per entry", C.GCIDE_PACKAGES, "GPL-2.0-or-later",
           "https://packages.debian.org/bookworm/dict-gcide", C.locate_gcide, C.read_gcide),
    Source("public_wordnet", "WordNet 3.0 synsets: lemmas and glosses, one document per synset",
           C.WORDNET_PACKAGES, "WordNet-3.0 (BSD-like)", "https://wordnet.princeton.edu/license-and-commercial-use",
           C.locate_wordnet, C.read_wordnet),
    Source("public_foldoc", "Free On-line Dictionary of Computing (2023-01-19), one document per entry",
           C.FOLDOC_PACKAGES, "GFDL-1.1-or-later", "https://packages.debian.org/bookworm/dict-foldoc",
           C.locate_foldoc, C.read_foldoc),
]}


def check_configs(configs) -> list[str]:
    """Validate config names (``public`` expands to the public sources); returns them in canonical order."""
    out = set()
    for c in configs:
        if c == "public":
            out.update(PUBLIC_SOURCES)
        elif c in SOURCES:
            out.add(c)
        else:
            raise UserError(f"unknown FlexMix-mini domain '{c}'; choose from {', '.join(CONFIGS)} or public")
    return [c for c in CONFIGS if c in out]


def ensure_available(configs, install_missing: bool = False) -> None:
    """Raise :class:`SourceMissing` naming the Debian package(s) of any missing corpus.

    With ``install_missing`` (root only) the missing packages are installed with apt-get first.
    """
    missing: list[str] = []
    for c in configs:
        try:
            SOURCES[c].locate()
        except SourceMissing:
            missing.extend(SOURCES[c].packages)
    if not missing:
        return
    if install_missing:
        install_packages(sorted(set(missing)))
    for c in configs:
        SOURCES[c].locate()


def install_packages(packages: list[str]) -> None:
    if shutil.which("apt-get") is None:
        raise SourceMissing(f"cannot install {' '.join(packages)}: apt-get not found (not a Debian system)")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise PermissionError(f"installing {' '.join(packages)} needs root: "
                              f"sudo apt-get install -y {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            raise SourceMissing(f"apt-get install {' '.join(packages)} failed: {tail[0]}")


@functools.lru_cache(maxsize=None)
def package_versions(config: str) -> dict[str, str]:
    """Installed versions of a source's Debian packages (or the interpreter, for code off Debian)."""
    src = SOURCES[config]
    out = {}
    if config == "code" and C.code_root() != C.DEBIAN_STDLIB:
        return {"python": sys.version.split()[0], "stdlib": str(C.code_root())}
    if config == "math":
        from flexmoe_jax.data import mathgen
        return dict(mathgen.PINS)
    for p in src.packages:
        try:
            r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", p], capture_output=True, text=True)
            out[p] = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"
        except FileNotFoundError:
            out[p] = "unknown"
    return out


def documents(config: str) -> Iterator[Doc]:
    """Every candidate document of an enumerable source, in a deterministic order."""
    src = SOURCES[config]
    if src.read is None:
        raise UserError(f"'{config}' is generated, not read; see flexmoe_jax.data.mathgen")
    src.locate()
    return src.read()
