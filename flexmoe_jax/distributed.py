"""Multi-process (multi-host) setup: start ``jax.distributed`` and build global batches.

One process per host (or several local processes in tests) runs the same
program; ``jax.devices()`` then lists the devices of *all* processes and a
mesh from :func:`flexmoe_jax.sharding.make_mesh` spans them. Each process
loads only its own slice of the global batch and
:func:`host_local_to_global` stitches the slices into one global
``jax.Array``.

Environment variables read by :func:`initialize_if_multiprocess` (explicit
arguments win):

- ``JAX_COORDINATOR_ADDRESS``: ``host:port`` of process 0's coordinator service;
- ``JAX_NUM_PROCESSES``: total number of processes;
- ``JAX_PROCESS_ID``: this process's rank in ``[0, JAX_NUM_PROCESSES)``;
- ``JAX_LOCAL_DEVICE_IDS`` (optional): comma-separated local device ids (GPU).

On CPU, cross-process collectives go through Gloo over TCP
(``jax_cpu_collectives_implementation='gloo'``), which must be configured
before the CPU backend starts; so call this before any other JAX work.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flexmoe_jax.errors import UserError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
# FLEXMOE_DISTRIBUTED=auto: let jax.distributed detect the cluster (TPU pods; launch/tpu_train.sh sets it).
ENV_AUTO = "FLEXMOE_DISTRIBUTED"


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} must be an integer") from None


def initialize_if_multiprocess(coordinator_address: str | None = None,
                               num_processes: int | None = None,
                               process_id: int | None = None,
                               local_device_ids: Sequence[int] | None = None,
                               *,
                               cpu_collectives: str = "gloo",
                               initialization_timeout: int = 300) -> bool:
    """Start ``jax.distributed`` when this is one of several processes.

    Arguments default to the ``JAX_*`` environment variables above. Returns
    False (and does nothing) for a single-process run: no coordinator and
    ``num_processes`` unset or 1. Returns True once the distributed runtime is
    up (also when it already was). A partial setup (say, a process count with
    no coordinator address) or a call after JAX has already started its
    backends raises a ValueError / RuntimeError that says what is missing.
    """
    if jax.distributed.is_initialized():
        return True
    if os.environ.get(ENV_AUTO) == "auto":
        # TPU VM slices (and SLURM/MPI jobs) describe themselves; jax detects the cluster.
        jax.distributed.initialize(initialization_timeout=initialization_timeout)
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    if local_device_ids is None and os.environ.get(ENV_LOCAL_DEVICE_IDS):
        local_device_ids = [int(x) for x in os.environ[ENV_LOCAL_DEVICE_IDS].split(",")]

    if coordinator_address is None and num_processes in (None, 1):
        return False  # single process: nothing to start
    missing = [name for name, value in ((ENV_COORDINATOR, coordinator_address),
                                        (ENV_NUM_PROCESSES, num_processes),
                                        (ENV_PROCESS_ID, process_id)) if value is None]
    if missing:
        raise UserError(
            f"multi-process setup is incomplete: {', '.join(missing)} not set (pass them as "
            "arguments or environment variables; all of coordinator address, process count "
            "and process id are needed)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(f"process id {process_id} is not in [0, {num_processes})")

    from jax._src import xla_bridge  # private, but the only way to detect "too late"
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "initialize_if_multiprocess() must run before any JAX computation or jax.devices() "
            "call in this process: the backends are already initialized, so the process cannot "
            "join a multi-process runtime anymore")

    # Only the CPU client reads this; it must be set before that client is created.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    log.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)",
             coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               # every parameter is given: skip SLURM/MPI/TPU auto-detection
                               cluster_detection_method="deactivate",
                               initialization_timeout=initialization_timeout)
    return True


PLATFORMS = ("cpu", "gpu", "tpu")
_INSTALL = {"tpu": "pip install 'flexmoe_jax[tpu]' (JAX's TPU build, libtpu)",
            "gpu": "pip install 'flexmoe_jax[cuda]' (JAX's CUDA 12 plugin) on a node with NVIDIA drivers"}


def devices_line() -> str:
    """One line saying what JAX sees: count and kind of devices, local ones, this process's rank."""
    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    return (f"JAX devices: {len(devs)} x {jax.default_backend()} ({', '.join(kinds)}), "
            f"{jax.local_device_count()} local; process {jax.process_index()} of {jax.process_count()}")


def check_platform(platform: str | None, allow_cpu: bool = False) -> str:
    """Print :func:`devices_line`; refuse to go on when ``platform`` was asked for and JAX runs elsewhere.

    ``platform`` None: no expectation (prints only). Asked for ``gpu``/``tpu`` but JAX sees only the
    host CPU (the accelerator build is missing, or the chips are busy): a ValueError saying what to
    install, unless ``allow_cpu`` (then a warning). Returns the backend JAX uses.
    """
    if platform is not None and platform not in PLATFORMS:
        raise UserError(f"--platform must be one of {PLATFORMS}, got {platform!r}")
    backend = jax.default_backend()
    print(devices_line(), file=sys.stderr, flush=True)
    if platform in (None, backend):
        return backend
    if backend == "cpu" and allow_cpu:
        log.warning("asked for %s but JAX sees only CPU devices; continuing on CPU (--allow_cpu)", platform)
        return backend
    fix = _INSTALL.get(platform, "")
    raise UserError(f"asked for --platform {platform} but JAX runs on {backend} "
                    f"({jax.device_count()} device(s)); {fix + ', or ' if fix else ''}pass --allow_cpu to train on "
                    "the CPU anyway")


def host_local_to_global(batch: Any, mesh: Mesh, spec: P | Any = None) -> Any:
    """This process's slice of a batch (a pytree of arrays) -> global ``jax.Array``s on ``mesh``.

    ``spec`` (default: the batch spec of the sharding rules, leading dim over
    data, fsdp and expert) is a PartitionSpec for every leaf, or a pytree of them matching
    ``batch``. The leading (sharded) dim of each local array is this process's
    share, and the global array has ``process_count`` times as many rows when
    the batch axes span all processes. Processes must own contiguous pieces of
    the sharded dims, which holds for a mesh from ``make_mesh`` whose leading
    batch axes split across processes (devices are ordered by process).
    In a single process this is a plain ``device_put`` with the sharding.
    """
    if spec is None:
        from flexmoe_jax.sharding import batch_spec

        spec = batch_spec()
    if isinstance(spec, P):
        specs = jax.tree.map(lambda _: spec, batch)
    else:
        specs = spec

    def one(x, s):
        sharding = NamedSharding(mesh, s)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(one, batch, specs, is_leaf=lambda t: isinstance(t, P))
