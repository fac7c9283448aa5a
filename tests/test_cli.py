"""The flexmoe command line: import/export round trip, info, demo --quick, errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from flexmoe_jax import checkpoint, cli, hf, model
from flexmoe_jax.config import tiny


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "flexmoe_jax.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("demo", "import-hf", "export-hf", "info"):
        assert cmd in out


def test_export_then_import_roundtrip(tmp_path, capsys):
    cfg = tiny(expert_names=("public", "code", "math", "bible"))
    params = model.init(cfg, 1)
    checkpoint.save(str(tmp_path / "ckpt"), cfg, params)
    assert cli.main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["model_type"] == "flex_olmo"
    assert cli.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    cfg2, params2 = checkpoint.load(str(tmp_path / "back"))
    assert cfg2.names == cfg.names and cfg2.top_k == cfg.top_k
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)
    assert cli.main(["info", str(tmp_path / "back")]) == 0
    assert "experts (slot order): ['public', 'code', 'math', 'bible']" in capsys.readouterr().out


def test_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    assert cli.main(["import-hf", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexmoe import-hf: error:") and "\n" not in err
    assert not os.path.exists(tmp_path / "out")
    os.makedirs(tmp_path / "other")
    with open(tmp_path / "other" / "config.json", "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, f)
    assert cli.main(["import-hf", str(tmp_path / "other"), str(tmp_path / "out")]) == 2
    assert "llama" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
    assert cli.main(["export-hf", str(tmp_path / "nockpt"), str(tmp_path / "hf")]) == 2
    assert not os.path.exists(tmp_path / "hf")
    capsys.readouterr()
    assert cli.main(["privacy", "--ckpt", str(tmp_path / "x"), "--trained_from", "code"]) == 2
    err = capsys.readouterr().err.strip()
    assert "DOMAIN=RUN_DIR" in err and "\n" not in err


def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    """A command interrupted by Ctrl-C (a real SIGINT delivered to the process) prints one line, no
    traceback, and exits 130; its output was written atomically, so nothing half-done is left."""
    import signal

    from flexmoe_jax.cli import merging

    def interrupted(args):
        os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt here
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(merging, "_cmd_merge", interrupted)
    rc = cli.main(["merge", "--anchor", str(tmp_path / "a"), "--expert", str(tmp_path / "e"), "--out",
                   str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err == "flexmoe merge: interrupted; nothing half-written was left in place"


def test_eval_selection_flags_with_several_checkpoints_are_refused(tmp_path, capsys):
    rc = cli.main(["eval", "--ckpt", str(tmp_path / "a"), str(tmp_path / "b"), "--exclude", "code"])
    err = capsys.readouterr().err
    assert rc == 2 and "--exclude would apply to all 2 --ckpt" in err and "same --json" in err


def test_excluding_the_public_expert_says_what_it_means(tmp_path, capsys):
    cfg = tiny(num_experts=2, top_k=2, expert_names=("public", "code"))
    checkpoint.save(str(tmp_path / "m"), cfg, model.init(cfg, 0))
    assert cli.main(["info", str(tmp_path / "m")]) == 0
    assert "warning" not in capsys.readouterr().err
    rc = cli.main(["generate", "--ckpt", str(tmp_path / "m"), "--data_dir", str(tmp_path / "none"), "--prompt", "x",
                   "--exclude", "public"])
    err = capsys.readouterr().err
    assert rc == 2 and "warning: --exclude public opts out the public expert" in err


@pytest.mark.slow  # over ~3 s on 2 cores
def test_demo_checks_quick(tmp_path):
    work = str(tmp_path / "demo")
    assert cli.main(["demo", "--checks", "--quick", "--workdir", work]) == 0
    with open(os.path.join(work, "results", "demo.json")) as f:
        r = json.load(f)
    for impl in ("dense", "ragged", "blocks"):
        assert r["dispatch"][impl]["max_abs_diff_vs_dense"] < 1e-4
    assert r["opt_out"]["mask_vs_removal_max_abs_diff"] == 0.0
    assert r["checkpoint"]["bit_identical"]
    assert r["hf"]["roundtrip_max_abs_diff"] == 0.0
    if "transformers_max_abs_diff" in r["hf"]:
        assert r["hf"]["transformers_max_abs_diff"] < 1e-4
    cfg, _ = hf.from_hf(os.path.join(work, "hf"))
    assert cfg.names == ("public", "code", "math", "literature")


@pytest.mark.slow  # over ~3 s on 2 cores
def test_commands_mute_tensorflow_start_up_lines():
    """TensorFlow's C++ lines on import (absl pre-init, cudart stubs, CPU features) do not reach a
    command's stderr, while TensorFlow still works and a Python error from the import would show."""
    code = ("import os\n"
            "from flexmoe_jax import tf_quiet\n"
            "os.environ.pop('TF_CPP_MIN_LOG_LEVEL', None)\n"
            "tf_quiet.install()\n"
            "import tensorflow as tf\n"
            "print(int(tf.constant(2) + 1), list(tf.data.Dataset.range(2).as_numpy_iterator()))\n"
            "import sys; print('after', file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0].startswith("3 ")
    assert r.stderr.strip() == "after", r.stderr  # stderr works again, and carried nothing else


def test_demo_ablation_and_sweep_flags_need_a_finished_demo(tmp_path, capsys):
    # Each part of the ablations, and the anchor sweep, works on a finished demo; on an empty work
    # directory each fails with one line that says to run the demo first.
    args = cli.build_parser().parse_args(["demo", "--workdir", str(tmp_path), "--ablations", "knobs"])
    assert args.ablations == ["knobs"] and args.anchor_sweep is None
    assert cli.build_parser().parse_args(["demo", "--ablations"]).ablations == []  # bare: every part
    assert cli.main(["demo", "--workdir", str(tmp_path), "--anchor_sweep", "0"]) == 2
    assert "positive step counts" in capsys.readouterr().err
    from flexmoe_jax.demo import ablations, anchor_strength

    for fn in (lambda: ablations.main(tmp_path, parts=("knobs",)), lambda: anchor_strength.main(tmp_path, [400])):
        with pytest.raises(ValueError, match="run `flexmoe demo` there first"):
            fn()
