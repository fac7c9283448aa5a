"""Orbax checkpoints: bit-identical round trips, restore onto a mesh, atomic replace, clear errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flexmoe_jax import array_store, atomic_dir, checkpoint, model
from flexmoe_jax.config import tiny
from flexmoe_jax.sharding import make_mesh

REPO = Path(__file__).resolve().parent.parent

MOE = tiny()
DENSE = tiny(num_experts=0)


def random_params(config, seed=0):
    """Host arrays of the right shapes and dtypes (model.init would compile; this is instant)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), model.param_shapes(config))


@pytest.fixture(scope="module")
def moe_params():
    return jax.device_put(random_params(MOE))


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def siblings(path: Path) -> list[str]:
    return sorted(os.listdir(path.parent))


# ----------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("config", [MOE, DENSE, tiny(expert_bias=True, expert_names=("pub", "a", "b", "c"))],
                         ids=["moe", "dense", "moe_bias_named"])
def test_round_trip_bit_identical(tmp_path, config):
    params = jax.device_put(random_params(config, 1))
    path = tmp_path / "ckpt"
    assert checkpoint.save(path, config, params, metadata={"step": 3, "note": "x"}) == path
    assert sorted(os.listdir(path)) == ["config.json", "flexmoe_checkpoint.json", "metadata.json", "params"]
    assert siblings(path) == ["ckpt"]  # no temporaries left beside it

    config2, params2 = checkpoint.load(path)
    assert config2.to_dict() == config.to_dict() and config2.names == config.names
    assert_same(params, params2)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params2))
    assert checkpoint.load_config(path).to_dict() == config.to_dict()
    assert checkpoint.load_metadata(path) == {"step": 3, "note": "x"}


def test_host_numpy_bfloat16_round_trip(tmp_path):
    config = DENSE.replace(param_dtype="bfloat16")
    params = random_params(config, 2)
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    checkpoint.save(tmp_path / "c", config, params)
    config2, params2 = checkpoint.load(tmp_path / "c")
    assert config2.param_dtype == "bfloat16"
    assert_same(params, params2)
    assert checkpoint.load_metadata(tmp_path / "c") == {}


def test_load_with_dtype_casts_and_updates_config(tmp_path, moe_params):
    checkpoint.save(tmp_path / "c", MOE, moe_params)
    config2, params2 = checkpoint.load(tmp_path / "c", dtype="bfloat16")
    assert config2.param_dtype == "bfloat16"
    assert_same(jax.tree.map(lambda x: x.astype(jnp.bfloat16), moe_params), params2)


def test_sharded_save_restores_onto_another_mesh(tmp_path):
    src_mesh = make_mesh(expert=4, data=2)
    params = jax.device_put(random_params(MOE), model.param_shardings(MOE, src_mesh))
    assert params["layers"]["moe"]["gate"].sharding.spec[1] == "expert"
    checkpoint.save(tmp_path / "c", MOE, params)

    # Onto the same kind of mesh (the brief's layout) and onto a different one.
    for mesh in (make_mesh(expert=4, data=2), make_mesh(fsdp=4, tensor=2)):
        _, restored = checkpoint.load(tmp_path / "c", mesh=mesh)
        want = model.param_shardings(MOE, mesh)
        for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(want)):
            assert x.sharding == s, jax.tree_util.keystr(path)
        assert_same(params, restored)

    # An explicit shardings tree, or one Sharding for everything.
    mesh = make_mesh(data=8)
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, restored = checkpoint.load(tmp_path / "c", shardings=one)
    assert all(x.sharding == one for x in jax.tree.leaves(restored))
    with pytest.raises(ValueError, match="either mesh or shardings"):
        checkpoint.load(tmp_path / "c", mesh=mesh, shardings=one)


def test_load_subtree_reads_only_the_asked_parts(tmp_path, moe_params):
    checkpoint.save(tmp_path / "c", MOE, moe_params)
    mesh = make_mesh(expert=4, data=2)
    sub = checkpoint.load_subtree(tmp_path / "c", ["layers/moe", ("embed",), "layers/moe/gate"], mesh=mesh)
    assert sorted(sub) == ["embed", "layers"] and sorted(sub["layers"]) == ["moe"]
    assert_same({"embed": moe_params["embed"], "layers": {"moe": moe_params["layers"]["moe"]}}, sub)
    assert sub["layers"]["moe"]["up"].sharding == model.param_shardings(MOE, mesh)["layers"]["moe"]["up"]

    one = checkpoint.load_subtree(tmp_path / "c", "final_norm", dtype="bfloat16")
    assert list(one) == ["final_norm"] and one["final_norm"].dtype == jnp.bfloat16
    with pytest.raises(KeyError, match=r"no parameter subtree 'layers/mlp'.*'moe'"):
        checkpoint.load_subtree(tmp_path / "c", ["layers/mlp"])
    with pytest.raises(KeyError, match="embed/x"):
        checkpoint.load_subtree(tmp_path / "c", ["embed/x"])


