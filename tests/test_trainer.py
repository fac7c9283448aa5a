"""End to end on real (small) FlexMix-mini data: pretrain, expert training, SIGKILL resume, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flexmoe_jax import checkpoint, cli, expert, optim, train, trainer
from flexmoe_jax.config import ModelConfig

TINY = ["ModelConfig.vocab_size=512", "ModelConfig.d_model=32", "ModelConfig.n_heads=2",
        "ModelConfig.mlp_hidden=64", "ModelConfig.n_layers=2", "ModelConfig.max_seq_len=64",
        "RunConfig.seq_len=64", "RunConfig.batch_size=8", "OptimConfig.warmup_steps=1", "RunConfig.log_every=2"]


def _args(data_dir, workdir, *extra):
    params = TINY + [f'RunConfig.data_dir="{data_dir}"', *extra]
    out = ["train", "--gin_file", "phase/pretrain.gin", "--workdir", str(workdir)]
    for p in params:
        out += ["--gin_param", p]
    return out


def _leaves(path):
    _, params = checkpoint.load(path)
    return {k: np.asarray(v) for k, v in optim.flatten(params).items()}


def test_pretrain_then_expert(data_dir, tmp_path, capsys):
    assert cli.main(_args(data_dir, tmp_path / "anchor", "RunConfig.steps=6", "RunConfig.checkpoint_every=3")) == 0
    log = [json.loads(line) for line in open(tmp_path / "anchor" / "metrics.jsonl")]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in log)
    assert os.path.isdir(tmp_path / "anchor" / "tb")
    anchor = str(tmp_path / "anchor" / "model")
    cfg = checkpoint.load_config(anchor)
    assert cfg.vocab_size == 512 and not cfg.is_moe

    assert cli.main(["train-expert", "--anchor", anchor, "--task", "flexmix_mini.humor", "--out",
                     str(tmp_path / "humor"), "--data_dir", data_dir, "--gin_param", "RunConfig.steps=4",
                     "--gin_param", "RunConfig.seq_len=64", "--gin_param", "RunConfig.batch_size=8",
                     "--gin_param", "OptimConfig.warmup_steps=1", "--gin_param", "RunConfig.log_every=2"]) == 0
    ecfg, eparams = checkpoint.load(str(tmp_path / "humor" / "model"))
    assert ecfg.names == ("public", "humor") and ecfg.top_k == 2
    # The owner's token counts for domain routing, counted in its own process from its own data.
    from flexmoe_jax import routing

    stats = routing.Stats.load(tmp_path / "humor" / routing.STATS_FILE)
    # By default a (1, 1e-6)-DP release: the clipped per-document sums plus Gaussian noise of the recorded std.
    from flexmoe_jax import private_stats

    assert stats.name == "humor" and stats.counts.shape == (ecfg.vocab_size,) and not stats.exact
    assert (stats.release["epsilon"], stats.release["delta"], stats.release["unit"]) == (1.0, 1e-6, "document")
    uni, pairs = private_stats.document_sum(routing.count(data_dir, "flexmix_mini.humor", seq_len=64,
                                                          vocab_size=ecfg.vocab_size))
    noise = np.concatenate([stats.counts - uni, stats.sketch - pairs])
    assert abs(noise.mean()) < 0.05 and noise.std() == pytest.approx(stats.release["noise_std"], rel=0.02)
    meta = checkpoint.load_metadata(str(tmp_path / "humor" / "model"))
    acfg, aparams = checkpoint.load(anchor)
    assert meta["anchor_fingerprint"] == expert.fingerprint(acfg, aparams)
    # Every frozen tensor is bit-identical to the anchor; the new slot moved.
    a, e = optim.flatten(jax.device_get(aparams)), optim.flatten(jax.device_get(eparams))
    for k, v in a.items():
        if k.startswith("layers/mlp/"):
            moe_k = k.replace("layers/mlp/", "layers/moe/")
            np.testing.assert_array_equal(e[moe_k][:, 0], v)
            assert not np.array_equal(e[moe_k][:, 1], v)
        else:
            np.testing.assert_array_equal(e[k], v, err_msg=k)
    # Router rows from the anchor's own hidden states: public row != humor row, both inside the unit ball.
    assert meta["router_init"] == "hidden"
    router = np.asarray(e["layers/moe/router"])
    assert not np.allclose(router[:, 0], router[:, 1])
    assert (np.linalg.norm(router[:, 0], axis=-1) <= 1.0 + 1e-5).all()
    # The deliverable: only the trained tensors plus a manifest tying them to the anchor.
    manifest, trained = expert.load_deliverable(str(tmp_path / "humor" / "expert"))
    assert manifest["name"] == "humor" and manifest["anchor_fingerprint"] == meta["anchor_fingerprint"]
    assert manifest["trained"] == ["layers/moe/bias", "layers/moe/down", "layers/moe/gate",
                                   "layers/moe/router", "layers/moe/up"]
    assert manifest["steps"] == 4 and "RunConfig.phase" in manifest["gin_config"]
    # Nothing that identifies the owner's data: no card hash, no path on its disk.
    assert "data_card_sha256" not in manifest and data_dir not in json.dumps(manifest)
    for k, v in optim.flatten(trained).items():
        np.testing.assert_array_equal(v[:, 0], e[k][:, 1])
    with pytest.raises(ValueError, match="not a full model"):
        checkpoint.load(str(tmp_path / "humor" / "expert"))
    last = [json.loads(line) for line in open(tmp_path / "humor" / "metrics.jsonl")][-1]
    assert "expert_share/humor" in last and "expert_gate/humor" in last
    # A finished run is never relabelled: another task or name into the same --out is refused, and
    # its deliverable stays the owner's; an unknown task leaves no directory behind.
    owner = ["--anchor", anchor, "--data_dir", data_dir, "--gin_param", "RunConfig.steps=4", "--gin_param",
             "OptimConfig.warmup_steps=1"]
    for other in (["--task", "flexmix_mini.public_gcide"], ["--task", "flexmix_mini.humor", "--name", "poems"]):
        assert cli.main(["train-expert", *owner, *other, "--out", str(tmp_path / "humor")]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "'flexmix_mini.humor' (asked: 'flexmix_mini.public_gcide')" in err
    assert expert.load_deliverable(str(tmp_path / "humor" / "expert"))[0]["name"] == "humor"
    assert cli.main(["train-expert", *owner, "--task", "flexmix_mini.no_such", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # The model builder's side, on what training really wrote: merge the run, then opt in/out.
    from flexmoe_jax import loading, model

    assert cli.main(["merge", "--anchor", anchor, "--expert", str(tmp_path / "humor"),
                     "--out", str(tmp_path / "merged")]) == 0
    mcfg, mparams = loading.load(str(tmp_path / "merged"))
    assert mcfg.names == ("public", "humor")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(mparams), jax.device_get(eparams))
    toks = np.arange(3, 35, dtype=np.int32)[None]
    pcfg, pparams = loading.load(str(tmp_path / "merged"), exclude=["humor"])
    np.testing.assert_allclose(model.forward(pcfg, pparams, toks), model.forward(acfg, aparams, toks), atol=1e-5)


@pytest.mark.slow
def test_sigkill_resume_is_bit_identical(data_dir, tmp_path):
    """SIGKILL after a checkpoint, rerun the same command: it resumes from that step and ends bit-identical.

    Training is deterministic, so a bit-identical end alone would not tell a resume from a restart:
    the rerun must also start at the saved step K (its first metrics row is K + 1, its progress bar
    starts at K/40) and must not redo steps 1..K.
    """
    total = 40
    steps = [f"RunConfig.steps={total}", "RunConfig.checkpoint_every=4", "RunConfig.log_every=1"]
    assert cli.main(_args(data_dir, tmp_path / "straight", *steps)) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "flexmoe_jax.cli", *_args(data_dir, killed, *steps)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = killed / "state"

    def complete_steps():  # orbax finalizes a step by renaming its tmp directory to the bare number
        return [int(p.name) for p in state.iterdir() if p.name.isdigit()] if state.is_dir() else []

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if complete_steps():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    # Killed mid-run: a checkpoint exists, the run had not finished, the model was never written.
    resume_at = max(complete_steps())
    assert 0 < resume_at < total
    assert not (killed / "model").exists()
    before = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert before == list(range(1, len(before) + 1)) and resume_at <= len(before) < total

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # The rerun appends to the same metrics.jsonl: its rows start at K + 1, so steps 1..K ran once.
    after = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert after[:len(before)] == before
    assert after[len(before):] == list(range(resume_at + 1, total + 1)), (resume_at, after[len(before):][:8])
    # The progress bar starts at initial=start: the rerun's first count is K, never 0.
    counts = re.findall(rf"(\d+)/{total}\b", rerun.stderr)
    assert counts and int(counts[0]) == resume_at, (resume_at, counts[:5])
    a, b = _leaves(tmp_path / "straight" / "model"), _leaves(killed / "model")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_non_finite_loss_stops_and_keeps_last_good(data_dir, tmp_path):
    rc = trainer.RunConfig(data_dir=data_dir, task="flexmix_mini.public", steps=30, batch_size=8, seq_len=64,
                           checkpoint_every=1, log_every=1)
    cfg = ModelConfig(vocab_size=512, d_model=32, n_heads=2, mlp_hidden=64, n_layers=2, max_seq_len=64)
    ocfg = optim.OptimConfig(peak_lr=1e12, warmup_steps=0, clip_norm=1e30)
    with pytest.raises(trainer.TrainingError, match="non-finite loss .* last good checkpoint is step"):
        trainer.run(tmp_path / "nan", cfg, rc, ocfg, progress=False)
    assert not (tmp_path / "nan" / "model").exists()
    saved = sorted(int(p.name) for p in (tmp_path / "nan" / "state").iterdir() if p.name.isdigit())
    assert saved  # the last good state is still there for a rerun with a lower learning rate


def test_bad_gin_and_mismatched_anchor(data_dir, tmp_path, capsys):
    assert cli.main(["train", "--gin_file", "phase/pretrain.gin", "--gin_param", "RunConfg.steps=3",
                     "--workdir", str(tmp_path / "x")]) == 2
    assert "RunConfg" in capsys.readouterr().err
    assert cli.main(["train", "--gin_file", "phase/nope.gin", "--workdir", str(tmp_path / "x")]) == 2
    assert "gin file 'phase/nope.gin' not found" in capsys.readouterr().err
    anchor = tmp_path / "a"
    cfg = ModelConfig(vocab_size=512, d_model=32, n_heads=2, mlp_hidden=64, n_layers=2, max_seq_len=64)
    from flexmoe_jax import model

    checkpoint.save(str(anchor), cfg, model.init(cfg, 0))
    assert cli.main(["train-expert", "--anchor", str(anchor), "--task", "flexmix_mini.humor", "--out",
                     str(tmp_path / "e"), "--data_dir", data_dir, "--gin_param", "ModelConfig.d_model=48"]) == 2
    assert "differs from the anchor" in capsys.readouterr().err


def test_routing_loss_teaches_the_router_owner_vs_public(data_dir, tmp_path):
    """LossConfig.route_weight with public replay: the router rows (and bias) learn own text -> own
    slot, public text -> public slot; on a held batch the routing loss is lower than without it, at
    the same language-model loss. Needs public replay (refused without)."""
    from flexmoe_jax import data
    from flexmoe_jax.data import tasks

    assert cli.main(_args(data_dir, tmp_path / "anchor", "RunConfig.steps=40", "RunConfig.checkpoint_every=40",
                          "OptimConfig.peak_lr=0.01")) == 0
    anchor = str(tmp_path / "anchor" / "model")
    with pytest.raises(ValueError, match="public replay"):
        trainer.run(tmp_path / "x", None, trainer.RunConfig(phase="expert", anchor=anchor, expert_name="humor",
                                                              task="flexmix_mini.humor", data_dir=data_dir, steps=1),
                    loss_cfg=train.LossConfig(route_weight=1.0))
    common = ["--anchor", anchor, "--task", "flexmix_mini.humor", "--data_dir", data_dir]
    for p in ("RunConfig.steps=24", "RunConfig.seq_len=64", "RunConfig.batch_size=8", "OptimConfig.warmup_steps=1",
              "RunConfig.log_every=4", "RunConfig.public_replay=0.5", "RunConfig.router_init=\"zeros\""):
        common += ["--gin_param", p]
    mix = tasks.register_replay_mixture("flexmix_mini.humor", "flexmix_mini.public", 0.5, data_dir)
    it = data.batches(mix, "train", 64, 64, data_dir, seed=7, row_task=True)
    held = next(it)  # a batch of another seed than training's
    held = {k: v for k, v in held.items() if k != "row_task"} | {
        "route_target": (held["row_task"] == it.tasks.index("flexmix_mini.humor")).astype(np.int32)}
    measured = {}
    for w in (0.0, 1.0):
        out = tmp_path / f"w{w}"
        assert cli.main(["train-expert", *common, "--out", str(out), "--gin_param",
                         f"LossConfig.route_weight={w}"]) == 0
        log = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert ("route_acc" in log[-1]) == (w > 0)
        cfg, params = checkpoint.load(str(out / "model"))
        _, m = train.loss_and_metrics(cfg, params, held, train.LossConfig(route_weight=1.0))
        measured[w] = {k: float(m[k]) for k in ("route_ce", "route_acc", "ce")}
    assert measured[1.0]["route_ce"] < measured[0.0]["route_ce"] - 0.005, measured
    assert measured[1.0]["route_acc"] > measured[0.0]["route_acc"], measured
    assert abs(measured[1.0]["ce"] / measured[0.0]["ce"] - 1) < 0.01, measured


def test_train_dense_continues_the_whole_anchor(data_dir, tmp_path):
    """The paper's dense expert: every anchor parameter trains on the owner's data; a dense model comes out,
    tied to its anchor by fingerprint."""
    assert cli.main(_args(data_dir, tmp_path / "anchor", "RunConfig.steps=2", "RunConfig.checkpoint_every=2")) == 0
    anchor = str(tmp_path / "anchor" / "model")
    assert cli.main(["train-dense", "--anchor", anchor, "--task", "flexmix_mini.humor", "--data_dir", data_dir,
                     "--out", str(tmp_path / "dense"), "--gin_param", "RunConfig.steps=3", "--gin_param",
                     "RunConfig.seq_len=64", "--gin_param", "RunConfig.batch_size=8", "--gin_param",
                     "OptimConfig.warmup_steps=1"]) == 0
    cfg, _ = checkpoint.load(str(tmp_path / "dense" / "model"))
    acfg, aparams = checkpoint.load(anchor)
    assert not cfg.is_moe and cfg == acfg
    meta = checkpoint.load_metadata(str(tmp_path / "dense" / "model"))
    assert meta["phase"] == "dense" and meta["dense_expert"] == "humor" and meta["task"] == "flexmix_mini.humor"
    assert meta["anchor_fingerprint"] == expert.fingerprint(acfg, aparams)
    a, d = _leaves(anchor), _leaves(str(tmp_path / "dense" / "model"))
    assert sorted(a) == sorted(d) and all(not np.array_equal(a[k], d[k]) for k in a if not k.endswith("norm"))
