"""HF transformers import/export: logits equal to FlexOlmoForCausalLM / Olmo2ForCausalLM.

transformers is the numerical oracle. Weights are re-drawn with a large std (and
norm scales away from 1) so routing is far from uniform and a swapped or
mis-transposed tensor, a wrong expert order or a wrong top-k would show up.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flexmoe_jax import checkpoint, hf, model
from flexmoe_jax.config import ModelConfig

TOL = 1e-4
TOKENS = np.random.RandomState(0).randint(0, 128, size=(2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    torch.set_num_threads(2)
    return torch


def _hf_model(torch, kind, *, kv=4, experts=4, top_k=2, head_dim=None, rope_theta=None, seed=0):
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64,
              pad_token_id=1, eos_token_id=2)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if rope_theta is not None:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    if kind == "flex_olmo":
        m = transformers.FlexOlmoForCausalLM(transformers.FlexOlmoConfig(
            num_experts=experts, num_experts_per_tok=top_k, **kw))
    else:
        m = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**kw))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                torch.nn.init.normal_(p, std=0.15)
    return m.eval()


def _hf_logits(torch, m, tokens=TOKENS):
    with torch.no_grad():
        return m(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _random_params(config, seed=0):
    """Our own random params with large weights and non-unit norms (so norms cannot be swapped)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return (1.0 + 0.3 * rng.standard_normal(s.shape)).astype(np.float32)
        return (0.15 * rng.standard_normal(s.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, model.param_shapes(config))


def _tiny(**kw):
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, mlp_hidden=96, num_experts=3,
                top_k=2, max_seq_len=64, pad_token_id=1, eos_token_id=2,
                expert_names=("public", "math", "code"))
    base.update(kw)
    return ModelConfig(**base)


def _assert_same_tree(a, b):
    ka, kb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    assert ka == kb
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))  # bit-identical


# ----------------------------------------------------------------------------
# Import: transformers-saved checkpoints give transformers' logits
# ----------------------------------------------------------------------------

IMPORT_CASES = {
    "flex_mha_top2of4_single": dict(kind="flex_olmo", kv=4, experts=4, top_k=2),
    "flex_gqa_top4of4_sharded": dict(kind="flex_olmo", kv=2, experts=4, top_k=4, shard="60KB"),
    "flex_gqa_headdim32_top2of3": dict(kind="flex_olmo", kv=2, experts=3, top_k=2, head_dim=32, shard="40KB"),
    "olmo2_mha_single": dict(kind="olmo2", kv=4),
    "olmo2_gqa_theta_sharded": dict(kind="olmo2", kv=1, rope_theta=1234.0, shard="30KB"),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
@pytest.mark.slow  # over ~3 s on 2 cores
def test_import_matches_transformers(torch, tmp_path, case):
    spec = dict(IMPORT_CASES[case])
    shard = spec.pop("shard", None)
    m = _hf_model(torch, **spec)
    kwargs = {"max_shard_size": shard} if shard else {}
    m.save_pretrained(tmp_path / "hf", **kwargs)
    assert (tmp_path / "hf" / hf.INDEX_NAME).exists() == bool(shard)

    config, params = hf.from_hf(tmp_path / "hf")
    assert config.is_moe == (spec["kind"] == "flex_olmo")
    assert config.kv_heads == spec["kv"] and config.param_dtype == "float32"
    if spec.get("head_dim"):
        assert config.head_size == spec["head_dim"] != config.d_model // config.n_heads
    if spec.get("rope_theta"):
        assert config.rope_theta == spec["rope_theta"]
    if spec["kind"] == "olmo2":
        assert config.rms_eps == 1e-5 and config.rope_theta == (spec.get("rope_theta") or 10000.0)

    ref = _hf_logits(torch, m)
    ours = np.asarray(model.forward(config, params, TOKENS))
    diff = float(np.max(np.abs(ours - ref)))
    print(f"{case}: max |ours - transformers| = {diff:.3g} (logits up to {np.max(np.abs(ref)):.3g})")
    assert diff <= TOL

    if config.is_moe:
        # The live torch state_dict holds the experts fused; the in-memory mapping reads that too.
        state = {k: v.numpy() for k, v in m.state_dict().items()}
        assert "model.layers.0.mlp.experts.gate_up_proj" in state
        _assert_same_tree(hf.hf_state_to_params(config, state), params)
        if config.top_k < config.num_experts:
            # Routing is non-trivial: in transformers itself, using every expert instead of the
            # top-k changes the logits by far more than the tolerance.
            for layer in m.model.layers:
                layer.mlp.gate.top_k = config.num_experts
            assert np.max(np.abs(_hf_logits(torch, m) - ref)) > 1e-2


# ----------------------------------------------------------------------------
# Export: our checkpoints load in transformers with the same logits
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_export_loads_in_transformers(torch, tmp_path, kind):
    import transformers

    if kind == "moe":
        config, shard = _tiny(n_kv_heads=2), "50KB"
        cls = transformers.FlexOlmoForCausalLM
    else:
        config, shard = _tiny(num_experts=0, top_k=1, expert_names=(), head_dim=32, rope_theta=10000.0), None
        cls = transformers.Olmo2ForCausalLM
    params = _random_params(config)
    out = hf.to_hf(config, params, tmp_path / "export", max_shard_size=shard)
    assert (out / hf.INDEX_NAME).exists() == bool(shard)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"

    m = cls.from_pretrained(out).eval()
    ref = _hf_logits(torch, m)
    ours = np.asarray(model.forward(config, params, TOKENS))
    diff = float(np.max(np.abs(ours - ref)))
    print(f"export {kind}: max |ours - transformers| = {diff:.3g}")
    assert diff <= TOL

    config2, params2 = hf.from_hf(out)
    assert config2 == config
    _assert_same_tree(params2, params)


def test_export_writes_a_tokenizer_transformers_loads_and_normal_modes(tmp_path):
    """export-hf with the anchor's SentencePiece model: AutoTokenizer.from_pretrained loads it and encodes
    exactly as SentencePiece does (byte fallback and leading spaces included); generation_config.json
    loads; files and directories get the usual modes, not mkdtemp's private ones."""
    import os
    import stat

    import sentencepiece
    import transformers

    from flexmoe_jax import cli
    from flexmoe_jax.data import tokenizer

    src = Path(__file__).resolve().parent.parent / "flexmoe_jax"
    spm_path = tokenizer.train([f.read_text() for f in sorted(src.rglob("*.py"))], tmp_path / "tok" / "spm.model",
                               vocab_size=512)
    config = _tiny(vocab_size=512, pad_token_id=0, eos_token_id=1)
    old = os.umask(0o022)
    try:
        out = hf.to_hf(config, _random_params(config), tmp_path / "export", tokenizer=spm_path)
    finally:
        os.umask(old)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    for text in ["def forward(config, params):", "  two  spaces\nand a line", "caf\u00e9 \U0001F600 \t tab", "x"]:
        assert tok(text)["input_ids"] == sp.encode(text), text
    assert tok.decode(sp.encode("return out  # done")) == "return out  # done"
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.eos_token_id, gen.pad_token_id, gen.do_sample) == (1, 0, False)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert {stat.S_IMODE(os.stat(f).st_mode) for f in out.iterdir()} == {0o644}
    # The command line: --data_dir's tokenizer, and a bias the export cannot carry names the fix.
    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, config, _random_params(config))
    (tmp_path / "data" / "tokenizer").mkdir(parents=True)
    (tmp_path / "data" / "tokenizer" / "spm.model").write_bytes(spm_path.read_bytes())
    assert cli.main(["export-hf", str(ckpt), str(tmp_path / "cli_out"), "--data_dir", str(tmp_path / "data")]) == 0
    assert (tmp_path / "cli_out" / "tokenizer.model").read_bytes() == spm_path.read_bytes()