def test_large_arrays_are_written_in_bounded_data_files(tmp_path, monkeypatch):
    # write_arrays caps Orbax's data files (and so its chunks) at DATA_FILE_BYTES, which bounds the
    # memory a write or read of a large array needs beyond the array itself. Shrunk here so that a
    # 1 MiB array counts as large: it is split over many data files and still reads back bit for bit.
    x = {"w": np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)}

    def data_files(d: Path) -> int:
        return sum(1 for p in d.rglob("*") if p.is_file() and p.parent.name == "d")

    checkpoint.write_arrays(tmp_path / "default", x)
    monkeypatch.setattr(array_store, "DATA_FILE_BYTES", 64 << 10)
    checkpoint.write_arrays(tmp_path / "small", x)
    assert data_files(tmp_path / "small") >= data_files(tmp_path / "default") + 8
    for d in ("default", "small"):
        np.testing.assert_array_equal(checkpoint.read_arrays(tmp_path / d)["w"], x["w"])


def test_fsync_tree_flushes_every_file_then_every_directory(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    files = [tmp_path / "x", tmp_path / "a" / "y", tmp_path / "a" / "b" / "z"]
    for f in files:
        f.write_text("1")
    flushed = []  # appended from the flushing threads
    monkeypatch.setattr(atomic_dir, "_fsync_file", lambda p: flushed.append(("file", Path(p))))
    monkeypatch.setattr(atomic_dir, "_fsync_dir", lambda p: flushed.append(("dir", Path(p))))
    atomic_dir._fsync_tree(tmp_path)
    assert sorted(flushed[:3]) == sorted(("file", f) for f in files)
    assert sorted(flushed[3:]) == sorted(("dir", d) for d in (tmp_path, tmp_path / "a", tmp_path / "a" / "b"))


# ----------------------------------------------------------------------------
# Atomic replace and crashes
# ----------------------------------------------------------------------------

def test_overwrite_replaces_and_leaves_nothing_behind(tmp_path, moe_params):
    path = tmp_path / "c"
    checkpoint.save(path, DENSE, random_params(DENSE), metadata={"v": 1})
    checkpoint.save(path, MOE, moe_params)  # a different model: the old files must all go
    config, params = checkpoint.load(path)
    assert config.is_moe and checkpoint.load_metadata(path) == {}
    assert_same(moe_params, params)
    assert siblings(path) == ["c"]


def test_overwrite_without_rename_exchange(tmp_path, moe_params, monkeypatch):
    monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)
    path = tmp_path / "c"
    checkpoint.save(path, DENSE, random_params(DENSE))
    checkpoint.save(path, MOE, moe_params)
    assert checkpoint.load_config(path).is_moe
    assert siblings(path) == ["c"]


def test_save_into_empty_directory(tmp_path, moe_params):
    (tmp_path / "c").mkdir()
    checkpoint.save(tmp_path / "c", MOE, moe_params)
    assert_same(moe_params, checkpoint.load(tmp_path / "c")[1])


def _boom(*args, **kwargs):
    raise RuntimeError("simulated failure")


@pytest.mark.parametrize("where", ["orbax", "fsync", "swap"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, moe_params, monkeypatch, where):
    path = tmp_path / "c"
    checkpoint.save(path, MOE, moe_params, metadata={"v": "old"})
    target = {"orbax": (ocp.Checkpointer, "save"), "fsync": (checkpoint, "_fsync_tree"),
              "swap": (atomic_dir, "_exchange")}[where]
    monkeypatch.setattr(*target, _boom)
    with pytest.raises(RuntimeError, match="simulated"):
        checkpoint.save(path, MOE, jax.tree.map(lambda x: x + 1, moe_params), metadata={"v": "new"})
    assert siblings(path) == ["c"]
    assert checkpoint.load_metadata(path) == {"v": "old"}
    assert_same(moe_params, checkpoint.load(path)[1])


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import numpy as np
    import jax
    from flexmoe_jax import atomic_dir, checkpoint, model
    from flexmoe_jax.config import tiny

    path, stage = Path(sys.argv[1]), sys.argv[2]
    def die(*a, **k):
        os._exit(17)  # a hard crash: no exception handlers, no cleanup
    if stage == "before_publish":
        checkpoint._fsync_tree = die
    elif stage == "between_renames":
        atomic_dir._exchange = lambda a, b: False
        real = os.rename
        def rename(src, dst):
            real(src, dst)
            if str(dst).endswith(".flexmoe-old"):
                die()
        os.rename = rename
    config = tiny()
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), model.param_shapes(config))
    checkpoint.save(path, config, params, metadata={"v": "new"})
    os._exit(0)
