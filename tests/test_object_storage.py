"""Checkpoints, merges and training on object storage (gs://), against a local GCS emulator.

Object storage has no rename: a checkpoint there is a pointer object naming its current generation
(see ``atomic_dir._writing_generation``). These tests check what the local tests check for the
rename-based path: bit-identical round trips, replacement that never exposes a partial checkpoint,
refusal to overwrite what is not ours, and clear errors.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from flexmoe_jax import checkpoint, model, storage
from flexmoe_jax.config import tiny

MOE = tiny()


def random_params(config, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), model.param_shapes(config))


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def bucket(gcs, request):
    """A fresh prefix in the emulator's bucket for each test."""
    import gcs_emulator

    return f"gs://{gcs_emulator.BUCKET}/{request.node.name}"


def test_paths_resolve_to_epath_for_urls_and_absolute_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("a/b") == tmp_path / "a" / "b"
    assert not storage.is_remote("a/b") and storage.is_remote("gs://b/x") and storage.is_remote("s3://b/x")


def test_round_trip_replace_and_generations(bucket):
    url = f"{bucket}/ckpt"
    p0, p1 = random_params(MOE, 0), random_params(MOE, 1)
    assert str(checkpoint.save(url, MOE, p0, metadata={"step": 1})) == url
    cfg, back = checkpoint.load(url)
    assert cfg == MOE and checkpoint.load_metadata(url) == {"step": 1}
    assert_same(p0, back)
    checkpoint.save(url, MOE, p1)  # replace: the next generation, then the pointer, then the old one goes
    assert_same(p1, checkpoint.load(url)[1])
    root = epath.Path(url)
    assert sorted(e.name for e in root.iterdir()) == ["flexmoe_checkpoint.json", "g000002"]
    assert json.loads((root / "flexmoe_checkpoint.json").read_text())["generation"] == "g000002"


def test_failed_save_keeps_the_previous_checkpoint(bucket):
    url = f"{bucket}/ckpt"
    p0 = random_params(MOE, 0)
    checkpoint.save(url, MOE, p0)
    with pytest.raises(RuntimeError, match="boom"):
        with checkpoint.writing(url) as tmp:
            checkpoint.write_arrays(tmp / "params", random_params(MOE, 1))
            raise RuntimeError("boom")
    assert_same(p0, checkpoint.load(url)[1])
    assert sorted(e.name for e in epath.Path(url).iterdir()) == ["flexmoe_checkpoint.json", "g000001"]


def test_unpublished_generation_is_not_a_checkpoint_and_is_replaced(bucket):
    url = f"{bucket}/ckpt"
    # What a save killed before it moved the pointer leaves: a generation and no pointer.
    checkpoint.write_arrays(epath.Path(url) / "g000001" / "params", random_params(MOE, 0))
    with pytest.raises(FileNotFoundError, match="interrupted"):
        checkpoint.load(url)
    p1 = random_params(MOE, 1)
    checkpoint.save(url, MOE, p1)  # publishes g000002 and removes the leftover
    assert_same(p1, checkpoint.load(url)[1])
    assert sorted(e.name for e in epath.Path(url).iterdir()) == ["flexmoe_checkpoint.json", "g000002"]


def test_refuses_to_overwrite_what_is_not_a_checkpoint(bucket):
    (epath.Path(bucket) / "notes" / "readme.txt").write_text("someone's files")
    with pytest.raises(FileExistsError, match="not a flexmoe checkpoint"):
        checkpoint.save(f"{bucket}/notes", MOE, random_params(MOE))
    assert (epath.Path(bucket) / "notes" / "readme.txt").read_text() == "someone's files"
    with pytest.raises(checkpoint.CheckpointError, match="not a flexmoe checkpoint"):
        checkpoint.load(f"{bucket}/notes")
    with pytest.raises(FileNotFoundError, match="nothing is stored there"):
        checkpoint.load(f"{bucket}/missing")


# ----------------------------------------------------------------------------
# Merge: experts read from gs://, the merged model written to gs://, opt-out at load
# ----------------------------------------------------------------------------

def _owners_on_gcs(bucket):
    """test_merge's owners (anchor, deliverables, run directories), written straight to gs://."""
    import types

    import test_merge as tm

    from flexmoe_jax import expert

    root = epath.Path(bucket) / "owners"
    anchor = jax.device_get(model.init(tm.CFG, 0))
    checkpoint.save(root / "anchor", tm.CFG, anchor)
    fp = expert.fingerprint(tm.CFG, anchor)
    public_row = np.random.default_rng(99).standard_normal((tm.L, tm.D)).astype(np.float32)
    owners = {n: tm.make_owner(root, anchor, fp, n, public_row, seed) for seed, n in enumerate(tm.NAMES)}
    return root, types.SimpleNamespace(anchor=anchor, public_row=public_row, owners=owners)


