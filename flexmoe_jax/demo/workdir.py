"""One demo work directory: its paths, its plan, per-phase wall times and the shared helpers of every phase."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flexmoe_jax import storage
from flexmoe_jax.demo import plan as plan_lib
from flexmoe_jax.demo.plan import Plan

RESULTS = "results"


def log(msg: str) -> None:
    print(msg, flush=True)


class Workdir:
    """Paths of one demo run and its per-phase timing (kept across resumed runs)."""

    def __init__(self, root: str | os.PathLike, plan: Plan):
        self.root = Path(root).resolve()
        self.plan = plan
        self.data = self.root / "data"
        self.results = self.root / RESULTS
        self.timing_file = self.results / "timing.json"

    def owner_data(self, domain: str) -> Path:
        return self.root / "owners" / domain / "data"

    def expert(self, domain: str, variant: str = "") -> Path:
        """An owner's run directory: ``experts/`` for the default recipe, ``experts_<variant>/`` else."""
        return self.root / (f"experts_{variant}" if variant else "experts") / domain

    def claim(self) -> None:
        """Record the plan; refuse a directory made by another mode (DemoError)."""
        self.root.mkdir(parents=True, exist_ok=True)
        plan_lib.claim(self.root, self.plan)
        self.results.mkdir(parents=True, exist_ok=True)

    def timing(self) -> dict:
        return json.loads(self.timing_file.read_text()) if self.timing_file.exists() else {}

    def record(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to the phase's wall time (a resumed run adds to what earlier runs spent)."""
        t = self.timing()
        t[phase] = round(t.get(phase, 0.0) + seconds, 1)
        storage.write_json(self.timing_file, t, sort_keys=False)


def complete(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a finished checkpoint (its marker file)."""
    from flexmoe_jax import checkpoint

    return (model_dir / checkpoint.MARKER_NAME).is_file()


class Phase:
    """``with Phase(w, "anchor"):`` prints a header and records the wall time of the phase."""

    def __init__(self, w: Workdir, name: str):
        self.w, self.name = w, name

    def __enter__(self):
        log(f"\n== {self.name} ==")
        self.t = time.perf_counter()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            secs = time.perf_counter() - self.t
            self.w.record(self.name, secs)
            log(f"   {self.name}: {secs:.0f} s")


def compile_cache(w: Workdir) -> None:
    """One persistent compilation cache per work directory, for this process and the owners' processes."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(w.root / "cache" / "xla"))
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
