"""A regular (non-editable) install works: the gin files ship inside the wheel.

Builds the wheel from this checkout, installs it without dependencies into a plain directory, and
runs the installed ``flexmoe`` from outside the checkout (the test asserts that the code and the gin
files really come from the install, not from the source tree).
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flexmoe_jax import checkpoint, model
from flexmoe_jax.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_gin_files_and_runs_a_tiny_expert(tmp_path, data_dir):
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(wheels), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = wheels.glob("flexmoe_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for gin in ("phase/expert.gin", "phase/pretrain.gin", "phase/router_tune.gin", "model/tiny.gin"):
        assert f"flexmoe_jax/gin_configs/{gin}" in names, gin
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": str(tmp_path)}
    where = subprocess.run([sys.executable, "-c", "import flexmoe_jax, flexmoe_jax.config as c; "
                            "print(flexmoe_jax.__file__); print(c.GIN_DIR)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr[-2000:]
    code_file, gin_dir = where.stdout.split()
    assert code_file.startswith(str(site)) and gin_dir.startswith(str(site)), where.stdout

    cli = [sys.executable, "-m", "flexmoe_jax.cli"]
    r = subprocess.run([*cli, "train-expert", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "--anchor" in r.stdout, r.stderr[-2000:]
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=64)
    anchor = checkpoint.save(tmp_path / "anchor", cfg, model.init(cfg, 0))
    out = tmp_path / "owner"
    args = ["train-expert", "--anchor", str(anchor), "--task", "flexmix_mini.humor", "--data_dir", str(data_dir),
            "--out", str(out)]
    for p in ("RunConfig.steps=2", "RunConfig.seq_len=64", "RunConfig.batch_size=8", "OptimConfig.warmup_steps=1",
              "RunConfig.log_every=1"):
        args += ["--gin_param", p]
    r = subprocess.run([*cli, *args], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint.kind(out / "expert") == "expert"
    assert checkpoint.load_metadata(out / "model")["phase"] == "expert"