@pytest.mark.slow  # over ~3 s on 2 cores
def test_merge_from_and_to_object_storage_with_opt_out(bucket, tmp_path):
    import test_merge as tm

    from flexmoe_jax import loading, merge

    root, world = _owners_on_gcs(bucket)
    public_row = world.public_row

    abc = merge.merge(root / "anchor", [root / n / "expert" for n in tm.NAMES], f"{bucket}/abc",
                      public_router=public_row, progress=False)
    assert str(abc) == f"{bucket}/abc"
    want_cfg, want = tm.reference(world, tm.NAMES)
    cfg, params = loading.load(abc)
    assert cfg.expert_names == want_cfg.expert_names
    tm.assert_same(params, want)
    # Opt-out from object storage equals the merge without that expert, written locally from the same inputs.
    ab = merge.merge(root / "anchor", [root / n / "expert" for n in ("a", "b")], tmp_path / "ab",
                     public_router=public_row, progress=False)
    cfg_x, p_x = loading.load(abc, exclude=["c"])
    cfg_ab, p_ab = loading.load(ab)
    assert cfg_x.to_dict() == cfg_ab.to_dict()
    np.testing.assert_array_equal(tm.logits(cfg_x, p_x), tm.logits(cfg_ab, p_ab))
    # A run directory on gs:// (WORKDIR/expert + WORKDIR/model) resolves as it does locally.
    run_merge = merge.merge(root / "anchor", [root / "a"], f"{bucket}/a_only", public_router=public_row,
                            progress=False)
    tm.assert_same(loading.load(run_merge)[1], tm.reference(world, ("a",))[1])


