"""FLOP counts of compiled programs through loops, and of each phase's real training step.

TPU behaviour is tested on real TPU HLO (tests/data/tpu_hlo, made by its make_fixtures.py with libtpu):
the TPU program carries no ``known_trip_count``, writes batched matmuls as convolutions over dilated
dimensions and runs Pallas kernels as ``tpu_custom_call``.
"""

import gzip
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from flexmoe_jax import checkpoint, expert, flops, hlo_parse, model, optim, train, trainer
from flexmoe_jax.config import ModelConfig, tiny

F32 = jnp.float32
DENSE = ModelConfig(vocab_size=512, d_model=64, n_layers=4, n_heads=4, mlp_hidden=96, max_seq_len=128)
B, S = 4, 32


def _compile(f, *shapes):
    return jax.jit(f).lower(*(jax.ShapeDtypeStruct(s, d) for s, d in shapes)).compile()


def _forward_matmuls(c: ModelConfig, b: int, s: int) -> int:
    """The model's forward matmuls, by hand: projections, attention scores and values, FFN, head."""
    t, d, hd = b * s, c.d_model, c.head_size
    attn = 2 * t * d * (2 * c.n_heads + 2 * c.kv_heads) * hd + 4 * b * s * s * c.n_heads * hd
    ffn = 6 * t * d * c.mlp_hidden * (c.top_k if c.is_moe else 1) + (2 * t * d * c.num_experts if c.is_moe else 0)
    return c.n_layers * (attn + ffn) + 2 * t * d * c.vocab_size


def test_scan_body_counts_trip_count_times():
    def f(x, ws):
        return jax.lax.scan(lambda c, w: (c @ w, None), x, ws)[0]

    compiled = _compile(f, ((128, 256), F32), ((4, 256, 256), F32))
    assert flops.compiled_flops(compiled) == flops.Flops(4 * 2 * 128 * 256 * 256)  # 67,108,864
    assert compiled.cost_analysis()["flops"] < 0.3 * 67_108_864  # what XLA's own analysis reports


def test_loop_free_program_agrees_with_xla_cost_analysis():
    def mlp(x, w1, w2):
        return jnp.tanh(x @ w1) @ w2

    compiled = _compile(mlp, ((128, 256), F32), ((256, 512), F32), ((512, 64), F32))
    ours, xla = flops.compiled_flops(compiled).flops, compiled.cost_analysis()["flops"]
    assert ours == 2 * 128 * 256 * 512 + 2 * 128 * 512 * 64
    assert ours <= xla <= 1.02 * ours  # XLA adds the elementwise ops (tanh)


@pytest.mark.parametrize("config", [DENSE, DENSE.replace(num_experts=2, top_k=2)], ids=["dense", "moe_2of2"])
def test_multi_layer_forward_matches_a_count_by_hand(config):
    params = jax.eval_shape(lambda: model.init(config, 0))
    tokens = jax.ShapeDtypeStruct((B, S), jnp.int32)
    compiled = jax.jit(lambda p, t: model.apply(config, p, t)[0]).lower(params, tokens).compile()
    counted, expected = flops.compiled_flops(compiled), _forward_matmuls(config, B, S)
    assert counted.dynamic_loops == 0
    # MoE: the gate-weighted sum of the experts' outputs is one more (tiny) matmul per layer.
    assert counted.flops == pytest.approx(expected, rel=0 if not config.is_moe else 1e-3)
    assert compiled.cost_analysis()["flops"] < 0.5 * expected  # one layer of four, without the loop fix


@pytest.mark.parametrize("config", [DENSE, DENSE.replace(num_experts=6, top_k=2), DENSE.replace(num_experts=6, top_k=3)],
                         ids=["dense", "moe_2of6", "moe_3of6"])
def test_forward_flops_per_token_count_top_k_experts_by_hand(config):
    """A top-k MoE's forward is counted dropless: each token through exactly k experts (the router's
    columns of the skipped experts are subtracted with them: within 0.5% of the count by hand)."""
    got, hand = flops.forward_flops_per_token(config, S), _forward_matmuls(config, 1, S) / S
    assert got == (hand if not config.is_moe else pytest.approx(hand, rel=5e-3))
    if config.is_moe:  # two more experts per token: two more FFNs (6 x d x hidden x layers each)
        more = flops.forward_flops_per_token(config.replace(top_k=config.top_k + 2), S) - got
        assert more == pytest.approx(2 * 6 * config.d_model * config.mlp_hidden * config.n_layers, rel=1e-2)


