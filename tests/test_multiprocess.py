"""Two local processes on CPU form one JAX runtime and compute the same loss as one process.

Each subprocess (tests/_mp_worker.py) gets 4 simulated CPU devices, joins the
distributed runtime through ``flexmoe_jax.distributed.initialize_if_multiprocess``
(Gloo collectives over localhost TCP), builds a (data=2, fsdp=2, expert=2,
tensor=1) mesh over all 8 devices of both processes, feeds its half of the
global batch through ``host_local_to_global`` and writes the jitted sharded
loss. Both must equal the single-process, single-device loss computed here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import _mp_worker as worker
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flexmoe_jax import distributed, model
from flexmoe_jax.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_mp_worker.py")
NUM_PROCESSES = 2
LOCAL_DEVICES = 4
TIMEOUT_S = 180
TOL = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(port: int, process_id: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    # Drop proxy settings: the coordinator is on localhost.
    env = {k: v for k, v in env.items() if "_proxy" not in k.lower()}
    env.update({
        "JAX_PLATFORMS": "cpu",
        # The classic CPU emitters at -O0 compile these small programs ~4x faster.
        "XLA_FLAGS": (f"--xla_force_host_platform_device_count={LOCAL_DEVICES} "
                      "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"),
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(NUM_PROCESSES),
        "JAX_PROCESS_ID": str(process_id),
        "PYTHONPATH": os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    })
    return env


def _run_workers(tmp_path, while_waiting=lambda: None, env: dict | None = None) -> list[dict]:
    """Run the workers (``env`` added to theirs); call ``while_waiting()`` once they are launched."""
    port = _free_port()
    procs, outs, logs = [], [], []
    for pid in range(NUM_PROCESSES):
        out = tmp_path / f"result_{pid}.json"
        log = open(tmp_path / f"worker_{pid}.log", "w+")
        procs.append(subprocess.Popen([sys.executable, WORKER, str(out)], env={**_worker_env(port, pid), **(env or {})},
                                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        outs.append(out)
        logs.append(log)

    def tail(pid: int, n: int = 4000) -> str:
        logs[pid].flush()
        logs[pid].seek(0)
        text = logs[pid].read()
        # Gloo prints one connection line per collective group; keep the rest.
        lines = [line for line in text.splitlines() if not line.startswith("[Gloo]")]
        return "\n".join(lines)[-n:]

    deadline = time.monotonic() + TIMEOUT_S
    try:
        while_waiting()
        # Poll all workers: if one dies, the other would wait for it until the
        # runtime's own timeout, so report the first failure at once.
        while True:
            codes = [p.poll() for p in procs]  # poll every worker (no short-circuit)
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"workers did not finish within {TIMEOUT_S} s; their output:\n" +
                            "\n".join(f"--- worker {q} ---\n{tail(q, 2000)}" for q in range(NUM_PROCESSES)))
            time.sleep(0.2)
        for pid, p in enumerate(procs):
            if p.returncode not in (None, 0):
                pytest.fail(f"worker {pid} exited with {p.returncode}; its output:\n{tail(pid)}\n"
                            "--- other workers ---\n" +
                            "\n".join(tail(q, 1500) for q in range(NUM_PROCESSES) if q != pid))
        for pid in range(NUM_PROCESSES):
            if not outs[pid].exists():
                pytest.fail(f"worker {pid} wrote no result; its output:\n{tail(pid)}")
        return [json.loads(o.read_text()) for o in outs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def _single_process_reference():
    cfg = worker.make_config()
    params = model.init(cfg, 0)
    tokens = worker.global_tokens(cfg)
    step = jax.jit(lambda p, t: worker.loss_and_grad_norm(cfg, None, p, t),
                   compiler_options={"xla_cpu_use_fusion_emitters": False,
                                     "xla_backend_optimization_level": 0})
    loss, norm = step(jax.device_put(params, jax.devices()[0]), tokens)
    return float(loss), float(norm)


@pytest.mark.multiprocess
def test_two_processes_match_single_process(tmp_path):
    ref = []
    results = _run_workers(tmp_path, lambda: ref.extend(_single_process_reference()))
    ref_loss, ref_norm = ref

    assert [r["process_index"] for r in results] == list(range(NUM_PROCESSES))
    for r in results:
        assert r["initialized"] is True
        assert r["process_count"] == NUM_PROCESSES
        assert r["device_count"] == NUM_PROCESSES * LOCAL_DEVICES
        assert r["local_device_count"] == LOCAL_DEVICES
        # The mesh really spans both processes.
        assert {p for _, p in r["mesh_devices"]} == set(range(NUM_PROCESSES))
        np.testing.assert_allclose(r["loss"], ref_loss, rtol=TOL, atol=TOL,
                                   err_msg=f"process {r['process_index']} loss")
        np.testing.assert_allclose(r["grad_norm"], ref_norm, rtol=TOL, atol=TOL,
                                   err_msg=f"process {r['process_index']} grad norm")
    # The processes agree with each other exactly (same replicated scalar).
    assert results[0]["loss"] == results[1]["loss"]


# --- cheap single-process checks of flexmoe_jax.distributed --------------------------------

def _clear_env(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID, distributed.ENV_LOCAL_DEVICE_IDS):
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_a_no_op(monkeypatch):
    _clear_env(monkeypatch)
    assert distributed.initialize_if_multiprocess() is False
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
    assert distributed.initialize_if_multiprocess() is False
    assert not jax.distributed.is_initialized()


def test_incomplete_setup_is_a_clear_error(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"):
        distributed.initialize_if_multiprocess()
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="must be an integer"):
        distributed.initialize_if_multiprocess()
    with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
        distributed.initialize_if_multiprocess(num_processes=2, process_id=2)


def test_too_late_is_a_clear_error(monkeypatch):
    """This pytest process already runs JAX, so joining a runtime must fail loudly, not hang."""
    _clear_env(monkeypatch)
    jax.devices()
    with pytest.raises(RuntimeError, match="must run before any JAX computation"):
        distributed.initialize_if_multiprocess("127.0.0.1:1", num_processes=2, process_id=0)
    assert not jax.distributed.is_initialized()


def test_host_local_to_global_single_process():
    mesh = make_mesh(2, 2, 2, 1)
    tokens = np.arange(8 * 4, dtype=np.int32).reshape(8, 4)
    batch = {"tokens": tokens, "weights": np.ones((8, 4), np.float32)}
    out = distributed.host_local_to_global(batch, mesh, P(("data", "fsdp")))
    assert out["tokens"].shape == (8, 4)
    assert out["tokens"].sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), tokens)
    for shard in out["tokens"].addressable_shards:
        assert shard.data.shape == (2, 4)
    # The default spec is the rules' batch spec: rows split over data, fsdp and expert.
    out = distributed.host_local_to_global(batch, mesh)
    assert out["tokens"].sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp", "expert"))), 2)
    assert {s.data.shape for s in out["tokens"].addressable_shards} == {(1, 4)}
    np.testing.assert_array_equal(np.asarray(out["tokens"]), tokens)
    # A per-leaf spec tree.
    out = distributed.host_local_to_global(batch, mesh, {"tokens": P("data"), "weights": P()})
    assert {s.data.shape for s in out["tokens"].addressable_shards} == {(4, 4)}
    assert {s.data.shape for s in out["weights"].addressable_shards} == {(8, 4)}


@pytest.mark.multiprocess
def test_two_processes_write_one_checkpoint_to_gcs(tmp_path, gcs):
    """Both processes write their shards of one checkpoint to the same gs:// path (the emulator's);
    it reads back equal on their mesh and, here, as one process, equals the single-process init."""
    import gcs_emulator

    from flexmoe_jax import checkpoint

    url = f"gs://{gcs_emulator.BUCKET}/multiprocess/ckpt"
    results = _run_workers(tmp_path, env={**gcs.env, "FLEXMOE_MP_SAVE": url})
    assert all(r["reloaded_equal"] for r in results)
    cfg, params = checkpoint.load(url)
    assert cfg == worker.make_config() and checkpoint.load_metadata(url) == {"writers": 2}
    want = model.init(cfg, 0)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