def test_cli_on_object_storage(bucket, data_dir, tmp_path, capsys):
    """merge, info, verify and eval --exclude, every path a gs:// URL."""
    import test_merge as tm

    from flexmoe_jax import cli, loading, routing

    root, _ = _owners_on_gcs(bucket)
    # Each owner's (DP-released) routing stats beside its run directory on gs://, written through the
    # storage layer as train-expert writes them; the merge must carry them into a gs:// merged model.
    rng = np.random.default_rng(0)
    release = {"mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-6, "unit": "document", "noise_std": 1.0}
    for n in "abc":
        saved = routing.Stats(n, rng.normal(10, 1, tm.CFG.vocab_size).astype(np.float32),
                              {"vocab_size": tm.CFG.vocab_size, "task": n}, release=release
                              ).save(f"{root}/{n}/{routing.STATS_FILE}")
        assert str(saved).startswith("gs://") and not (Path.cwd() / "gs:").exists()
    out = f"{bucket}/merged"
    assert cli.main(["merge", "--anchor", str(root / "anchor"), "--expert", *(str(root / n) for n in "abc"),
                     "--out", out, "--public_router", "zeros"]) == 0
    carried = loading.read_routing_stats(out, ["a", "b", "c"])
    assert sorted(carried) == ["a", "b", "c"] and carried["b"].release["epsilon"] == 1.0
    np.testing.assert_array_equal(carried["a"].counts, routing.Stats.load(f"{root}/a/{routing.STATS_FILE}").counts)
    assert cli.main(["info", out]) == 0
    assert "public" in capsys.readouterr().out
    assert cli.main(["verify", out, str(root / "a" / "expert")]) == 0
    assert capsys.readouterr().out.count("ok gs://") == 2
    results = epath.Path(bucket) / "eval" / "r.json"
    assert cli.main(["eval", "--ckpt", out, "--name", "without_c", "--exclude", "c", "--data_dir", data_dir,
                     "--tasks", "flexmix_mini.humor", "--max_tokens", "512", "--json", str(results),
                     "--table", f"{bucket}/eval/r.md", "--plot", f"{bucket}/eval/r.png"]) == 0
    r = json.loads(results.read_text())
    assert np.isfinite(r["without_c"]["humor"]["bpb"])
    assert "without_c" in (epath.Path(bucket) / "eval" / "r.md").read_text()
    assert (epath.Path(bucket) / "eval" / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "without_c" in json.loads((epath.Path(bucket) / "eval" / "r.docs.json").read_text())


# ----------------------------------------------------------------------------
# Training with the work directory on gs://: SIGKILL, rerun, resume bit-identical
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_training_workdir_on_gs_resumes_after_sigkill(data_dir, bucket, tmp_path, gcs):
    import os
    import signal
    import subprocess
    import sys
    import time

    import orbax.checkpoint as ocp
    import test_trainer as tt

    from flexmoe_jax import cli

    total = 24
    steps = [f"RunConfig.steps={total}", "RunConfig.checkpoint_every=4", "RunConfig.log_every=1"]
    assert cli.main(tt._args(data_dir, tmp_path / "straight", *steps)) == 0

    killed = f"{bucket}/killed"
    cmd = [sys.executable, "-m", "flexmoe_jax.cli", *tt._args(data_dir, killed, *steps)]
    env = {**os.environ, **gcs.env, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = epath.Path(killed) / "state"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ocp.utils.checkpoint_steps(state):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    resume_at = max(ocp.utils.checkpoint_steps(state))
    assert 0 < resume_at < total
    assert not (epath.Path(killed) / "model").exists()
    before = [json.loads(x)["step"] for x in (epath.Path(killed) / "metrics.jsonl").read_text().splitlines()]
    assert before == list(range(1, len(before) + 1)) and resume_at <= len(before) < total

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = [json.loads(x)["step"] for x in (epath.Path(killed) / "metrics.jsonl").read_text().splitlines()]
    # The rerun started at the saved step K (not at 0): rows K+1.. follow the killed run's rows.
    assert after[:len(before)] == before and after[len(before):] == list(range(resume_at + 1, total + 1))
    a, b = tt._leaves(tmp_path / "straight" / "model"), tt._leaves(f"{killed}/model")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_anchor_kits_on_object_storage_are_refused_clearly(bucket):
    from flexmoe_jax import anchor_kit

    with pytest.raises(ValueError, match="local paths only"):
        anchor_kit.build("anchor", "data", f"{bucket}/kit")
    (epath.Path(bucket) / "kit" / anchor_kit.KIT_FILE).write_text("{}")
    with pytest.raises(ValueError, match="copy it to a local directory"):
        anchor_kit.is_kit(f"{bucket}/kit")
    assert not anchor_kit.is_kit(f"{bucket}/plain")


@pytest.mark.slow  # over ~3 s on 2 cores
def test_data_dir_on_object_storage_is_refused_with_the_fix():
    from flexmoe_jax import data

    with pytest.raises(ValueError, match="must be a local path.*gsutil -m cp -r gs://b/data"):
        data.register_tasks("gs://b/data")


def test_data_dir_in_a_bucket_is_staged_once_per_machine(bucket, data_dir, tmp_path, monkeypatch, capsys):
    """A command given a gs:// --data_dir reads a local copy made once (same bytes, reused after),
    and counts exactly what it counts from the local directory."""
    from pathlib import Path

    from flexmoe_jax import cli
    from flexmoe_jax.data import staging

    monkeypatch.setenv("FLEXMOE_DATA_CACHE", str(tmp_path / "cache"))
    local = Path(data_dir)
    names = sorted(str(f.relative_to(local)) for f in local.rglob("*") if f.is_file())
    url = f"{bucket}/data"
    for n in names:
        (epath.Path(url) / n).parent.mkdir(parents=True, exist_ok=True)
        (epath.Path(url) / n).write_bytes((local / n).read_bytes())
    with pytest.raises(ValueError, match="no manifest.json there"):
        staging.stage(f"{bucket}/nothing", log=None)

    for where, out in ((url, tmp_path / "remote.npz"), (data_dir, tmp_path / "local.npz")):
        assert cli.main(["routing-stats", "--data_dir", where, "--task", "flexmix_mini.humor", "--out", str(out),
                         "--routing_seed", "0"]) == 0  # the same release noise: equal files
    assert "staged gs://" in capsys.readouterr().err
    remote, here = np.load(tmp_path / "remote.npz"), np.load(tmp_path / "local.npz")
    assert sorted(remote.files) == sorted(here.files) and "counts" in here.files
    for k in here.files:
        if k != "meta":  # meta names the directory read
            np.testing.assert_array_equal(remote[k], here[k])

    (copy,) = (tmp_path / "cache").iterdir()  # one copy, published whole (no temporary left)
    assert sorted(str(f.relative_to(copy)) for f in copy.rglob("*") if f.is_file()) == names
    assert all((copy / n).read_bytes() == (local / n).read_bytes() for n in names)
    stamp = (copy / "manifest.json").stat().st_mtime_ns
    assert staging.stage(url, log=None) == str(copy)  # reused, not copied again
    assert (copy / "manifest.json").stat().st_mtime_ns == stamp
