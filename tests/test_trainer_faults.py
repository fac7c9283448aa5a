"""Faults around a real ``flexmoe train`` run on real (small) FlexMix-mini data.

- Two processes: two local CPU processes joined by ``jax.distributed`` (Gloo over
  localhost) run the same pretraining command as one process, once from scratch and
  once resuming a one-process checkpoint; the per-step losses process 0 logs match the
  one-process run's, and the final model is written once and loads.
- Disk full: the writes really fail. Where unprivileged user namespaces work, the
  saves and runs happen inside ``unshare --user --map-root-user --mount`` on private
  tmpfs mounts (one for the run directory, one for its ``state/``), each shrunk to
  64 KiB (or 16 KiB) of free space at a time with ``mount -o remount,size=``, so writes
  fail with ENOSPC ("No space left on device"). Elsewhere (Docker's default seccomp
  profile, Ubuntu's AppArmor userns restriction) a file-size limit on the subprocess
  (``RLIMIT_FSIZE``, SIGXFSZ ignored) makes the same writes fail with EFBIG ("File too
  large"); that limit is per file, so the one case it cannot produce (the training
  state fits but the final model does not) runs only on tmpfs.
  ``FLEXMOE_TEST_DISK_LIMIT=rlimit`` forces the fallback. Either way: the CLI exits
  with status 2 and one line naming the path and the fix, the last good checkpoint
  stays complete and loadable, no partial write is left behind, and rerunning the
  same command once there is room resumes and ends bit-identical to an
  uninterrupted run.
- A non-finite loss: status 2, one line, and the last good checkpoint restores.

This file is also the disk-full driver (``python test_trainer_faults.py --disk-driver SPEC``),
so the limit applies to that subprocess only, never to pytest.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TINY = ["ModelConfig.vocab_size=512", "ModelConfig.d_model=32", "ModelConfig.n_heads=2",
        "ModelConfig.mlp_hidden=64", "ModelConfig.n_layers=2", "ModelConfig.max_seq_len=64",
        "RunConfig.seq_len=64", "RunConfig.batch_size=8", "OptimConfig.warmup_steps=1"]
# The command under test: 4 steps, the training state saved at steps 2 and 4, every loss logged.
RUN = ["RunConfig.steps=4", "RunConfig.checkpoint_every=2", "RunConfig.log_every=1"]
# The same run stopped after step 2 (same schedule: total_steps is the full run's).
FIRST_HALF = ["RunConfig.steps=2", "OptimConfig.total_steps=4"]
TOL = 1e-5
MP_TIMEOUT_S = 300


def _args(data_dir, workdir, *extra) -> list[str]:
    out = ["train", "--gin_file", "phase/pretrain.gin", "--workdir", str(workdir)]
    for p in TINY + [f'RunConfig.data_dir="{data_dir}"', *RUN, *extra]:
        out += ["--gin_param", p]
    return out


def _log(workdir) -> list[dict]:
    return [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]


def _complete_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "state").iterdir() if p.name.isdigit())


def _leftovers(directory) -> list[str]:
    """Temporaries of an unfinished save (ours or Orbax's) anywhere under ``directory``."""
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*")
                  if "flexmoe-tmp" in p.name or "flexmoe-old" in p.name or "orbax-checkpoint-tmp" in p.name)


def _flat(tree) -> dict[str, np.ndarray]:
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _model(path) -> tuple[dict, dict[str, np.ndarray]]:
    from flexmoe_jax import checkpoint

    _, params = checkpoint.load(path)
    return checkpoint.load_metadata(path), _flat(params)


