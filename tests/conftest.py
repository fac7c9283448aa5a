"""Test session setup: 8 simulated CPU devices, set before jax is first imported."""

import os

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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if _CORPUS_FIXTURES & used:
            item.add_marker(pytest.mark.needs_corpora)
        if "quick_demo" in used:  # the quick demo itself takes ~10 minutes on 2 cores
            item.add_marker(pytest.mark.slow)
    if not (getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput")):
        return  # not under pytest-xdist (the controller has numprocesses, each worker workerinput)
    # pytest-xdist (`-n 2 --dist loadgroup`, the README's command): the quick demo's users share one
    # worker and start first (the longest group); every other file stays on one worker, so its module
    # fixtures are built once.
    for item in items:
        demo = "quick_demo" in getattr(item, "fixturenames", ())
        item.add_marker(pytest.mark.xdist_group("quick_demo" if demo else item.nodeid.split("::")[0]))
    items.sort(key=lambda it: "quick_demo" not in getattr(it, "fixturenames", ()))


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


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, demo_env):
    """``flexmoe demo --quick`` run once per session as a subprocess; its work directory and output."""
    import subprocess
    import sys
    import time

    work = tmp_path_factory.mktemp("demo") / "work"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flexmoe_jax.cli", "demo", "--quick", "--workdir", str(work)],
                       capture_output=True, text=True, env=demo_env, timeout=1800)
    if r.returncode != 0 and "install_data_sources" in r.stderr:
        pytest.skip(f"corpora not installed: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, f"demo --quick failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return {"dir": work, "stdout": r.stdout, "seconds": time.perf_counter() - t}


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
