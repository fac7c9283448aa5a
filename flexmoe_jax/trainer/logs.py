"""What a run logs: per-step scalars (loss, lr, throughput, MFU) to metrics.jsonl and TensorBoard, and
the FLOPs recorded in the model's metadata. Process 0 alone writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from flexmoe_jax import checkpoint, flops, optim, storage
from flexmoe_jax.trainer.run_config import TrainingError


def flops_metadata(step_flops: dict) -> dict:
    """FLOPs per training step, for the model's metadata."""
    # compiled: matmul FLOPs of the compiled step (XLA's program, loops times their trip counts);
    # a lower bound when the step has data-dependent loops (flops_dynamic_loops > 0, see flexmoe_jax.flops).
    return {"flops_per_step_compiled": step_flops["compiled"], "flops_per_step_6n": step_flops["6n"],
            "flops_dynamic_loops": step_flops["dynamic_loops"]}


def scalars(metrics, ocfg, step, steps_per_s, step_flops, config) -> dict:
    """The logged scalars of ``step``: metrics, lr, tokens/s, MFU (compiled and 6N) and per-expert routing shares."""
    m = jax.device_get(metrics)
    out = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
    out["lr"] = float(optim.schedule(ocfg)(step))
    out["tokens_per_s"] = steps_per_s * step_flops["tokens"]
    peak = flops.measured_peak_flops()
    out["mfu"] = steps_per_s * step_flops["compiled"] / peak  # FLOPs the compiled step executes
    out["mfu_6n"] = steps_per_s * step_flops["6n"] / peak    # 6 x active params + attention, per token
    out["flops_per_step"] = step_flops["compiled"]
    if "expert_share" in m:
        for name, share, gate in zip(config.names, m["expert_share"], m["expert_gate"]):
            out[f"expert_share/{name}"] = float(share)
            out[f"expert_gate/{name}"] = float(gate)
    return out


def writer(workdir: Path):
    """TensorBoard event files (clu) plus a JSON-lines log that needs nothing to read.

    Object storage has no append: there the log is rewritten whole (one object write) each time."""
    path = workdir / "metrics.jsonl"
    if jax.process_index() > 0:  # process 0 writes the logs of a multi-process run
        return lambda step, scalars: None
    remote = storage.is_remote(workdir)
    tb = None
    if remote and os.environ.get("STORAGE_EMULATOR_HOST"):
        # clu writes event files through TensorFlow's GCS client, which cannot be pointed at an emulator.
        tqdm.write("flexmoe: no TensorBoard event files under a GCS emulator (TensorFlow's GCS client "
                   "always talks to storage.googleapis.com); metrics go to metrics.jsonl")
    else:
        try:
            from clu import metric_writers

            tb = metric_writers.create_default_writer(str(workdir / "tb"))
        except ImportError as e:  # metrics still go to metrics.jsonl
            tqdm.write(f"flexmoe: no TensorBoard event files ({e}); pip install clu tensorboard")
    logged = [path.read_text()] if remote and path.exists() else []

    def write(step: int, scalars: dict) -> None:
        line = json.dumps({"step": step, **scalars}) + "\n"
        try:
            if remote:
                logged.append(line)
                storage.write_text(path, "".join(logged))
            else:
                with open(path, "a") as f:
                    f.write(line)
        except OSError as e:
            raise TrainingError(f"cannot write {path}: {e.strerror or e}. To fix: "
                                f"{checkpoint.io_fix(e.errno, workdir)}, then rerun the same command to resume "
                                "from the last checkpoint") from e
        if tb is not None:
            tb.write_scalars(step, scalars)
            tb.flush()

    return write