def test_inference_cost_active_params_and_the_paper_ratio():
    from flexmoe_jax.demo import inference_cost as ic

    moe = DENSE.replace(num_experts=6, top_k=2, expert_names=("public", "a", "b", "c", "d", "e"))
    ffn = 3 * DENSE.d_model * DENSE.mlp_hidden * DENSE.n_layers
    assert ic.active_params(DENSE) == DENSE.num_params()
    router = DENSE.n_layers * DENSE.d_model * 2  # top-k's router rows in the count
    assert ic.active_params(moe) == DENSE.num_params() + ffn + router
    # k whose active params are nearest 1.4 x two dense models: shared + k FFNs ~ 2.8 dense
    want = min(range(1, 7), key=lambda k: abs(ic.active_params(moe.replace(top_k=k)) / (2 * DENSE.num_params()) - 1.4))
    assert ic.paper_top_k(moe, DENSE) == want
    assert 1.0 < ic.active_params(moe.replace(top_k=want)) / (2 * DENSE.num_params()) < 1.8


def test_data_dependent_loops_are_a_lower_bound():
    def f(x, w, n):
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

    counted = flops.compiled_flops(_compile(f, ((64, 64), F32), ((64, 64), F32), ((), jnp.int32)))
    assert counted == flops.Flops(0.0, dynamic_flops=2 * 64 ** 3, dynamic_loops=1)
    # The CPU block-sparse MoE dispatch runs its experts in data-dependent loops: those matmuls are
    # not in the certain count (attention, router and head are), and with dense dispatch they are.
    blocks, dense = tiny(n_layers=4, moe_impl="blocks"), tiny(n_layers=4, moe_impl="dense")
    tokens = jax.ShapeDtypeStruct((B, S), jnp.int32)
    count = {c.moe_impl: flops.compiled_flops(jax.jit(lambda p, t, c=c: model.apply(c, p, t)[0]).lower(
        jax.eval_shape(lambda c=c: model.init(c, 0)), tokens).compile()) for c in (blocks, dense)}
    experts = blocks.n_layers * 6 * B * S * blocks.d_model * blocks.mlp_hidden * blocks.top_k
    assert count["blocks"].dynamic_loops > 0 and count["dense"].dynamic_loops == 0
    assert count["blocks"].flops < _forward_matmuls(blocks, B, S) - 0.9 * experts
    assert count["dense"].flops > _forward_matmuls(dense, B, S)  # dense runs every expert on every token


def _grad_flops(cfg, params, spec, concat_slots):
    trainable, frozen = jax.eval_shape(lambda: optim.split(params, spec))
    batch = jax.eval_shape(train.lm_batch, jax.ShapeDtypeStruct((B, S + 1), jnp.int32))

    def loss(t, frozen, batch):
        return train.loss_and_metrics(cfg, optim.combine(t, frozen, concat_slots), batch, train.LossConfig())[0]

    return flops.compiled_flops(jax.jit(jax.grad(loss)).lower(trainable, frozen, batch).compile()).flops


@pytest.mark.slow  # over ~3 s on 2 cores
def test_expert_step_skips_the_frozen_weight_gradients():
    ecfg, params = expert.upcycle(DENSE, jax.device_get(model.init(DENSE, 0)), "math")
    assert ecfg == flops.expert_config(DENSE, "math")
    t, d, h, L, v = B * S, DENSE.d_model, DENSE.mlp_hidden, DENSE.n_layers, DENSE.vocab_size
    slot_dw = L * 3 * 2 * t * d * h  # gate, up and down weight gradients of one expert slot, every layer
    cut = _grad_flops(ecfg, params, expert.TRAINABLE, concat_slots=False)
    joined = _grad_flops(ecfg, params, expert.TRAINABLE, concat_slots=True)
    assert joined - cut == slot_dw

    steps = {p: flops.train_step_flops(ecfg, p, B, S) for p in ("pretrain", "expert")}  # pretrain: full FT
    full, exp = steps["pretrain"], steps["expert"]
    assert exp == flops.train_step_flops(DENSE, "expert", B, S)  # a dense config is upcycled first
    # Full fine-tuning also forms the weight gradients of every frozen matrix: the public slot, the
    # attention projections and the output head. (The router's gradient is formed for both rows.)
    frozen_dw = slot_dw + L * 2 * t * d * 4 * d + 2 * t * d * v
    assert full["compiled"] - exp["compiled"] == frozen_dw
    assert exp["estimate_6n"] == full["estimate_6n"]
    assert exp["compiled"] < 0.8 * exp["estimate_6n"]
    assert full["compiled"] == pytest.approx(full["estimate_6n"], rel=0.02)  # 6N is right for full training
    assert flops.train_step_flops(ecfg, "router_tune", B, S)["compiled"] < exp["compiled"]


