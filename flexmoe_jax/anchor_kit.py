"""The anchor kit: what a model builder publishes for every owner to train against.

A kit (``KIT/``, kind ``"anchor_kit"``) holds the dense anchor (``model/``), the one public router row
every owner uses as row 0 (``public_router.npy``, ``[L, d]``), the public routing stats, the
router-init method and (for ``embedder`` / ``minilm``) its fitted embedding map, all listed with
their sha256 in ``kit.json``. :func:`build` publishes one (local paths only); :func:`open_kit`
opens and verifies one (:class:`~flexmoe_jax.checkpoint.CheckpointError` if damaged);
:meth:`Kit.owner_row` computes an owner's own row by the kit's method. Why a kit, its layout and
the methods: docs/merge.md ("The anchor kit").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from flexmoe_jax import checkpoint, expert, loading, private_stats, router_init, routing, storage
from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError

KIND = "anchor_kit"
FORMAT = "flexmoe_jax.anchor_kit"
KIT_FILE = "kit.json"
METHODS = ("hidden", "embedder", "minilm", "zeros", "random")


def _local_only(path: str | os.PathLike) -> None:
    if storage.is_remote(path):
        raise UserError(f"anchor kit {path}: kits are built and read on local paths only (the kit links the "
                        "anchor's files in place); copy it to a local directory, e.g. gsutil -m cp -r, and give that")


def is_kit(path: str | os.PathLike) -> bool:
    if storage.is_remote(path):
        p = storage.resolve(path)
        if (p / KIT_FILE).is_file() or any((g / KIT_FILE).is_file() for g in p.glob("g[0-9]*")):
            _local_only(path)
        return False
    p = Path(os.fspath(path))
    return (p / KIT_FILE).is_file() and (p / checkpoint.MARKER_NAME).is_file()


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a checkpoint directory as hard links where the filesystem allows (no bytes duplicated)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def build(anchor: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike, *,
          method: str = "hidden", public_task: str = "flexmix_mini.public", seq_len: int = 128,
          num_batches: int = 8, num_docs: int = 256, seed: int = 0) -> Path:
    """Publish the kit of ``anchor`` at ``out`` (atomically); public data of ``data_dir`` only."""
    _local_only(out)
    from flexmoe_jax import data

    if method not in METHODS:
        raise UserError(f"router-init method must be one of {METHODS}, got {method!r}")
    config, params = loading.load(anchor)
    if config.is_moe:
        raise UserError(f"{anchor} is not a dense anchor (it has experts {list(config.names)})")
    import jax

    params = jax.device_get(params)
    L, d = config.n_layers, config.d_model
    settings = {"method": method, "public_task": public_task, "seq_len": seq_len, "seed": seed}
    emb_map = None
    if method == "hidden":
        batches = data.batches(public_task, "train", 16, seq_len, data_dir, seed=seed + 1)
        row = router_init.mean_direction(config, params, batches, num_batches)
        settings["num_batches"] = num_batches
    elif method in ("embedder", "minilm"):
        texts = router_init.documents(public_task, data_dir, num_docs)
        x = router_init.embedder()(texts)
        y = router_init.document_directions(config, params, [data.sentencepiece(data_dir).encode(t) for t in texts],
                                            seq_len)
        if method == "embedder":
            y = y.mean(axis=1, keepdims=True)  # one map for every layer
        proj = router_init.fit_projection(x, y)
        row = np.broadcast_to(proj(x.mean(0)), (L, d)).astype(np.float32)
        emb_map = proj
        settings.update(num_docs=len(texts), embedder=router_init.EMBED_PACKAGE,
                        loo_r2=[round(float(r), 4) for r in proj.loo_r2])
    elif method == "random":
        row = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (L, d)) * config.init_std, np.float32)
    else:
        row = np.zeros((L, d), np.float32)
    # Public data, released through the owners' mechanism so every expert's model is estimated alike.
    stats = private_stats.fit(data_dir, public_task, routing.PUBLIC, seq_len=seq_len, vocab_size=config.vocab_size,
                              seed=seed)

    with checkpoint.writing(out, kind=KIND) as tmp:
        _link_tree(checkpoint.directory(anchor), tmp / "model")
        np.save(tmp / "public_router.npy", np.asarray(row, np.float32))
        stats.save(tmp / routing.STATS_FILE)
        files = ["public_router.npy", routing.STATS_FILE]
        if emb_map is not None:
            np.savez(tmp / "embed_map.npz", **dataclasses.asdict(emb_map))
            files.append("embed_map.npz")
        meta = {"format": FORMAT, "version": 1, "anchor_fingerprint": expert.fingerprint(config, params),
                "anchor_source": os.path.abspath(os.fspath(anchor)), "router_init": settings,
                "files": {f: _sha256(tmp / f) for f in files}}
        (tmp / KIT_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return storage.resolve(out)


@dataclasses.dataclass(frozen=True)
class Kit:
    """An opened, verified kit."""

    path: Path
    meta: dict
    kit_id: str  # sha256 of kit.json: names the kit in every deliverable trained against it

    @property
    def anchor(self) -> Path:
        return self.path / "model"

    @property
    def method(self) -> str:
        return self.meta["router_init"]["method"]

    def public_row(self) -> np.ndarray:
        return np.load(self.path / "public_router.npy")

    def embed_map(self) -> router_init.Projection:
        with np.load(self.path / "embed_map.npz") as z:
            return router_init.Projection(**{k: z[k] for k in z.files})

    def owner_row(self, config: ModelConfig, params, *, data_dir, task: str, seq_len: int, seed: int,
                  num_batches: int = 8, num_docs: int = 256) -> np.ndarray:
        """[L, d] the owner's router row by the kit's method, from the owner's own data only."""
        from flexmoe_jax import data

        L, d = config.n_layers, config.d_model
        m = self.method
        if m == "hidden":
            batches = data.batches(task, "train", 16, seq_len, data_dir, seed=seed + 1)
            return router_init.mean_direction(config, params, batches, num_batches)
        if m in ("embedder", "minilm"):
            x = router_init.embedder()(router_init.documents(task, data_dir, num_docs))
            return np.broadcast_to(self.embed_map()(x.mean(0)), (L, d)).astype(np.float32)
        if m == "random":
            import jax

            return np.asarray(jax.random.normal(jax.random.PRNGKey(seed + 1), (L, d)) * config.init_std, np.float32)
        return np.zeros((L, d), np.float32)


def open_kit(path: str | os.PathLike) -> Kit:
    """Open ``path`` and check every file against ``kit.json`` (a damaged kit is refused)."""
    p = storage.resolve(path)
    if not is_kit(p):
        raise checkpoint.CheckpointError(f"{p} is not an anchor kit (no {KIT_FILE}); build one with "
                                         "`flexmoe anchor-kit`")
    raw = (p / KIT_FILE).read_bytes()
    try:
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise UserError(f"format {meta.get('format')!r}")
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{p / KIT_FILE} is not a valid kit description ({e}); "
                                         "re-copy the kit") from None
    for f, want in meta["files"].items():
        if not (p / f).is_file() or _sha256(p / f) != want:
            raise checkpoint.CheckpointError(f"anchor kit {p}: {f} is missing or does not match its sha256 in "
                                             f"{KIT_FILE}; the kit is damaged (re-copy it from the model builder)")
    return Kit(p, meta, hashlib.sha256(raw).hexdigest())
