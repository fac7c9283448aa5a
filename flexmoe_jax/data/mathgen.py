"""The math domain: DeepMind's ``mathematics_dataset`` generator, pinned and run in an isolated environment.

:func:`ensure_installed` pip-installs :data:`PINS` into ``tools_dir()`` (``$FLEXMOE_TOOLS_DIR``, default
``~/.cache/flexmoe_jax/tools``); :class:`Generator` runs it as ``python -S`` subprocesses. Document ``i``
of a split is a worksheet of :data:`PROBLEMS_PER_DOC` questions with answers, a pure function of
``(seed, split, i)`` whatever the number of workers. Why it is isolated and how it is made
deterministic: docs/data.md ("The domains").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from flexmoe_jax.data.doc import Doc, SourceMissing
from flexmoe_jax.errors import UserError

PINS = {"mathematics-dataset": "1.0.1", "sympy": "1.5.1", "numpy": "1.23.5", "mpmath": "1.3.0",
        "absl-py": "2.5.1", "six": "1.17.0"}
PROBLEMS_PER_DOC = 8
# polynomials__add fails on ~99.9% of samples with these pins (a numpy int64 reaches sympy's
# diophantine solver); it is left out rather than retried forever.
BROKEN_MODULES = ("polynomials__add",)

_DRIVER = r'''
import hashlib, json, os, random, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from mathematics_dataset.modules import modules
from mathematics_dataset import generate_settings as gs
from mathematics_dataset.util import composition
# Determinism. (1) composition puts Entity objects in a set (hash = memory address) before
# shuffling them: hash entities by creation order instead. (2) sympy keeps global state that
# changes how many random numbers later calls draw (caches, the prime sieve): every document is
# generated in a fork of the same parent, so it starts from the same state whatever came before.
_counter = [0]
_init = composition.Entity.__init__
def _entity_init(self, *a, **k):
    _counter[0] += 1
    self._flexmoe_order = _counter[0]
    _init(self, *a, **k)
composition.Entity.__init__ = _entity_init
composition.Entity.__hash__ = lambda self: self._flexmoe_order
seed, per_doc = sys.argv[2], int(sys.argv[3])
broken = set(sys.argv[4].split(",")) if len(sys.argv) > 4 and sys.argv[4] else set()
flat = {}
def add(d, prefix=None):
    for k, v in d.items():
        name = k if prefix is None else prefix + "__" + k
        if isinstance(v, dict):
            add(v, name)
        elif name not in broken:
            flat[name] = v
add(modules.train(lambda r: r))
names = sorted(flat)

def make(split, i):
    h = int(hashlib.sha256(f"{seed}/{split}/{i}".encode()).hexdigest()[:16], 16)
    random.seed(h)
    np.random.seed(h % (2 ** 32))
    name = names[h % len(names)]
    problems, tries = [], 0
    while len(problems) < per_doc and tries < 20 * per_doc:
        tries += 1
        try:
            p = flat[name]()
        except Exception:
            continue
        q, a = str(p.question), str(p.answer)
        if len(q) > gs.MAX_QUESTION_LENGTH or len(a) > gs.MAX_ANSWER_LENGTH:
            continue
        problems.append((q, a))
    text = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in problems)
    return json.dumps({"split": split, "i": i, "module": name, "text": text}) + "\n"

# Warm up (lazy imports, caches, the prime sieve) identically in every worker, so that each fork
# starts warm and from the same state.
random.seed(20250707)
np.random.seed(20250707)
for _name in names:
    for _ in range(2):
        try:
            flat[_name]()
        except Exception:
            pass

for line in sys.stdin:
    split, i = line.split()
    i = int(i)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            data = make(split, i).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    out = b"".join(chunks).decode()
    if not out:
        sys.exit(f"document {split}/{i} failed")
    sys.stdout.write(out)
    sys.stdout.flush()
'''


def tools_dir() -> Path:
    return Path(os.environ.get("FLEXMOE_TOOLS_DIR", Path.home() / ".cache" / "flexmoe_jax" / "tools"))


def _target() -> Path:
    tag = hashlib.sha256(json.dumps(PINS, sort_keys=True).encode()).hexdigest()[:10]
    return tools_dir() / f"mathematics_dataset-py{sys.version_info[0]}{sys.version_info[1]}-{tag}"


def ensure_installed() -> Path:
    """Install the pinned generator into its own directory (once); returns that directory."""
    target = _target()
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
               "--no-warn-script-location", "--target", str(tmp), *[f"{k}=={v}" for k, v in PINS.items()]]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            raise SourceMissing(
                "source for 'math' not available: could not pip-install the isolated generator "
                f"({', '.join(f'{k}=={v}' for k, v in PINS.items())}) into {target}: {last[0]}")
        (tmp / ".complete").write_text(json.dumps(PINS))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class Generator:
    """A pool of generator processes (each: imports, warm-up, then one fork per document).

    ``docs(split, max_docs, max_bytes)`` yields documents ``0, 1, 2, ...`` of a split in order;
    document ``i`` goes to worker ``i % workers`` and only depends on ``(seed, split, i)``, so the
    output is the same for any number of workers. Use as a context manager.
    """

    def __init__(self, seed: int, workers: int | None = None):
        self.seed = seed
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._procs: list[subprocess.Popen] = []

    def _start(self):
        if self._procs:
            return
        target = ensure_installed()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        env["PYTHONHASHSEED"] = "0"
        self._procs = [subprocess.Popen(
            [sys.executable, "-S", "-c", _DRIVER, str(target), str(self.seed), str(PROBLEMS_PER_DOC),
             ",".join(BROKEN_MODULES)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(target),
            text=True) for _ in range(self.workers)]

    def _read(self, split: str, i: int) -> dict:
        p = self._procs[i % self.workers]
        line = p.stdout.readline()
        if not line:
            p.kill()
            err = p.stderr.read().strip().splitlines()[-3:]
            raise RuntimeError(f"math generator stopped at document {split}/{i}: {' | '.join(err)}")
        rec = json.loads(line)
        if (rec["split"], rec["i"]) != (split, i):  # pragma: no cover - protocol invariant
            raise RuntimeError(f"math generator out of sync: wanted {split}/{i}, got {rec['split']}/{rec['i']}")
        return rec

    def docs(self, split: str, max_docs: int | None = None, max_bytes: int | None = None) -> Iterator[Doc]:
        if max_docs is None and max_bytes is None:
            raise UserError("math is generated: give max_docs or max_bytes")
        self._start()
        count = max_docs if max_docs is not None else 10 ** 9
        window = 2 * self.workers
        sent = done = total = 0
        try:
            while done < count:
                while sent < count and sent - done < window:
                    p = self._procs[sent % self.workers]
                    p.stdin.write(f"{split} {sent}\n")
                    p.stdin.flush()
                    sent += 1
                rec = self._read(split, done)
                done += 1
                doc = Doc(text=rec["text"], id=f"{split}:{rec['i']}:{rec['module']}", source="mathematics_dataset")
                yield doc
                total += len(doc.text.encode("utf-8"))
                if max_bytes is not None and total >= max_bytes:
                    break
        finally:
            while done < sent and all(p.poll() is None for p in self._procs):  # drain what is in flight
                self._read(split, done)
                done += 1

    def close(self):
        for p in self._procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
        self._procs = []

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc):
        self.close()


def generate(split: str, seed: int, max_docs: int | None = None, max_bytes: int | None = None,
             workers: int | None = None) -> Iterator[Doc]:
    """Documents ``0, 1, 2, ...`` of ``split``, until ``max_docs`` or ``max_bytes`` (UTF-8) is reached."""
    with Generator(seed, workers) as g:
        yield from g.docs(split, max_docs, max_bytes)