@pytest.mark.slow  # over ~3 s on 2 cores
def test_step_count_is_per_step_on_any_mesh_and_accumulation():
    one = flops.train_step_flops(DENSE, "pretrain", 8, S)
    assert one["devices"] == 1 and one["dynamic_loops"] == 0
    data8 = flops.train_step_flops(DENSE, "pretrain", 8, S, mesh=(-1, 1, 1, 1))
    assert data8["devices"] == 8 and data8["compiled"] == one["compiled"]
    assert flops.train_step_flops(DENSE, "pretrain", 8, S, grad_accum=2)["compiled"] == one["compiled"]
    with pytest.raises(ValueError, match="phase"):
        flops.train_step_flops(DENSE, "finetune", 8, S)
    with pytest.raises(ValueError, match="dense"):
        flops.train_step_flops(DENSE, "router_tune", 8, S)


HLO = """HloModule m

%branch_a (p: f32[8,16]) -> f32[8,4] {
  %p = f32[8,16]{1,0} parameter(0)
  %w = f32[16,4]{1,0} constant({...})
  ROOT %d = f32[8,4]{1,0} dot(%p, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%branch_b (q: f32[8,16]) -> f32[8,4] {
  %q = f32[8,16]{1,0} parameter(0)
  ROOT %s = f32[8,4]{1,0} slice(%q), slice={[0:8], [0:4]}
}

ENTRY %main (x: f32[8,16], y: f32[16,32], i: s32[]) -> f32[8,32] {
  %x = f32[8,16]{1,0} parameter(0)
  %y = f32[16,32]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %g = (f32[8,32]{1,0}, s8[1024]{0}) custom-call(f32[8,16]{1,0} %x, f32[16,32]{1,0} %y), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %c = f32[8,4]{1,0} conditional(%i, %x, %x), branch_computations={%branch_a, %branch_b}
  ROOT %r = f32[8,32]{1,0} get-tuple-element(%g), index=0
}
"""


def test_library_gemms_and_conditionals_in_hlo_text():
    assert flops.hlo_flops(HLO) == flops.Flops(2 * 8 * 16 * 32, dynamic_flops=2 * 8 * 16 * 4, dynamic_loops=1)
    with pytest.raises(ValueError, match="ENTRY"):
        flops.hlo_flops("not hlo")


def test_trainer_logs_and_records_the_compiled_count(small_data_dir, tmp_path):
    """MFU uses the FLOPs of the step the trainer compiled, which train_step_flops reproduces."""
    cfg = DENSE.replace(n_layers=2, max_seq_len=64)
    rc = trainer.RunConfig(data_dir=small_data_dir, steps=2, batch_size=8, seq_len=64, log_every=1,
                           checkpoint_every=2)
    result = trainer.run(tmp_path, cfg, rc, optim.OptimConfig(warmup_steps=1), progress=False)
    meta = checkpoint.load_metadata(result["model"])
    expected = flops.train_step_flops(cfg, "pretrain", 8, 64, mesh=rc.mesh)
    assert meta["flops_per_step_compiled"] == expected["compiled"] == result["metrics"]["flops_per_step"]
    assert meta["flops_per_step_6n"] == expected["estimate_6n"] and meta["flops_dynamic_loops"] == 0
    m = result["metrics"]
    assert m["mfu"] / m["mfu_6n"] == pytest.approx(expected["compiled"] / expected["estimate_6n"])


@pytest.mark.slow
def test_routed_step_counts_top_k_experts_per_token():
    """A top-2-of-4 MoE step costs what a 2-of-2 one does, whatever the dispatch (the router is charged
    top_k columns: two fewer here, 0.2% of the step)."""
    four = DENSE.replace(num_experts=4, top_k=2, moe_impl="blocks")
    two = DENSE.replace(num_experts=2, top_k=2, moe_impl="dense")
    routed, both = flops.routed_step_flops(four, "pretrain", B, S), flops.train_step_flops(two, "pretrain", B, S)
    assert routed["compiled"] == both["compiled"]
    blocks = flops.train_step_flops(four, "pretrain", B, S)  # the CPU dispatch's expert loops: uncountable
    assert blocks["dynamic_loops"] > 0 and blocks["compiled"] < 0.8 * routed["compiled"]
    assert routed["dynamic_loops"] == 0 and routed["estimate_6n"] == pytest.approx(both["estimate_6n"], rel=1e-3)
    assert routed["per_expert"] > 0 and "minus the 2 experts" in routed["method"]
    every = flops.routed_step_flops(two, "pretrain", B, S)  # every expert active: counted directly
    assert every["compiled"] == both["compiled"] and every["method"] == "compiled step"
    tuned = flops.routed_step_flops(four, "router_tune", B, S)
    assert tuned["compiled"] < routed["compiled"]


