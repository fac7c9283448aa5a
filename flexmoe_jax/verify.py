"""``flexmoe verify``: read back every array of any checkpoint and say which, if any, are damaged.

Works on anything the project writes (a model, an anchor, a dense expert, an expert deliverable, a
merged model, an anchor kit, a training run with its saved states): every Orbax array directory
under the path is read array by array, each chunk checked against its crc32c
(:mod:`flexmoe_jax.array_store`), and where a sha256 manifest exists (deliverables, merged models)
the arrays are also compared with it, so a copy that was altered and re-encoded is caught too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flexmoe_jax import array_store, checkpoint, storage


@dataclasses.dataclass
class Report:
    path: Path
    kind: str
    arrays: int = 0
    directories: int = 0
    uncoded: list[str] = dataclasses.field(default_factory=list)
    damaged: list[str] = dataclasses.field(default_factory=list)   # "subdir: array"

    @property
    def ok(self) -> bool:
        return not self.damaged

    def line(self) -> str:
        if not self.ok:
            fix = "re-copy it from its source (or rerun the command that wrote it)"
            if self.kind == "training run":
                fix = ("delete each damaged state/<step> directory to resume from the step before it, "
                       "or " + fix)
            return f"DAMAGED {self.path} ({self.kind}): {', '.join(self.damaged)}; {fix}"
        codes = ("crc32c on every chunk" if not self.uncoded else
                 f"no integrity codes in {', '.join(self.uncoded)} (written before they existed): readable, "
                 "but damage inside a chunk cannot be detected")
        return f"ok {self.path} ({self.kind}, {self.arrays} arrays in {self.directories} array directories, {codes})"


def _array_dirs(root: Path) -> list[Path]:
    """Every Orbax PyTree directory under ``root`` (it holds a ``_METADATA`` file)."""
    found = [root] if (root / "_METADATA").is_file() else []
    return found + sorted(p.parent for p in storage.files(root) if p.name == "_METADATA" and p.parent != root
                          and not any(part.endswith(("tmp", "-tmp")) or ".orbax-checkpoint-tmp" in part
                                      for part in p.parent.relative_to(root).parts))


def _kind(root: Path) -> str:
    marker = root / checkpoint.MARKER_NAME
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("kind", "model")
        except ValueError:
            return "checkpoint with a damaged marker"
    if (root / "state").is_dir() or (root / "model").is_dir():
        return "training run"
    return "array directory"


def _recorded(root: Path) -> dict[Path, dict]:
    """sha256 manifests: {array directory: {array: checksum}} where the checkpoint has them."""
    out = {}
    sums = root / checkpoint.CHECKSUMS_NAME
    if sums.is_file():
        out[root / checkpoint.PARAMS_DIR] = checkpoint.recorded_checksums(root)
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
            for part in [m.get("shared", {}), *m.get("experts", [])]:
                if isinstance(part, dict) and "dir" in part and "checksums" in part:
                    out[root / part["dir"]] = part["checksums"]
        except (ValueError, AttributeError):
            pass
    return out


def verify(path: str | Path) -> Report:
    """Read back every array under ``path``; a :class:`Report` of what is damaged."""
    root = storage.resolve(path)
    if storage.is_remote(root) and (root / checkpoint.MARKER_NAME).is_file():
        root = checkpoint.directory(root)  # object storage: the pointer's current generation
    if not root.exists():
        raise FileNotFoundError(f"nothing to verify at {root}: it does not exist")
    dirs = _array_dirs(root)
    if not dirs:
        raise checkpoint.CheckpointError(f"{root} holds no flexmoe arrays (no Orbax array directory under it); "
                                         "give a checkpoint, merged model, deliverable or training run directory")
    report = Report(root, _kind(root), directories=len(dirs))
    recorded = _recorded(root)
    for d in dirs:
        rel = str(d.relative_to(root)) or "."
        try:
            names = array_store.array_names(d)
        except checkpoint.CheckpointError:
            report.damaged.append(f"{rel}: array metadata unreadable")
            continue
        report.arrays += len(names)
        if not array_store.has_codes(d):
            report.uncoded.append(rel)
        bad = array_store.damaged_arrays(d)
        report.damaged += [f"{rel}: {a}" for a in bad]
        if d in recorded and not bad:
            sums = checkpoint.array_checksums(array_store.read_arrays(d))
            for name, want in recorded[d].items():
                have = sums.get(name)
                if have is None or have["sha256"] != want.get("sha256"):
                    report.damaged.append(f"{rel}: {name} (sha256 differs from the manifest)")
    return report


def main(paths: list[str]) -> int:
    """Print one line per path; 2 if any is damaged, else 0."""
    status = 0
    for p in paths:
        r = verify(p)
        print(r.line(), flush=True)
        if not r.ok:
            status = 2
    return status