# ----------------------------------------------------------------------------
# Round trips without torch
# ----------------------------------------------------------------------------

def test_roundtrip_bf16_is_bit_identical(tmp_path):
    config = _tiny(param_dtype="bfloat16")
    params = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), _random_params(config, seed=1))
    hf.to_hf(config, params, tmp_path / "bf16", max_shard_size=20_000)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    config2, params2 = hf.from_hf(tmp_path / "bf16")
    assert config2 == config
    _assert_same_tree(params2, params)
    # An explicit dtype casts (and says so in the config).
    config3, params3 = hf.from_hf(tmp_path / "bf16", dtype="float32")
    assert config3.param_dtype == "float32" and params3["embed"].dtype == np.float32
    np.testing.assert_array_equal(params3["embed"], np.asarray(params["embed"], np.float32))


def test_state_mapping_roundtrip_and_names():
    config = _tiny()
    params = _random_params(config, seed=2)
    state = hf.params_to_hf_state(config, params)
    assert state["model.layers.1.mlp.experts.2.gate_proj.weight"].shape == (96, 64)
    np.testing.assert_array_equal(state["model.layers.1.mlp.experts.2.down_proj.weight"],
                                  params["layers"]["moe"]["down"][1, 2].T)
    np.testing.assert_array_equal(state["model.layers.0.mlp.gate.weight"], params["layers"]["moe"]["router"][0])
    np.testing.assert_array_equal(state["lm_head.weight"], params["lm_head"].T)
    _assert_same_tree(hf.hf_state_to_params(config, state), params)


