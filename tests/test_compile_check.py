"""``flexmoe compile-check``: a phase's step compiled for a TPU slice on this CPU-only machine.

JAX's TPU build (libtpu, what ``flexmoe_jax[tpu]`` installs) describes TPU topologies without a TPU.
It is not in the test environment (its start-up probing would print to every JAX process's stderr),
so this test installs it once into a cache directory and runs the command in a subprocess with it on
the path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexmoe_jax.compile_check import collective_bytes, libtpu_dir
from flexmoe_jax.errors import UserError


@pytest.fixture(scope="module")
def libtpu_env(tmp_path_factory):
    try:
        cache = libtpu_dir()
    except UserError as e:
        pytest.skip(str(e))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "PYTHONPATH": os.pathsep.join([str(cache), str(Path(__file__).resolve().parent.parent)]),
            "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}


def _check(env, *args):
    return subprocess.run([sys.executable, "-m", "flexmoe_jax.cli", "compile-check", *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.slow  # over ~3 s on 2 cores
def test_expert_step_compiles_for_a_tpu_slice_and_reports_memory(libtpu_env, tmp_path):
    r = _check(libtpu_env, "--gin_file", "model/tiny.gin", "--gin_file", "phase/expert.gin",
               "--gin_param", "RunConfig.mesh=(1,2,2,1)", "--gin_param", 'RunConfig.anchor="a"',
               "--gin_param", 'RunConfig.expert_name="owner"', "--topology", "v5p-8",
               "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "| topology | v5p-8 (4 devices) |" in out and "| mesh | data=1, fsdp=2, expert=2, tensor=1 |" in out
    assert "of 95 GiB HBM" in out and ": fits (XLA's heap peak" in out
    assert "all-gather" in out  # fsdp gathers the weights: the TPU compiler inserted collectives
    # --json carries the same numbers, the peak decomposed as XLA reports it
    rep = json.loads((tmp_path / "r.json").read_text())
    m = rep["memory"]
    assert rep["bytes_per_device"] == m["argument"] + m["output"] - m["alias"] + m["temp"] > 0
    assert 0 < rep["peak_memory"] <= rep["bytes_per_device"]  # buffers whose lives do not overlap share
    assert rep["fits"] and rep["devices"] == 4 and rep["collective_bytes"]["all-gather"] > 0
    assert rep["compiled_flops_at_least"] > 0 and rep["estimate_6n_per_device"] > 0


@pytest.mark.slow  # over ~3 s on 2 cores
def test_what_does_not_fit_is_exit_2_with_the_fix(libtpu_env):
    r = _check(libtpu_env, "--gin_file", "model/tiny.gin", "--gin_file", "phase/pretrain.gin",
               "--gin_param", "RunConfig.mesh=(4,1,1,1)", "--gin_param", "RunConfig.batch_size=2048",
               "--gin_param", "RunConfig.seq_len=4096", "--gin_param", "ModelConfig.max_seq_len=4096",
               "--topology", "v5e-4")
    assert r.returncode == 2, r.stderr[-3000:]
    # Either XLA reports the need or the TPU compiler refuses outright ("exceeds available HBM").
    assert "DOES NOT FIT" in r.stdout and "HBM" in r.stdout and "grad_accum" in r.stdout


@pytest.mark.slow  # over ~3 s on 2 cores
def test_merged_forward_and_unknown_topology(libtpu_env):
    r = _check(libtpu_env, "--gin_file", "model/tiny.gin", "--gin_param", "ModelConfig.num_experts=4",
               "--gin_param", "ModelConfig.top_k=2", "--gin_param", "RunConfig.mesh=(1,1,4,1)",
               "--forward", "--topology", "v5p-8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "forward of 4 experts top-2" in r.stdout
    r = _check(libtpu_env, "--gin_file", "model/tiny.gin", "--topology", "v9-1")
    assert r.returncode == 2 and "unknown topology 'v9-1'" in r.stderr


def test_collective_bytes_reads_hlo_shapes():
    hlo = ("  %ag = bf16[8,1024]{1,0:T(8,128)} all-gather(%p), dimensions={0}\n"
           "  %ar = (f32[16]{0}, f32[4,4]{1,0}) all-reduce(%a, %b), to_apply=%add\n"
           "  %rs = f32[2,8]{1,0} reduce-scatter-start(%c), dimensions={0}\n")
    assert collective_bytes(hlo) == {"all-gather": 8 * 1024 * 2, "all-reduce": (16 + 16) * 4,
                                     "reduce-scatter": 2 * 8 * 4}
