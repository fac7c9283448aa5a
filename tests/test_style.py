"""The code style pyproject.toml declares (ruff: line length, import order, pyflakes) holds everywhere."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = str(Path(sys.executable).parent / "ruff")  # the test extra's pinned ruff, then any on PATH
    if not Path(exe).exists():
        exe = shutil.which("ruff") or exe
    if not Path(exe).exists():
        pytest.skip("ruff not installed (pip install -e '.[test]')")
    return [exe]


def test_ruff_passes():
    r = subprocess.run([*_ruff(), "check", "--output-format", "concise", str(REPO)], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-1000:]


def test_markers_are_declared():
    """--strict-markers: a test with an undeclared marker fails to collect, so the fast set stays honest."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow and not multiprocess",
                        str(REPO / "tests" / "test_style.py")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-1000:]
    assert "test_ruff_passes" in r.stdout