TPU_HLO = Path(__file__).parent / "data" / "tpu_hlo"
MM = 2 * 128 * 256 * 256  # one [128, 256] x [256, 256] matmul


def _tpu(name: str) -> str:
    data = (TPU_HLO / name).read_bytes()
    return (gzip.decompress(data) if name.endswith(".gz") else data).decode()


def test_tpu_loops_count_the_trips_their_counters_show():
    scan, fori = _tpu("scan_grad.hlo"), _tpu("fori_3_10.hlo")
    for text in (scan, fori):
        assert " while(" in text and "known_trip_count" not in text
    assert flops.hlo_flops(scan) == flops.Flops(4 * 3 * MM)  # 4 steps: forward, then both gradients
    assert flops.hlo_flops(fori) == flops.Flops(7 * MM)  # fori_loop(3, 10): XLA counts 0..7


def test_tpu_loop_of_data_dependent_length_is_unknown():
    counted = flops.hlo_flops(_tpu("while_dynamic.hlo"))
    assert counted == flops.Flops(0.0, dynamic_flops=MM, dynamic_loops=1) and not counted.exact
    assert counted.describe().startswith("unknown (at least 0.000e+00; 1 loops")
    assert flops.Flops(3e9).describe() == "3.000e+09"


def test_tpu_grouped_and_batched_convolutions_count_real_taps():
    text = _tpu("grouped_conv_grad.hlo")  # a 4-group convolution and its two gradients
    assert "lhs_dilate" in text and "group_count" not in text  # TPU writes the groups as a dilated dimension
    # Each: 8 rows x 512 output channels x 64 inputs per group x (64 positions x 3 taps - 2 in the padding).
    assert flops.hlo_flops(text) == flops.Flops(3 * 2 * 8 * 512 * 64 * (64 * 3 - 2))
    # ragged_dot: forward and input gradient are XLA's TPU kernels (their cost estimate: the routed work);
    # the weight gradient is a batched matmul over all 4 groups' rows, each masked to its group.
    ragged = flops.hlo_flops(_tpu("ragged_dot_grad.hlo"))
    assert ragged == flops.Flops(2 * (2 * 512 * 256 * 512) + 4 * 2 * 512 * 256 * 512)


def test_pallas_kernels_count_their_cost_estimate_or_are_unknown():
    both = flops.hlo_flops(_tpu("pallas_cost.hlo"))  # the same matmul kernel with and without an estimate
    assert both == flops.Flops(2 * 256 ** 3, unknown_kernels=1) and not both.exact
    assert "1 kernels without a cost estimate" in both.describe()
    # megablox: the gmm kernel's estimate; its group-metadata kernels read and write only ints.
    routed = 2 * 512 * 256 * 512  # 512 rows through 4 experts' [256, 512] weights, each row through one
    gmm = flops.hlo_flops(_tpu("megablox_gmm.hlo.gz"))
    assert gmm == flops.Flops(routed) and gmm.exact
    # Its gradient: gmm forward, gmm for the input gradient, tgmm for the weights' (routed rows only).
    assert flops.hlo_flops(_tpu("megablox_gmm_grad.hlo.gz")) == flops.Flops(3 * routed)


def test_tpu_moe_step_matches_a_count_by_hand():
    """The gradient of a tiny MoE (GQA, ragged top-2 of 4, full remat) compiled for a TPU core."""
    c = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=256,
                    num_experts=4, top_k=2, max_seq_len=128, dtype="bfloat16", remat="full", moe_impl="ragged")
    b, s = 4, 64
    t, d = b * s, c.d_model
    head = 2 * t * d * c.vocab_size
    layers = _forward_matmuls(c, b, s) - head
    # Backward: twice the forward; full remat recomputes each layer's forward once more. The TPU's
    # ragged_dot weight gradient runs every expert over all routed rows: E instead of 1 expert per row.
    expert_dw = c.n_layers * 6 * t * c.top_k * d * c.mlp_hidden
    expected = 4 * layers + 3 * head + (c.num_experts - 1) * expert_dw
    counted = flops.hlo_flops(_tpu("moe_ragged_grad.hlo.gz"))
    assert counted.exact and counted.flops == pytest.approx(expected, rel=1e-3)


def _without_trip_counts(text: str) -> str:
    return re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)


