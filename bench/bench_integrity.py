"""What verifying every array on read costs: checkpoint load time with and without integrity codes.

    python bench/bench_integrity.py [--quick] [--layers N] [--rounds R] [--dir DIR]

Two models with random fp32 weights (random floats do not compress, like trained ones): ``tiny``
(the test model) and ``1B-shaped`` (``gin_configs/model/olmo2_1b.gin``'s widths, ``--layers`` of its
16 layers; the table states the bytes). Each is saved three ways, the same arrays each time:

- ``crc32c``: as every checkpoint is written now (zarr v3, a crc32c on every chunk, checked by
  TensorStore on every read: ``flexmoe_jax.array_store``);
- ``zarr3, no codes``: the same format with the chunk crc32c left out (what the codes alone cost);
- ``zarr2 (before)``: Orbax's default format, as checkpoints were written before the codes.

Then ``checkpoint.load`` of each, interleaved round by round, after one warm-up read of each (so all
read from the page cache alike); the table gives the median seconds and the ratio to the codes-free
zarr3 load (target: <= 1.10). A benchmark: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _configs(layers: int, quick: bool):
    from flexmoe_jax.config import ModelConfig, tiny

    out = {"tiny": tiny()}
    if not quick:
        out[f"1B-shaped ({layers} layers)"] = ModelConfig(vocab_size=100352, d_model=2048, n_layers=layers,
                                                          n_heads=16, mlp_hidden=8192, max_seq_len=4096)
    return out


def _random_params(config):
    import jax
    import numpy as np

    from flexmoe_jax import model

    shapes = model.param_shapes(config)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, dtype=np.float32)).astype(s.dtype), shapes)


def _save_variants(root: Path, config, params) -> dict[str, Path]:
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization import tensorstore_utils as tu

    from flexmoe_jax import array_store, checkpoint

    paths = {"crc32c": checkpoint.save(root / "crc32c", config, params)}
    array_store.pytree_handler()  # installs the chunk codec
    with_crc = tu._build_zarr3_metadata
    tu._build_zarr3_metadata = with_crc.__wrapped__  # the same zarr3 layout, no chunk crc32c
    try:
        paths["zarr3, no codes"] = checkpoint.save(root / "zarr3", config, params)
    finally:
        tu._build_zarr3_metadata = with_crc
    old = root / "zarr2"
    shutil.copytree(paths["crc32c"], old)
    shutil.rmtree(old / checkpoint.PARAMS_DIR)
    ocp.PyTreeCheckpointer().save(old / checkpoint.PARAMS_DIR, args=ocp.args.PyTreeSave(jax.device_get(params)))
    marker = json.loads((old / checkpoint.MARKER_NAME).read_text())
    marker.pop("integrity", None)
    (old / checkpoint.MARKER_NAME).write_text(json.dumps(marker))
    paths["zarr2 (before)"] = old
    return paths


def _load_seconds(path: Path) -> float:
    import jax

    from flexmoe_jax import checkpoint

    t = time.perf_counter()
    _, params = checkpoint.load(path)
    jax.block_until_ready(params)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    args = ap.parse_args()
    import logging

    import jax

    logging.getLogger("flexmoe_jax.checkpoint").setLevel(logging.ERROR)  # the zarr2 copy's "no codes" warning
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, config in _configs(args.layers, args.quick).items():
            root = Path(tmp) / name.split()[0]
            root.mkdir()
            params = _random_params(config)
            nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
            paths = _save_variants(root, config, params)
            del params
            times = {k: [] for k in paths}
            for k, p in paths.items():
                _load_seconds(p)  # warm-up: page cache, compilation of nothing, Orbax's first-use costs
            for _ in range(args.rounds):
                for k, p in paths.items():
                    times[k].append(_load_seconds(p))
            base = statistics.median(times["zarr3, no codes"])
            for k, ts in times.items():
                med = statistics.median(ts)
                rows.append((name, f"{nbytes / 2**20:,.0f} MiB", k, med, med / base))
            shutil.rmtree(root)
    print(f"\ncheckpoint.load, median of {args.rounds} rounds (page cache warm); ratio to zarr3 without codes\n")
    print("| model | bytes | format | load s | ratio |")
    print("|---|---:|---|---:|---:|")
    for name, b, k, s, r in rows:
        print(f"| {name} | {b} | {k} | {s:.3f} | {r:.2f}x |")


if __name__ == "__main__":
    main()