def test_legacy_top_level_rope_theta():
    cfg = {"model_type": "olmo2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 5000.0, "rope_scaling": None}
    assert hf.config_from_hf(cfg).rope_theta == 5000.0


def test_expert_bias_zero_dropped_nonzero_refused(tmp_path):
    config = _tiny(expert_bias=True)
    params = _random_params(config, seed=3)
    params["layers"]["moe"]["bias"] = np.zeros_like(params["layers"]["moe"]["bias"])
    # A positive bias is clamped to 0 in the forward pass, so it changes nothing: also exportable.
    params["layers"]["moe"]["bias"][0, 0] = 0.5
    hf.to_hf(config, params, tmp_path / "ok")
    config2, params2 = hf.from_hf(tmp_path / "ok")
    assert config2 == config.replace(expert_bias=False)
    moe = dict(params["layers"]["moe"])
    del moe["bias"]
    _assert_same_tree(params2, {**params, "layers": {**params["layers"], "moe": moe}})

    params["layers"]["moe"]["bias"][1, 2] = -0.25
    with pytest.raises(hf.HFFormatError, match="routing='public_plus'.*transformers"):
        hf.to_hf(config.replace(routing="public_plus"), params, tmp_path / "modes")
    assert not (tmp_path / "modes").exists()
    with pytest.raises(hf.HFFormatError, match="nonzero learned expert bias.*--drop_bias"):
        hf.to_hf(config, params, tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # nothing half-written


# ----------------------------------------------------------------------------
# Bad inputs: clear errors, nothing half-written
# ----------------------------------------------------------------------------

@pytest.fixture
def exported(tmp_path):
    config = _tiny()
    return hf.to_hf(config, _random_params(config, seed=4), tmp_path / "model")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_other_model_type_is_refused(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128}))
    with pytest.raises(hf.HFFormatError, match=r"model_type 'llama'.*flex_olmo.*olmo2"):
        hf.from_hf(tmp_path / "llama")


@pytest.mark.parametrize("changes, match", [
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type='linear'"),
    ({"flexmoe_expert_names": ["a", "b"]}, "2 flexmoe_expert_names for 3 experts"),
    ({"num_experts_per_tok": 9}, "top_k=9"),
])
def test_unsupported_config_is_refused(exported, changes, match):
    _edit_config(exported, **changes)
    with pytest.raises(hf.HFFormatError, match=match):
        hf.from_hf(exported)


def test_missing_files(tmp_path, exported):
    with pytest.raises(hf.HFFormatError, match="no config.json"):
        hf.from_hf(tmp_path)
    with pytest.raises(hf.HFFormatError, match="not a directory"):
        hf.from_hf(tmp_path / "nope")
    weights = exported / hf.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    with pytest.raises(hf.HFFormatError, match="not a readable safetensors file"):
        hf.from_hf(exported)
    weights.unlink()
    with pytest.raises(hf.HFFormatError, match="no weights"):
        hf.from_hf(exported)


def test_missing_shard(tmp_path):
    config = _tiny()
    out = hf.to_hf(config, _random_params(config), tmp_path / "sharded", max_shard_size="30KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(hf.HFFormatError, match=f"shard {shards[-1].name} .* is missing"):
        hf.from_hf(out)


def test_missing_tensor_is_named(exported):
    state = load_file(exported / hf.WEIGHTS_NAME)
    del state["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(state, exported / hf.WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(hf.HFFormatError, match=r"missing 1 tensor.*layers\.1\.mlp\.experts\.2\.up_proj"):
        hf.from_hf(exported)


def test_wrong_shape_is_named(exported):
    state = load_file(exported / hf.WEIGHTS_NAME)
    state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
    save_file(state, exported / hf.WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(hf.HFFormatError, match=r"k_proj\.weight.*shape \(32, 64\).*\(64, 64\)"):
        hf.from_hf(exported)


def test_config_weight_layer_mismatch(exported):
    """A config.json that disagrees with the weights is caught before anything is read."""
    _edit_config(exported, num_hidden_layers=3)
    with pytest.raises(hf.HFFormatError, match=r"missing .*model\.layers\.2\."):
        hf.from_hf(exported)
    _edit_config(exported, num_hidden_layers=1)
    with pytest.raises(hf.HFFormatError, match=r"no place for: model\.layers\.1\."):
        hf.from_hf(exported)


def test_export_refuses_to_clobber(exported):
    config = _tiny()
    params = _random_params(config, seed=5)
    with pytest.raises(hf.HFFormatError, match="already exists"):
        hf.to_hf(config, params, exported)
    with pytest.raises(hf.HFFormatError, match="max_shard_size"):
        hf.to_hf(config, params, exported.parent / "other", max_shard_size="lots")
    hf.to_hf(config, params, exported, overwrite=True)
    _assert_same_tree(hf.from_hf(exported)[1], params)
    assert sorted(p.name for p in exported.parent.iterdir()) == ["model"]


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.numpy

    config = _tiny()
    params = _random_params(config)
    real_save, calls = safetensors.numpy.save_file, []

    def flaky_save(*args, **kwargs):  # the disk fills up after the first shard
        calls.append(1)
        if len(calls) > 1:
            raise OSError("No space left on device")
        return real_save(*args, **kwargs)
    monkeypatch.setattr(safetensors.numpy, "save_file", flaky_save)
    with pytest.raises(OSError, match="No space"):
        hf.to_hf(config, params, tmp_path / "out", max_shard_size="30KB")
    assert list(tmp_path.iterdir()) == []