def test_counter_trip_counts_agree_with_the_ones_xla_proves():
    """On CPU, where XLA writes known_trip_count, the counter analysis (TPU's only source) finds the same."""
    scan = _compile(lambda x, ws: jax.lax.scan(lambda c, w: (c @ w, None), x, ws)[0],
                    ((128, 256), F32), ((4, 256, 256), F32)).as_text()
    params, tokens = jax.eval_shape(lambda: model.init(DENSE, 0)), jax.ShapeDtypeStruct((B, S), jnp.int32)
    forward = jax.jit(lambda p, t: model.apply(DENSE, p, t)[0]).lower(params, tokens).compile().as_text()
    for text in (scan, forward):
        stripped = _without_trip_counts(text)
        assert "known_trip_count" in text and "known_trip_count" not in stripped
        assert flops.hlo_flops(stripped) == flops.hlo_flops(text) and flops.hlo_flops(text).exact


@pytest.mark.parametrize("groups", [{"feature_group_count": 4}, {"batch_group_count": 4}], ids=["feature", "batch"])
def test_grouped_convolutions_agree_with_xla(groups):
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (2,), [(1, 2)], rhs_dilation=(2,), dimension_numbers=("NWC", "WIO", "NWC"),
                                            **groups)

    kernel_in = 64 // groups.get("feature_group_count", 1)
    lowered = jax.jit(conv).lower(jax.ShapeDtypeStruct((8, 33, 64), F32), jax.ShapeDtypeStruct((3, kernel_in, 128), F32))
    unoptimized, compiled = lowered.as_text(dialect="hlo"), lowered.compile()
    assert "_group_count=4" in unoptimized
    # 16 outputs x 3 taps, 2 of them in the padding; each output channel sees 16 of the 64 input channels
    # (feature groups), or each of the 2 output rows sees one group of the 8 input rows (batch groups).
    expected = 2 * 8 * 128 * 16 * (16 * 3 - 2)
    assert flops.hlo_flops(unoptimized) == flops.compiled_flops(compiled) == flops.Flops(expected)
    assert compiled.cost_analysis()["flops"] == expected


COUNTDOWN = """HloModule countdown

%cond (s: (s32[], s32[], f32[8,8])) -> pred[] {
  %s = (s32[], s32[], f32[8,8]) parameter(0)
  %zero = s32[] constant(0)
  %i = s32[] get-tuple-element(%s), index=0
  ROOT %more = pred[] compare(%zero, %i), direction=LT
}

%body (b: (s32[], s32[], f32[8,8])) -> (s32[], s32[], f32[8,8]) {
  %b = (s32[], s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%b), index=0
  %step = s32[] get-tuple-element(%b), index=1
  %next = s32[] subtract(%i, %step)
  %x = f32[8,8] get-tuple-element(%b), index=2
  %y = f32[8,8] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], s32[], f32[8,8]) tuple(%next, %step, %y)
}

ENTRY %main (x: f32[8,8], n: s32[]) -> f32[8,8] {
  %x = f32[8,8] parameter(0)
  %n = s32[] parameter(1)
  %ten = s32[] constant(10)
  %three = s32[] constant(3)
  %s0 = (s32[], s32[], f32[8,8]) tuple(%ten, %three, %x)
  %w = (s32[], s32[], f32[8,8]) while(%s0), condition=%cond, body=%body
  %s1 = (s32[], s32[], f32[8,8]) tuple(%ten, %n, %x)
  %v = (s32[], s32[], f32[8,8]) while(%s1), condition=%cond, body=%body
  ROOT %r = f32[8,8] get-tuple-element(%w), index=2
}
"""


def test_counter_found_whatever_its_direction_and_step():
    # 10, 7, 4, 1: four trips of a counter stepped down by a loop-invariant 3 while 0 < i. The second loop
    # steps by a parameter: its trip count is unknown.
    assert flops.hlo_flops(COUNTDOWN) == flops.Flops(4 * 2 * 8 ** 3, dynamic_flops=2 * 8 ** 3, dynamic_loops=1)


@pytest.mark.parametrize("start,step,bound,direction,trips", [
    (0, 1, 8, "LT", 8), (3, 2, 10, "LT", 4), (0, 1, 8, "LE", 9), (10, -3, 0, "GT", 4), (10, -3, 1, "GE", 4),
    (0, 2, 8, "NE", 4), (5, 1, 3, "LT", 0), (0, 3, 8, "NE", None), (0, -1, 8, "LT", None)])
def test_trip_count_of_a_counted_loop(start, step, bound, direction, trips):
    assert hlo_parse._iterations(start, step, bound, direction) == trips
