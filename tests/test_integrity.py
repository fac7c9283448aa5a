"""Every checkpoint verified when it is read (flexmoe_jax.array_store, flexmoe verify).

The checkpoints are the quick demo's own (anchor, owner deliverable, dense expert, merged model,
training states) plus an anchor kit built here, copied before damaging. Damage is what a bad disk
or a careless copy does: 8 bytes overwritten inside an array's data file, or the file cut short.
Every command that reads the damaged checkpoint must stop with exit 2 and one line naming the
checkpoint, the array and the fix, before it writes anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from flexmoe_jax import array_store, checkpoint, cli, model, verify
from flexmoe_jax.config import tiny


def _data_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file() and p.parent.name == "d"
                   and p.stat().st_size > 1024), key=lambda p: -p.stat().st_size)


def damage(root: Path, how: str = "overwrite") -> Path:
    """Overwrite 8 bytes in the middle of the largest array data file under ``root`` (or cut it)."""
    f = _data_files(root)[0]
    size = f.stat().st_size
    if how == "truncate":
        os.truncate(f, size // 2)
    else:
        with open(f, "r+b") as fh:
            fh.seek(size // 2)
            old = fh.read(8)
            fh.seek(size // 2)
            fh.write(bytes(b ^ 0x5A for b in old))
    return f


@pytest.fixture(scope="module")
def demo(quick_demo):
    return quick_demo["dir"]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


# A tqdm bar's counter and timer ("2/4 [00:02<00:02"), whatever its rate unit (step/s or s/step).
_TQDM = re.compile(r"\d+/\d+ \[\d+:\d\d")


def assert_integrity_error(rc: int, err: str, ckpt: Path) -> None:
    assert rc == 2, err
    # One line of its own (train commands first say what JAX sees; a progress bar may precede it):
    # no tracebacks from the reads still in flight.
    lines = [line for line in err.splitlines() if not line.startswith("JAX devices:") and not _TQDM.search(line)]
    assert len(lines) == 1 and lines[0].startswith("flexmoe "), err
    assert "failed the integrity check" in err and str(ckpt) in err, err
    assert "re-copy" in err and " array " in err, err  # names the damaged array and the fix


def test_untouched_checkpoints_verify_ok_and_record_codes(demo, capsys):
    paths = [demo / "anchor" / "model", demo / "experts" / "code" / "expert", demo / "experts_dense" / "code" / "model",
             demo / "merged", demo / "anchor"]
    capsys.readouterr()
    assert cli.main(["verify", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(paths) and all(line.startswith("ok ") for line in lines), lines
    for p in paths[:-1]:
        assert json.loads((p / checkpoint.MARKER_NAME).read_text())["integrity"] == checkpoint.INTEGRITY
    r = verify.verify(demo / "anchor")  # a training run: the final model and every saved state
    assert r.ok and r.directories >= 2 and not r.uncoded, r.line()
    assert all(array_store.has_codes(d) for d in verify._array_dirs(demo / "merged"))


@pytest.mark.parametrize("how", ["overwrite", "truncate"])
def test_damaged_anchor_is_refused_by_every_reader(demo, tmp_path, capsys, how):
    anchor = copy(demo / "anchor" / "model", tmp_path / "anchor")
    damage(anchor, how)
    data = demo / "data"
    out = tmp_path / "out"
    assert_integrity_error(*run(capsys, "eval", "--ckpt", anchor, "--data_dir", data, "--mc_items", 0), anchor)
    assert_integrity_error(*run(capsys, "generate", "--ckpt", anchor, "--prompt", "The", "--data_dir", data,
                                "--max_new_tokens", 2), anchor)
    assert_integrity_error(*run(capsys, "export-hf", anchor, out), anchor)
    assert not out.exists()
    assert_integrity_error(*run(capsys, "train-expert", "--anchor", anchor, "--task", "flexmix_mini.code",
                                "--out", out, "--data_dir", demo / "owners" / "code" / "data"), anchor)
    assert not (out / "expert").exists() and not (out / "model").exists()
    assert_integrity_error(*run(capsys, "merge", "--anchor", anchor, "--expert", demo / "experts" / "code",
                                "--out", out / "merged"), anchor)
    assert not (out / "merged").exists()
    assert_integrity_error(*run(capsys, "privacy", "--ckpt", anchor, "--data_dir", data, "--docs", 1,
                                "--samples", 1), anchor)
    rc, _ = run(capsys, "verify", anchor)
    assert rc == 2
    from flexmoe_jax.sharding import make_mesh

    mesh = make_mesh(1, 2, 2, 1, devices=jax.devices()[:4])
    with pytest.raises(checkpoint.IntegrityError) as e:
        checkpoint.load(anchor, mesh=mesh)
    assert e.value.arrays and str(anchor) in str(e.value)


def test_damaged_merged_model_deliverable_and_dense_expert(demo, tmp_path, capsys):
    data = demo / "data"
    merged = copy(demo / "merged", tmp_path / "merged")
    damage(merged / checkpoint.PARAMS_DIR)
    out = tmp_path / "out"
    assert_integrity_error(*run(capsys, "tune-router", "--ckpt", merged, "--out", out, "--data_dir", data), merged)
    assert_integrity_error(*run(capsys, "calibrate", "--ckpt", merged, "--out", out, "--data_dir", data), merged)
    assert_integrity_error(*run(capsys, "eval", "--ckpt", merged, "--data_dir", data, "--mc_items", 0), merged)
    assert not out.exists()

    owner = copy(demo / "experts" / "code", tmp_path / "owner_code")
    damage(owner / "expert")
    rc, err = run(capsys, "merge", "--anchor", demo / "anchor" / "model", "--expert", owner,
                  demo / "experts" / "math", "--out", out)
    assert_integrity_error(rc, err, owner / "expert")
    assert not out.exists()
    r = verify.verify(owner)
    assert not r.ok and any(x.startswith("expert/params:") for x in r.damaged), r.line()

    dense = copy(demo / "experts_dense" / "code" / "model", tmp_path / "dense")
    damage(dense)
    assert_integrity_error(*run(capsys, "eval", "--ckpt", dense, "--data_dir", data, "--mc_items", 0), dense)


def test_damaged_anchor_kit(demo, tmp_path, capsys):
    kit = tmp_path / "kit"
    # The kit hard-links its anchor's files: build it from a copy, so damaging it spares the demo's.
    anchor = copy(demo / "anchor" / "model", tmp_path / "anchor")
    rc, err = run(capsys, "anchor-kit", "--anchor", anchor, "--data_dir", demo / "data",
                  "--out", kit, "--router_init", "zeros")
    assert rc == 0, err
    assert verify.verify(kit).ok
    damage(kit)
    rc, err = run(capsys, "train-expert", "--anchor", kit, "--task", "flexmix_mini.code", "--out", tmp_path / "o",
                  "--data_dir", demo / "owners" / "code" / "data")
    assert rc == 2 and "failed the integrity check" in err and str(kit) in err, err
    rc, _ = run(capsys, "verify", kit)
    assert rc == 2


def test_damaged_training_state_stops_the_resume(data_dir, tmp_path, capsys):
    from test_trainer_faults import FIRST_HALF, _args

    work = tmp_path / "run"
    assert cli.main(_args(data_dir, work, *FIRST_HALF)) == 0
    state = work / "state" / "2"
    damage(state)
    rc, err = run(capsys, *_args(data_dir, work))
    assert rc == 2 and "training state" in err and str(state) in err and f"delete {state}" in err, err
    r = verify.verify(work)
    assert not r.ok and any(x.startswith("state/2/") for x in r.damaged), r.line()


def test_checkpoint_without_codes_loads_bit_identically_with_one_warning(tmp_path, caplog):
    import orbax.checkpoint as ocp

    cfg = tiny()
    params = model.init(cfg, 3)
    path = checkpoint.save(tmp_path / "new", cfg, params)
    # The format before integrity codes: zarr v2 arrays, no "integrity" in the marker.
    old = tmp_path / "old"
    shutil.copytree(path, old)
    shutil.rmtree(old / checkpoint.PARAMS_DIR)
    ocp.PyTreeCheckpointer().save(old / checkpoint.PARAMS_DIR, args=ocp.args.PyTreeSave(jax.device_get(params)))
    marker = json.loads((old / checkpoint.MARKER_NAME).read_text())
    del marker["integrity"]
    (old / checkpoint.MARKER_NAME).write_text(json.dumps(marker))
    assert not array_store.has_codes(old / checkpoint.PARAMS_DIR)
    with caplog.at_level(logging.WARNING, logger="flexmoe_jax.checkpoint"):
        _, a = checkpoint.load(old)
        _, b = checkpoint.load(path)
    warned = [r for r in caplog.records if "integrity codes" in r.getMessage()]
    assert len(warned) == 1 and str(old) in warned[0].getMessage()
    for x, y, z in zip(jax.tree.leaves(params), jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    r = verify.verify(old)
    assert r.ok and r.uncoded == ["params"] and "no integrity codes" in r.line()


def test_verify_names_every_damaged_array_and_rejects_non_checkpoints(tmp_path, capsys):
    cfg = tiny()
    path = checkpoint.save(tmp_path / "m", cfg, model.init(cfg, 0))
    files = _data_files(path)
    for f in files[:2]:  # two arrays' data files (the biggest arrays get their own)
        with open(f, "r+b") as fh:
            fh.seek(100)
            fh.write(b"\0\1\2\3\4\5\6\7")
    r = verify.verify(path)
    assert len(r.damaged) >= 1 and all(x.startswith("params: ") for x in r.damaged), r.line()
    assert r.line().startswith("DAMAGED") and "re-copy" in r.line()
    (tmp_path / "empty").mkdir()
    rc, err = run(capsys, "verify", tmp_path / "empty")
    assert rc == 2 and "no flexmoe arrays" in err


def test_concurrent_reads_put_stderr_back(tmp_path):
    """Reads hold stderr while they run (to drop the noise of a failed read); several at once, some
    failing, must leave Python's stderr, the unraisable hook and file descriptor 2 as they were."""
    import sys
    import threading

    cfg = tiny()
    good = checkpoint.save(tmp_path / "good", cfg, model.init(cfg, 0))
    bad = copy(good, tmp_path / "bad")
    damage(bad)
    before = (sys.stderr, sys.unraisablehook, os.fstat(2).st_ino)
    errors: list = []

    def read(path):
        try:
            array_store.read_arrays(path / checkpoint.PARAMS_DIR)
        except checkpoint.IntegrityError as e:
            errors.append(e)

    threads = [threading.Thread(target=read, args=(p,)) for p in (good, bad, good, bad, good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 2 and all(e.arrays for e in errors)
    assert (sys.stderr, sys.unraisablehook, os.fstat(2).st_ino) == before
