"""Test session setup: 8 simulated CPU devices, set before jax is first imported."""

import os
from pathlib import Path

# Tiny test models: compile time dominates, so trade CPU code quality for compile speed.
# These flags change code generation only, never how a program is split across devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs decides at import whether to ask GCS's control plane for a bucket's layout (gRPC the local
# emulator does not serve; see tests/gcs_emulator.py).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

# Tests that read FlexMix-mini (built from the installed corpora) are marked by the fixtures they use.
_CORPUS_FIXTURES = {"small_data_dir", "data_dir", "quick_demo", "small"}  # small: test_data's full build


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if _CORPUS_FIXTURES & used:
            item.add_marker(pytest.mark.needs_corpora)
        if "quick_demo" in used:  # the quick demo itself takes ~10 minutes on 2 cores
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """Real FlexMix-mini data, small (humor + public, 30 docs each, vocab 512), built once per session."""
    from flexmoe_jax import data

    d = tmp_path_factory.mktemp("flexmix_small")
    try:
        data.build(d, domains=["humor"], max_docs_per_domain=30, vocab_size=512, progress=False)
    except data.SourceMissing as e:
        pytest.skip(f"corpora not installed ({e}); run .ci/install_data_sources.sh")
    return str(d)


@pytest.fixture(scope="session")
def data_dir(small_data_dir):
    """The small FlexMix-mini data under the name most tests use."""
    return small_data_dir


@pytest.fixture(scope="session")
def demo_env():
    """The environment a user's shell gives ``flexmoe demo``: one CPU device, default XLA flags."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


# `flexmoe demo --quick` (~7 minutes alone on 2 cores) runs once per test run, in the background from
# the first test on, so it overlaps the rest of the suite; under pytest-xdist the first worker to get
# there starts it in the run's shared temporary directory and every worker waits for the same result.
_DEMO_RUNNER = """
import os, subprocess, sys, time
d, t = sys.argv[1], time.perf_counter()
with open(os.path.join(d, "stdout"), "w") as out, open(os.path.join(d, "stderr"), "w") as err:
    rc = subprocess.run(sys.argv[2:], stdout=out, stderr=err).returncode
with open(os.path.join(d, "rc.tmp"), "w") as f:
    f.write(f"{rc} {time.perf_counter() - t}")
os.replace(os.path.join(d, "rc.tmp"), os.path.join(d, "rc"))
"""


def _quick_demo_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "quick_demo"


def _start_quick_demo(tmp_path_factory, env) -> Path:
    import subprocess
    import sys

    d = _quick_demo_dir(tmp_path_factory)
    try:
        d.mkdir()  # atomic: only the first process to get here starts the demo
    except FileExistsError:
        return d
    subprocess.Popen([sys.executable, "-c", _DEMO_RUNNER, str(d), sys.executable, "-m", "flexmoe_jax.cli", "demo",
                      "--quick", "--workdir", str(d / "work")], env=env, start_new_session=True)
    return d


@pytest.fixture(scope="session", autouse=True)
def _quick_demo_in_background(request, tmp_path_factory, demo_env):
    if any("quick_demo" in getattr(item, "fixturenames", ()) for item in request.session.items):
        _start_quick_demo(tmp_path_factory, demo_env)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, demo_env):
    """``flexmoe demo --quick`` run once per test run as a subprocess; its work directory and output."""
    import time

    d = _start_quick_demo(tmp_path_factory, demo_env)
    deadline = time.monotonic() + 2400
    while not (d / "rc").exists():
        assert time.monotonic() < deadline, "demo --quick did not finish in 40 minutes"
        time.sleep(2)
    rc, seconds = (d / "rc").read_text().split()
    stdout, stderr = (d / "stdout").read_text(), (d / "stderr").read_text()
    if rc != "0" and "install_data_sources" in stderr:
        pytest.skip(f"corpora not installed: {stderr.strip()[-300:]}")
    assert rc == "0", f"demo --quick failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return {"dir": d / "work", "stdout": stdout, "seconds": float(seconds)}


@pytest.fixture(scope="session")
def gcs():
    """A local GCS emulator for the session; this process's clients point at it (tests/gcs_emulator.py)."""
    import gcs_emulator

    if not gcs_emulator.available():
        pytest.skip("gcp-storage-emulator / gcsfs not installed (pip install -e '.[test]')")
    emu = gcs_emulator.start()
    saved = {k: os.environ.get(k) for k in emu.env}
    os.environ.update(emu.env)
    yield emu
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    emu.stop()