""")


def _crash_save(path: Path, stage: str) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(path), stage], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]


@pytest.mark.parametrize("stage", ["before_publish", "between_renames"])
@pytest.mark.slow  # over ~3 s on 2 cores
def test_killed_save_leaves_old_checkpoint_loadable(tmp_path, moe_params, stage):
    path = tmp_path / "c"
    checkpoint.save(path, MOE, moe_params, metadata={"v": "old"})
    _crash_save(path, stage)

    # Whatever the crash left, the old checkpoint loads and nothing half-written sits at path.
    assert checkpoint.load_metadata(path) == {"v": "old"}
    assert_same(moe_params, checkpoint.load(path)[1])
    if path.exists():
        assert sorted(os.listdir(path)) == ["config.json", "flexmoe_checkpoint.json", "metadata.json", "params"]

    # The next save cleans up after the crash.
    checkpoint.save(path, MOE, moe_params, metadata={"v": "next"})
    assert siblings(path) == ["c"]
    assert checkpoint.load_metadata(path) == {"v": "next"}


def test_killed_first_save_is_reported_clearly(tmp_path):
    path = tmp_path / "c"
    _crash_save(path, "before_publish")
    assert not path.exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        checkpoint.load(path)


# ----------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------

def test_load_errors_name_the_problem(tmp_path, moe_params):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path / 'nope'}"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="is a file"):
        checkpoint.load(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="empty directory"):
        checkpoint.load_config(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="not a flexmoe checkpoint"):
        checkpoint.load(tmp_path / "other")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="import-hf"):
        checkpoint.load(hf)
    leftovers = tmp_path / "leftovers"
    (leftovers / "params.orbax-checkpoint-tmp-123").mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match="temporary files.*interrupted"):
        checkpoint.load(leftovers)

    good = tmp_path / "good"
    checkpoint.save(good, MOE, moe_params)
    (good / "config.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="config.json is missing"):
        checkpoint.load(good)


def test_config_that_disagrees_with_arrays_names_the_tensor(tmp_path, moe_params):
    path = tmp_path / "c"
    checkpoint.save(path, MOE, moe_params)
    cfg = json.loads((path / "config.json").read_text())
    cfg["d_model"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    checkpoint.load_config(path)  # the config alone is valid
    for fn in (checkpoint.load, lambda p: checkpoint.load_subtree(p, ["embed"])):
        with pytest.raises(checkpoint.CheckpointError,
                           match=r"disagree.*\['embed'\] has shape \(256, 64\), config wants \(256, 128\)"):
            fn(path)

    cfg["d_model"], cfg["num_experts"] = 64, 0  # dense config over MoE arrays: wrong paths
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \['layers'\]\['mlp'\]"):
        checkpoint.load(path)
    (path / "config.json").write_text('{"d_model": 64, "no_such_field": 1}')
    with pytest.raises(checkpoint.CheckpointError, match="not a valid model config.*no_such_field"):
        checkpoint.load_config(path)


def test_save_refuses_to_clobber_and_validates_first(tmp_path, moe_params):
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a flexmoe checkpoint"):
        checkpoint.save(other, MOE, moe_params)
    assert os.listdir(other) == ["precious.txt"]
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(FileExistsError, match="is a file"):
        checkpoint.save(tmp_path / "file", MOE, moe_params)

    with pytest.raises(ValueError, match="do not match the model config"):
        checkpoint.save(tmp_path / "bad", DENSE, moe_params)
    with pytest.raises(ValueError, match="JSON-serializable"):
        checkpoint.save(tmp_path / "bad", MOE, moe_params, metadata={"x": object()})
    with pytest.raises(FileNotFoundError, match="parent directory"):
        checkpoint.save(tmp_path / "no" / "such" / "dir", MOE, moe_params)
    assert sorted(os.listdir(tmp_path)) == ["file", "other"]


def test_import_is_light():
    code = ("import sys, flexmoe_jax.checkpoint; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('orbax', 'tensorflow')]; "
            "assert not heavy, heavy")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
