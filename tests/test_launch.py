"""launch/ scripts: --dry-run prints the commands they would run."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script, *args):
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True)


def test_tpu_dry_run_prints_create_and_ssh_on_all_workers():
    r = _run("tpu_train.sh", "--tpu", "fm", "--zone", "us-east5-a", "--accelerator", "v5p-64", "--dry-run",
             "--", "--gin_file", "phase/pretrain.gin", "--workdir", "/mnt/run")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("gcloud")]
    assert lines[0].startswith("gcloud compute tpus tpu-vm create fm --zone us-east5-a --accelerator-type v5p-64")
    assert "tpu-vm ssh fm" in lines[1] and "--worker=all" in lines[1]
    assert "FLEXMOE_DISTRIBUTED=auto" in lines[1] and "flexmoe\\ train\\ --gin_file\\ phase/pretrain.gin" in lines[1]


def test_gpu_dry_run_single_node_and_slurm():
    r = _run("gpu_train.sh", "--dry-run", "--", "--gin_file", "phase/pretrain.gin", "--workdir", "/x")
    assert r.returncode == 0 and r.stdout.strip() == "flexmoe train --gin_file phase/pretrain.gin --workdir /x"
    r = _run("gpu_train.sh", "--nodes", "4", "--partition", "gpu", "--dry-run", "--", "--gin_file", "a.gin",
             "--workdir", "/x")
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=4" in r.stdout and "#SBATCH --partition=gpu" in r.stdout
    assert "JAX_NUM_PROCESSES=$SLURM_NNODES" in r.stdout and "JAX_PROCESS_ID=$SLURM_PROCID" in r.stdout


def test_bad_arguments_are_clear():
    r = _run("tpu_train.sh", "--zone", "z", "--dry-run", "--", "--workdir", "/x")
    assert r.returncode == 2 and "--tpu NAME is required" in r.stderr
    r = _run("gpu_train.sh", "--nodes", "zero", "--dry-run", "--", "x")
    assert r.returncode == 2 and "--nodes must be a positive integer" in r.stderr
    r = _run("gpu_train.sh", "--dry-run")
    assert r.returncode == 2 and "after --" in r.stderr


@pytest.mark.parametrize("phase", ["phase/pretrain.gin", "phase/expert.gin", "phase/router_tune.gin"])
@pytest.mark.parametrize("preset", ["mesh/h100x8.gin", "mesh/tpu_v5p_64.gin"])
def test_mesh_presets_split_their_phase_batch(phase, preset):
    """Each mesh preset, given after a phase file, leaves a batch that its batch shards
    (data x fsdp x expert, see sharding.BATCH_AXES) divide, as the trainer requires."""
    from flexmoe_jax import config, trainer
    from flexmoe_jax.sharding import BATCH_AXES, MESH_AXES

    owner = ['RunConfig.anchor="/anchor"', 'RunConfig.expert_name="math"'] if phase == "phase/expert.gin" else []
    with config.gin_scope([phase, preset], owner):
        rc = trainer.RunConfig()
    shards = 1
    for axis, size in zip(MESH_AXES, rc.mesh):
        if axis in BATCH_AXES:
            shards *= size
    assert rc.batch_size % (shards * rc.grad_accum) == 0, (phase, preset, rc.batch_size, rc.mesh)
