"""The code style pyproject.toml declares (ruff: line length, import order, pyflakes) holds everywhere."""

import ast
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


# ------------------------------------------------------------------------------ the package's structure
MAX_LINES = 420  # "each file readable in one sitting": a few hundred lines (docs/ holds the rationale)


def _modules() -> dict[str, Path]:
    root = REPO / "flexmoe_jax"
    out = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (function-level imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found |= {full} if full in known else ({base} if base in known else set())
    return found - {name}


def test_no_import_circles():
    """Layers without circles (README, Layout): the module import graph is acyclic."""
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # A package imports its own submodules to re-export them; only edges between siblings and across
    # packages can make a circle that matters, so drop parent -> own-child edges.
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_module_is_short():
    long = {str(p.relative_to(REPO)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concept (over {MAX_LINES} lines): {long}"


# The layers of the README's Layout table, lowest first: a module may import from its own layer and
# the ones before it, never from a later one (so "where does X live" has one answer per layer).
LAYERS = {
    "foundations": ["errors", "config", "storage", "sharding", "distributed", "optim", "tf_quiet"],
    "data": ["data"],
    "model": ["layers", "moe", "transformer", "model", "selection"],
    "training": ["lm_loss", "train", "hlo_parse", "hlo_count", "flops"],
    "checkpoints": ["array_store", "atomic_dir", "checksums", "restore_targets", "checkpoint", "verify", "hf"],
    "flexolmo": ["routing", "private_stats", "loading", "generate", "expert", "router_init", "anchor_kit",
                 "merge_inputs", "merge_slots", "merge", "baselines"],
    "runs": ["trainer", "router_tune", "compile_check"],
    "evaluation": ["evaluation", "eval", "soup_weights", "trained_docs", "privacy"],
    "applications": ["demo", "cli"],
}


def test_layers_import_only_downward():
    rank = {top: i for i, names in enumerate(LAYERS.values()) for top in names}
    mods = _modules()
    tops = {m: m.split(".")[1] for m in mods if m != "flexmoe_jax"}
    assert not set(tops.values()) - set(rank), f"add to LAYERS: {sorted(set(tops.values()) - set(rank))}"
    upward = [f"{m} -> {t}" for m, p in mods.items() if m in tops
              for t in sorted(_imports(m, p, set(mods))) if t in tops and rank[tops[t]] > rank[tops[m]]]
    assert not upward, "imports from a later layer (README, Layout): " + "; ".join(upward)
