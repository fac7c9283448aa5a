"""launch/ scripts: --dry-run prints the commands they would run."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script, *args):
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True)


def test_tpu_dry_run_ships_the_commit_installs_tpu_jax_and_trains_on_all_workers():
    r = _run("tpu_train.sh", "--tpu", "fm", "--zone", "us-east5-a", "--accelerator", "v5p-64", "--dry-run",
             "--", "--gin_file", "phase/pretrain.gin", "--workdir", "/mnt/run")
    assert r.returncode == 0, r.stderr
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    steps = [line for line in r.stdout.splitlines() if not line.startswith("#")]
    assert steps[0].startswith("git -C") and "archive --format=tar.gz" in steps[0] and sha in steps[0]
    create, scp, install, train = steps[1:]
    assert create.startswith("gcloud compute tpus tpu-vm create fm --zone us-east5-a --accelerator-type v5p-64")
    assert "tpu-vm scp" in scp and f"flexmoe_jax-{sha[:12]}.tar.gz" in scp and "--worker=all" in scp
    assert "tpu-vm ssh fm" in install and "--worker=all" in install and "\\[tpu\\]" in install
    assert "tpu-vm ssh fm" in train and "--worker=all" in train and "FLEXMOE_DISTRIBUTED=auto" in train
    assert "flexmoe\\ train\\ --platform\\ tpu\\ --gin_file\\ phase/pretrain.gin" in train


def test_gpu_dry_run_single_node_and_slurm():
    r = _run("gpu_train.sh", "--dry-run", "--", "--gin_file", "phase/pretrain.gin", "--workdir", "/x")
    assert r.returncode == 0, r.stderr
    steps = [line.strip() for line in r.stdout.splitlines() if not line.startswith("#")]
    assert steps[0] == f"python3 -m venv {ROOT}/.venv-cuda"
    assert steps[1] == f"{ROOT}/.venv-cuda/bin/pip install -q -e {ROOT}\\[cuda\\]"
    assert steps[2] == f"{ROOT}/.venv-cuda/bin/flexmoe train --platform gpu --gin_file phase/pretrain.gin --workdir /x"
    r = _run("gpu_train.sh", "--no-install", "--dry-run", "--", "--workdir", "/x")
    assert r.stdout.strip().splitlines()[-1] == "flexmoe train --platform gpu --workdir /x"
    r = _run("gpu_train.sh", "--nodes", "4", "--partition", "gpu", "--dry-run", "--", "--gin_file", "a.gin",
             "--workdir", "/x")
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=4" in r.stdout and "#SBATCH --partition=gpu" in r.stdout
    assert "JAX_NUM_PROCESSES=$SLURM_NNODES" in r.stdout and "JAX_PROCESS_ID=$SLURM_PROCID" in r.stdout
    assert "--platform gpu" in r.stdout


def test_train_refuses_cpu_when_an_accelerator_was_asked_for(capsys):
    """What the launch scripts rely on: `--platform tpu` with only CPU devices stops before training."""
    from flexmoe_jax import cli

    rc = cli.main(["train", "--gin_file", "phase/pretrain.gin", "--workdir", "/nonexistent/run", "--platform", "tpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "JAX devices:" in err and "asked for --platform tpu but JAX runs on cpu" in err
    assert "flexmoe_jax[tpu]" in err and "--allow_cpu" in err


def test_bad_arguments_are_clear():
    r = _run("tpu_train.sh", "--zone", "z", "--dry-run", "--", "--workdir", "/x")
    assert r.returncode == 2 and "--tpu NAME is required" in r.stderr
    r = _run("gpu_train.sh", "--nodes", "zero", "--dry-run", "--", "x")
    assert r.returncode == 2 and "--nodes must be a positive integer" in r.stderr
    r = _run("gpu_train.sh", "--dry-run")
    assert r.returncode == 2 and "after --" in r.stderr


MESH_PRESETS = sorted(f"mesh/{p.name}" for p in (Path(__file__).parent.parent / "gin_configs" / "mesh").glob("*.gin")
                      if p.name != "cpu.gin")  # every shipped slice preset


@pytest.mark.parametrize("phase", ["phase/pretrain.gin", "phase/expert.gin", "phase/router_tune.gin"])
@pytest.mark.parametrize("preset", MESH_PRESETS)
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


@pytest.mark.slow
def test_device_check_runs_tiny_on_cpu():
    """bench/device_check.sh is what a session with a GPU or TPU runs; here it must run end to end."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--tiny", "--rounds", "1"],
                       capture_output=True, text=True, env={**env, "PYTHON": sys.executable}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "JAX devices: 1 x cpu" in r.stdout
    for row in ("forward ragged", "forward dense", "train expert (slot 1 only)", "train full FT (2-expert)"):
        assert f"| {row}" in r.stdout, row
    assert "expert step / full FT:" in r.stdout
