"""Regenerate the TPU HLO fixtures of tests/test_flops.py: small programs compiled for one TPU v5p core
on a CPU-only machine (libtpu describes the topology; nothing runs). Needs JAX's TPU build:

    python tests/data/tpu_hlo/make_fixtures.py [name ...]

Each fixture is ``compiled.as_text()`` of the optimized TPU program (``.hlo``, or ``.hlo.gz`` when large).
"""

import gzip
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas.ops.tpu.megablox import gmm  # noqa: E402
from jax.experimental.topologies import get_topology_desc  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from flexmoe_jax import model, train  # noqa: E402
from flexmoe_jax.config import ModelConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
SH = SingleDeviceSharding(get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices[0])
BF16 = jnp.bfloat16
# The tiny MoE of moe_ragged_grad (tests/test_flops.py counts it by hand).
MOE = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=256, num_experts=4,
                  top_k=2, max_seq_len=128, dtype="bfloat16", remat="full", moe_impl="ragged")
MOE_BATCH, MOE_SEQ = 4, 64


def S(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=SH)


def scan_loss(x, ws):  # a 4-step scan: TPU while loops without known_trip_count
    return jnp.sum(jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0])


def fori(x, w):  # XLA rebases the counter: 0..7
    return jax.lax.fori_loop(3, 10, lambda i, c: jnp.tanh(c @ w), x)


def dynamic(x, w, n):
    return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1]


def gconv_loss(x, k):  # feature-grouped convolution; its gradients
    y = jax.lax.conv_general_dilated(x, k, (1,), "SAME", feature_group_count=4, dimension_numbers=("NWC", "WIO", "NWC"))
    return jnp.sum(jnp.tanh(y))


def ragged_loss(x, w, sizes):
    return jnp.sum(jnp.tanh(jax.lax.ragged_dot(x, w, sizes)))


def _matmul_kernel(x_ref, y_ref, o_ref):
    o_ref[...] = jnp.dot(x_ref[...], y_ref[...])


def pallas_matmul(x, y, cost):
    return pl.pallas_call(_matmul_kernel, out_shape=jax.ShapeDtypeStruct((x.shape[0], y.shape[1]), x.dtype),
                          cost_estimate=cost)(x, y)


def two_kernels(x, y):  # one pallas_call with a cost estimate, one without
    est = pl.CostEstimate(flops=2 * 256 ** 3, transcendentals=0, bytes_accessed=3 * 256 * 256 * 4)
    return pallas_matmul(x, y, est) + pallas_matmul(x, y, None)


def gmm_loss(lhs, rhs, sizes):  # megablox forward, and its backward: gmm (input) and tgmm (weight gradient)
    return jnp.sum(jnp.tanh(gmm(lhs, rhs, sizes, tiling=(128, 128, 128)).astype(jnp.float32)))


def moe_loss(p, batch):
    return train.loss_and_metrics(MOE, p, batch, train.LossConfig())[0]


def moe_inputs():
    params = jax.tree.map(lambda s: S(s.shape, s.dtype), jax.eval_shape(lambda: model.init(MOE, 0)))
    rows = jax.ShapeDtypeStruct((MOE_BATCH, MOE_SEQ + 1), jnp.int32)
    return params, {k: S(v.shape, v.dtype) for k, v in jax.eval_shape(train.lm_batch, rows).items()}


FIXTURES = {
    "scan_grad.hlo": (jax.grad(scan_loss, argnums=(0, 1)), lambda: (S((128, 256)), S((4, 256, 256)))),
    "fori_3_10.hlo": (fori, lambda: (S((128, 256)), S((256, 256)))),
    "while_dynamic.hlo": (dynamic, lambda: (S((128, 256)), S((256, 256)), S((), jnp.int32))),
    "grouped_conv_grad.hlo": (jax.grad(gconv_loss, argnums=(0, 1)), lambda: (S((8, 64, 256)), S((3, 64, 512)))),
    "ragged_dot_grad.hlo": (jax.grad(ragged_loss, argnums=(0, 1)),
                            lambda: (S((512, 256), BF16), S((4, 256, 512), BF16), S((4,), jnp.int32))),
    "pallas_cost.hlo": (two_kernels, lambda: (S((256, 256)), S((256, 256)))),
    "megablox_gmm.hlo.gz": (lambda lhs, rhs, g: gmm(lhs, rhs, g, tiling=(128, 128, 128)),
                            lambda: (S((512, 256), BF16), S((4, 256, 512), BF16), S((4,), jnp.int32))),
    "megablox_gmm_grad.hlo.gz": (jax.grad(gmm_loss, argnums=(0, 1)),
                                 lambda: (S((512, 256), BF16), S((4, 256, 512), BF16), S((4,), jnp.int32))),
    "moe_ragged_grad.hlo.gz": (jax.grad(moe_loss), moe_inputs),
}


def main(names):
    for name, (f, inputs) in FIXTURES.items():
        if names and name not in names:
            continue
        text = jax.jit(f).lower(*inputs()).compile().as_text()
        # Source paths in the stack-frame tables, relative to the repository or site-packages.
        text = re.sub(r'"/[^"]*/site-packages/', '"', text.replace(f'"{ROOT}/', '"'))
        path = HERE / name
        if name.endswith(".gz"):
            path.write_bytes(gzip.compress(text.encode(), 9, mtime=0))
        else:
            path.write_text(text)
        print(f"{name}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