def _training_state(workdir, step) -> dict[str, np.ndarray]:
    """The arrays of one saved training-state step, read back through Orbax."""
    import orbax.checkpoint as ocp

    return _flat(ocp.StandardCheckpointer().restore(Path(workdir) / "state" / str(step) / "state"))


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from flexmoe_jax import data

    d = tmp_path_factory.mktemp("flexmix_faults")
    try:
        data.build(d, domains=["public"], max_docs_per_domain=10, vocab_size=512, progress=False)
    except data.SourceMissing as e:
        pytest.skip(f"corpora not installed ({e}); run .ci/install_data_sources.sh")
    return str(d)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The command, uninterrupted, in this (single) process."""
    from flexmoe_jax import cli

    workdir = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(_args(data_dir, workdir)) == 0
    return workdir


# ------------------------------------------------------------------------------------------
# Two processes
# ------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mp_env(port: int, process_id: int, num_processes: int, local_devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_")) and "_proxy" not in k.lower()}  # coordinator is local
    env.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",  # as conftest.py sets for the reference
        "XLA_FLAGS": (f"--xla_force_host_platform_device_count={local_devices} "
                      "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"),
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(process_id),
        "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    })
    return env


def _run_processes(tmp_path, runs: list[list[str]], num_processes=2, local_devices=4) -> list[str]:
    """Run the command lines ``runs`` in ``num_processes`` cooperating processes; their outputs."""
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    port = _free_port()
    procs, logs = [], []
    for pid in range(num_processes):
        log = open(tmp_path / f"process_{pid}.log", "w+")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "_mp_trainer_worker.py"), str(spec)],
                                      env=_mp_env(port, pid, num_processes, local_devices), cwd=REPO,
                                      stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)

    def output(pid: int) -> str:
        logs[pid].flush()
        logs[pid].seek(0)
        return "\n".join(line for line in logs[pid].read().splitlines() if not line.startswith("[Gloo]"))

    deadline = time.monotonic() + MP_TIMEOUT_S
    try:
        while True:  # if one process dies the other waits for it, so report the first failure at once
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the processes did not finish within {MP_TIMEOUT_S} s:\n" +
                            "\n".join(f"--- process {q} ---\n{output(q)[-2000:]}" for q in range(num_processes)))
            time.sleep(0.2)
        for pid, p in enumerate(procs):
            if p.returncode != 0:
                pytest.fail(f"process {pid} exited with {p.returncode}:\n{output(pid)[-4000:]}\n--- others ---\n" +
                            "\n".join(output(q)[-1500:] for q in range(num_processes) if q != pid))
        return [output(pid) for pid in range(num_processes)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def _assert_losses_match(log: list[dict], ref: dict[int, dict], steps: list[int], what: str) -> None:
    assert [r["step"] for r in log] == steps, f"{what}: logged steps (each once, by process 0)"
    for r in log:
        for key in ("loss", "ce", "grad_norm"):
            np.testing.assert_allclose(r[key], ref[r["step"]][key], rtol=TOL, atol=TOL,
                                       err_msg=f"{what}: {key} at step {r['step']}")


@pytest.mark.multiprocess
def test_two_processes_match_one_process(data_dir, reference, tmp_path):
    """`flexmoe train` as 2 processes x 4 CPU devices equals the 1-process run, uninterrupted and resumed."""
    ref_log = {r["step"]: r for r in _log(reference)}
    _, ref_model = _model(reference / "model")
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    half = [a for p in FIRST_HALF for a in ("--gin_param", p)]
    # "resumed": the first 2 steps, then the same command again, resuming from the state the
    # two processes saved (each must read its own rows from the saved data position).
    outputs = _run_processes(tmp_path, [_args(data_dir, fresh), _args(data_dir, resumed) + half,
                                        _args(data_dir, resumed)])

    for pid, out in enumerate(outputs):
        assert out.count("; model -> ") == 3, f"process {pid} did not finish its runs:\n{out[-3000:]}"
    _assert_losses_match(_log(fresh), ref_log, [1, 2, 3, 4], "two processes")
    _assert_losses_match(_log(resumed), ref_log, [1, 2, 3, 4], "two processes, stopped at step 2 and resumed")
    for workdir in (fresh, resumed):
        # One model, published by one atomic rename: no temporaries or second copies beside it.
        assert sorted(p.name for p in workdir.iterdir()) == ["metrics.jsonl", "model", "run.json", "state", "tb"]
        assert not _leftovers(workdir)
        assert _complete_steps(workdir) == [2, 4]
        meta, params = _model(workdir / "model")
        assert meta["steps"] == 4 and meta["phase"] == "pretrain"
        assert params.keys() == ref_model.keys()
        for k in params:
            # 4 Adam steps: a 1e-7 difference in a gradient can move a weight by ~lr * 1e-3.
            np.testing.assert_allclose(params[k], ref_model[k], rtol=1e-4, atol=1e-4, err_msg=f"{workdir.name}: {k}")


# ------------------------------------------------------------------------------------------
# Disk full
# ------------------------------------------------------------------------------------------

TMPFS_BYTES = 16 << 20
_UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def _namespace_prefix(tmp_path) -> list[str] | None:
    """A command prefix that runs a command as (namespace) root in a private mount namespace, if any works."""
    if os.environ.get("FLEXMOE_TEST_DISK_LIMIT") == "rlimit" or not shutil.which("unshare"):
        return None
    probe = tmp_path / "probe"
    probe.mkdir()
    candidates = [_UNSHARE] + ([["unshare", "--mount"]] if os.geteuid() == 0 else [])
    for prefix in candidates:
        r = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1" && '
                            'mount -o remount,size=2m "$1"', "sh", str(probe)], capture_output=True, timeout=30)
        if r.returncode == 0:
            return prefix
    return None


class _Tmpfs:
    """Private tmpfs mounts whose free space is set by resizing them (``mount -o remount,size=``)."""

    name = "tmpfs"

    def __init__(self, mounts: list[Path]):
        self.mounts = mounts

    @staticmethod
    def _resize(mount: Path, size: int) -> bool:
        return subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], capture_output=True).returncode == 0

    def limit(self, mount: Path, free: int) -> None:
        for _ in range(50):  # a size below what is in use is refused; a background write may just have grown it
            st = os.statvfs(mount)
            if self._resize(mount, (st.f_blocks - st.f_bfree) * st.f_frsize + free):
                return
            time.sleep(0.1)
        raise RuntimeError(f"cannot shrink the tmpfs at {mount}")

    def unlimit(self) -> None:
        for mount in self.mounts:
            if not self._resize(mount, TMPFS_BYTES):
                raise RuntimeError(f"cannot grow the tmpfs at {mount}")


class _FileSizeLimit:
    """RLIMIT_FSIZE on this process: writing a file past ``free`` bytes fails with EFBIG, on any filesystem."""

    name = "rlimit"

    def __init__(self, mounts: list[Path]):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
        self.hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]

    def limit(self, mount: Path, free: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (free, self.hard))

    def unlimit(self) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.hard, self.hard))


def _cli(argv) -> tuple[int, str]:
    """``flexmoe ARGV`` in this process: (exit status, last line it printed to stderr)."""
    from flexmoe_jax import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    lines = err.getvalue().strip().splitlines()
    return rc, lines[-1] if lines else ""


def _disk_driver(spec_path: str) -> None:
    """Inside the limit: save and train against a full disk, snapshotting what is left each time.

    ROOT holds a model checkpoint and the run directory ROOT/w; in tmpfs mode ROOT and
    ROOT/w/state are two filesystems (the training state's size varies from save to save
    with Orbax's packing, so filling one filesystem at a time is what makes "the state
    fits but the model does not" exact).
    """
    spec = json.loads(Path(spec_path).read_text())
    root, out = Path(spec["root"]), Path(spec["out"])
    workdir = root / "w"
    state_fs = workdir / "state"
    disk = (_Tmpfs if spec["mode"] == "tmpfs" else _FileSizeLimit)([root, state_fs])
    report: dict = {"mode": disk.name}

    def snapshot(name: str, what: Path) -> None:
        shutil.copytree(what, out / name)

    # (a) checkpoint.save replacing a model checkpoint on a full disk.
    from flexmoe_jax import checkpoint, model
    from flexmoe_jax.config import ModelConfig

    cfg = ModelConfig(vocab_size=512, d_model=32, n_heads=2, mlp_hidden=64, n_layers=2, max_seq_len=64)
    ckpt = root / "ckpt"
    checkpoint.save(ckpt, cfg, model.init(cfg, 0), metadata={"seed": 0})
    disk.limit(root, 16 << 10)
    try:
        checkpoint.save(ckpt, cfg, model.init(cfg, 1), metadata={"seed": 1})
        report["ckpt_error"] = None
    except Exception as e:  # noqa: BLE001 - the test checks which
        report["ckpt_error"] = {"type": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e),
                                "is_oserror": isinstance(e, OSError)}
    disk.unlimit()
    report["ckpt_dir_after_failure"] = sorted(p.name for p in root.iterdir() if p.name != "w")
    snapshot("ckpt_after_failure", ckpt)
    checkpoint.save(ckpt, cfg, model.init(cfg, 1), metadata={"seed": 1})
    snapshot("ckpt_after_rerun", ckpt)

    # (b) the trainer. An earlier run of the command stopped after step 2 (state/2, a step-2 model).
    report["runs"] = {}
    assert _cli(spec["args"] + [a for p in FIRST_HALF for a in ("--gin_param", p)])[0] == 0
    for name, limits in spec["phases"]:
        for mount, free in limits:
            disk.limit(Path(mount), free)
        rc, line = _cli(spec["args"])
        disk.unlimit()
        report["runs"][name] = {"rc": rc, "line": line}
        snapshot(name, workdir)
    (out / "report.json").write_text(json.dumps(report, indent=1))


@pytest.mark.slow
def test_disk_full_keeps_last_checkpoint_and_resumes(data_dir, reference, tmp_path):
    from flexmoe_jax import model
    from flexmoe_jax.config import ModelConfig

    prefix = _namespace_prefix(tmp_path)
    mode = "tmpfs" if prefix else "rlimit"
    root, out = tmp_path / "disk", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    w = root / "w"
    if mode == "tmpfs":  # free space on one filesystem at a time: 64 KiB, far less than any save needs
        phases = [("state_full", [(str(w / "state"), 64 << 10)]),  # no room for the state of step 4
                  ("model_full", [(str(root), 64 << 10)]),         # room for it, not for the final model
                  ("room", [])]
    else:  # the largest file allowed: Orbax's array files (tens of KiB and more) cannot be written.
        # A per-file limit cannot let the state through but stop the model, so no "model_full".
        phases = [("state_full", [(str(root), 32 << 10)]), ("room", [])]
    spec = {"mode": mode, "root": str(root), "out": str(out), "args": _args(data_dir, w), "phases": phases}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    driver = [sys.executable, __file__, "--disk-driver", str(tmp_path / "spec.json")]
    if prefix:
        mount = f"mount -t tmpfs -o size={TMPFS_BYTES} tmpfs"
        driver = [*prefix, "sh", "-c", f'{mount} "$1" && mkdir -p "$1/w/state" && {mount} "$1/w/state" '
                  '&& shift && exec "$@"', "sh", str(root), *driver]
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest", "PYTHONPATH": str(REPO)}
    r = subprocess.run(driver, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0 and (out / "report.json").exists(), r.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == mode
    reason = "No space left on device" if mode == "tmpfs" else "File too large"
    fix = "free space on the filesystem of" if mode == "tmpfs" else "file-size limit"

    # (a) checkpoint.save: a clear OSError naming the path and the fix; the old checkpoint intact, no temporaries.
    cfg = ModelConfig(vocab_size=512, d_model=32, n_heads=2, mlp_hidden=64, n_layers=2, max_seq_len=64)
    err = report["ckpt_error"]
    assert err and err["type"] == "CheckpointWriteError" and err["is_oserror"], err
    assert err["errno"] == (28 if mode == "tmpfs" else 27)
    assert err["message"].startswith(f"cannot write the checkpoint {root / 'ckpt'}: {reason};"), err
    assert f"the previous checkpoint at {root / 'ckpt'} is unchanged" in err["message"]
    assert fix in err["message"] and err["message"].endswith("then rerun the same command")
    assert report["ckpt_dir_after_failure"] == ["ckpt"]  # no .ckpt.flexmoe-tmp beside it
    meta, params = _model(out / "ckpt_after_failure")
    assert meta == {"seed": 0}
    _assert_same(params, _flat(model.init(cfg, 0)), "the checkpoint a failed save was to replace")
    meta, params = _model(out / "ckpt_after_rerun")
    assert meta == {"seed": 1}
    _assert_same(params, _flat(model.init(cfg, 1)), "the checkpoint saved once there was room")

    # (b) the trainer: the training state's save fails -> status 2, one line, the step-2 checkpoint intact.
    runs = report["runs"]
    run = runs["state_full"]
    assert run["rc"] == 2, run
    assert run["line"].startswith(f"flexmoe train: error: cannot save the training state in {w / 'state'}: {reason};")
    assert "the last complete checkpoint, step 2, is intact" in run["line"] and fix in run["line"]
    assert run["line"].endswith("then rerun the same command to resume from step 2")
    snap = out / "state_full"
    assert _complete_steps(snap) == [2] and not _leftovers(snap)
    _assert_same(_training_state(snap, 2), _training_state(reference, 2), "the step-2 training state")
    assert _model(snap / "model")[0]["steps"] == 2  # the earlier run's model, untouched

    if mode == "tmpfs":  # the state of step 4 fits, the final model does not
        run = runs["model_full"]
        assert run["rc"] == 2, run
        assert run["line"].startswith(f"flexmoe train: error: cannot write the checkpoint {w / 'model'}: {reason};")
        assert f"the previous checkpoint at {w / 'model'} is unchanged" in run["line"] and fix in run["line"]
        assert run["line"].endswith(f"then rerun the same command to resume: the training state of step 4 is saved "
                                    f"in {w / 'state'}, so the rerun only writes the outputs")
        snap = out / "model_full"
        assert _complete_steps(snap) == [2, 4] and not _leftovers(snap)
        _assert_same(_training_state(snap, 4), _training_state(reference, 4), "the step-4 training state")
        assert _model(snap / "model")[0]["steps"] == 2

    # Room again: the same command resumes and ends exactly where the uninterrupted run did.
    run = runs["room"]
    assert run["rc"] == 0, run
    snap = out / "room"
    assert _complete_steps(snap) == [2, 4] and not _leftovers(snap)
    meta, params = _model(snap / "model")
    assert meta["steps"] == 4
    _assert_same(params, _model(reference / "model")[1], "the final model after the disk-full runs")
    # Steps 1-2 by the earlier run, then two attempts that each resumed from step 2 (tmpfs: the two
    # failed runs, the last one resumed at step 4; rlimit: the failed run and the last one). None started over.
    log = _log(snap)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 3, 4]
    ref_loss = {r["step"]: r["loss"] for r in _log(reference)}
    assert all(r["loss"] == ref_loss[r["step"]] for r in log)


# ------------------------------------------------------------------------------------------
# Non-finite loss
# ------------------------------------------------------------------------------------------

def test_non_finite_loss_exits_2_and_keeps_a_loadable_checkpoint(data_dir, tmp_path, capsys):
    from flexmoe_jax import cli

    workdir = tmp_path / "nan"
    rc = cli.main(_args(data_dir, workdir, "RunConfig.steps=30", "OptimConfig.peak_lr=1e12",
                        "OptimConfig.clip_norm=1e30"))
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    line = err.strip().splitlines()[-1]  # the progress bar is closed first: the message is the last line
    assert line.startswith("flexmoe train: error: non-finite loss "), err[-3000:]
    assert "The last good checkpoint is step " in line and "lower the learning rate" in line
    last = int(line.split("The last good checkpoint is step ")[1].split()[0])
    assert _complete_steps(workdir)[-1] == last >= 1
    assert not (workdir / "model").exists()
    state = _training_state(workdir, last)
    assert state and all(np.isfinite(v).all() for v in state.values())
    bad = [r for r in _log(workdir) if not np.isfinite(r["loss"])]
    assert not bad  # the failing step is not logged either


if __name__ == "__main__" and sys.argv[1:2] == ["--disk-driver"]:
    _disk_driver(sys.argv[2])
