"""One process of the 2-process CPU test in test_multiprocess.py.

Run as ``python tests/_mp_worker.py OUT_JSON`` with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set, JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=N. It joins the distributed
runtime, builds one mesh over the devices of all processes, initializes the
parameters straight into that mesh (same seed everywhere), feeds its own
rows of the global batch through ``host_local_to_global`` and writes the
jitted sharded loss (and gradient norm) to OUT_JSON.

The test process imports this module for the shared pieces (config, batch,
loss) to compute the single-process reference, so importing it has no side
effects.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

# (data, fsdp, expert, tensor): batch split 8 ways (4 per process), experts 2 ways.
MESH_SHAPE = (2, 2, 2, 1)
BATCH, SEQ = 8, 16


def make_config():
    from flexmoe_jax import config as config_lib
    return config_lib.tiny(num_experts=4, top_k=2, n_heads=4, d_model=64, moe_impl="blocks",
                           moe_block_size=32)


def global_tokens(cfg) -> np.ndarray:
    return np.random.default_rng(1234).integers(0, cfg.vocab_size, (BATCH, SEQ), dtype=np.int32)


def loss_fn(cfg, mesh, params, tokens):
    """The real training loss (CE + logit and router z-losses)."""
    from flexmoe_jax import train

    return train.loss_and_metrics(cfg, params, train.lm_batch(tokens), train.LossConfig(), mesh)[0]


def loss_and_grad_norm(cfg, mesh, params, tokens):
    import jax
    import jax.numpy as jnp

    loss, grads = jax.value_and_grad(lambda p: loss_fn(cfg, mesh, p, tokens))(params)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return loss, norm


def main(out_path: str) -> None:
    from flexmoe_jax import distributed

    # Must run before anything touches a JAX backend.
    started = distributed.initialize_if_multiprocess()

    import functools

    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    jax.config.update("jax_default_matmul_precision", "highest")
    from flexmoe_jax import model
    from flexmoe_jax.sharding import make_mesh

    pid, nproc = jax.process_index(), jax.process_count()
    cfg = make_config()
    mesh = make_mesh(*MESH_SHAPE)  # over jax.devices(): every device of every process
    params = model.init_sharded(cfg, 0, mesh)

    tokens = global_tokens(cfg)
    rows = BATCH // nproc
    local = tokens[pid * rows:(pid + 1) * rows]
    batch = distributed.host_local_to_global(local, mesh)  # rows over (data, fsdp, expert)
    assert batch.shape == (BATCH, SEQ), batch.shape
    # This process's shards hold exactly its own rows of the global batch.
    for shard in batch.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), tokens[shard.index])

    step = jax.jit(functools.partial(loss_and_grad_norm, cfg, mesh),
                   in_shardings=(model.param_shardings(cfg, mesh), batch.sharding),
                   out_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P())))
    loss, norm = step(params, batch)
    result = {
        "initialized": started,
        "process_index": pid,
        "process_count": nproc,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "mesh_devices": [[d.id, d.process_index] for d in mesh.devices.flat],
        "loss": float(loss),
        "grad_norm": float(norm),
    }
    save_to = os.environ.get("FLEXMOE_MP_SAVE")
    if save_to:  # every process writes its own shards of one checkpoint (local path or gs://)
        from flexmoe_jax import checkpoint

        checkpoint.save(save_to, cfg, params, metadata={"writers": nproc})
        _, back = checkpoint.load(save_to, mesh=mesh)
        result["reloaded_equal"] = all(bool(jax.numpy.array_equal(a, b)) for a, b in
                                       zip(jax.tree.leaves(params), jax.tree.leaves(back)))
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out_path + ".tmp", out_path)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
