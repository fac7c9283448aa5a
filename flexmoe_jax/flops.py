"""FLOPs of compiled XLA programs counted through loops, the training step's FLOPs per phase, and peak FLOP/s.

:func:`compiled_flops` reads the optimized HLO and multiplies each loop body by
the trip count XLA proved (``cost_analysis`` counts a ``while`` body once).
:func:`train_step_flops` compiles a phase's real training step on abstract inputs
and counts it beside the 6N estimate. Method and caveats: docs/training.md (FLOPs and MFU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from flexmoe_jax.config import ModelConfig
from flexmoe_jax.errors import UserError

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"^[a-z][a-z0-9]*\[([^\]]*)\](?:\{[^}]*\})?")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation|"
                     r"branch_computations|called_computations|select|scatter)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
# Library matmuls (cuBLAS gemm, oneDNN matmul) by custom-call target, and the dot dimension
# numbers in their backend_config (unverified here: no GPU build was available to test them).
_MATMUL_CALL = re.compile(r'custom_call_target="[^"]*(gemm|matmul|Matmul)[^"]*"')
_CALL_CONTRACT = re.compile(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]')
_METADATA = re.compile(r"metadata=\{[^}]*\}")
_BRANCHES = ("true_computation", "false_computation", "branch_computations")


@dataclasses.dataclass(frozen=True)
class Flops:
    """Matmul FLOPs of one execution of a compiled program.

    Counted: 2 x multiply-adds of every ``dot``, ``convolution``, ``ragged-dot`` and library gemm
    custom-call (cuBLAS, oneDNN); not counted: elementwise ops, reductions, transcendentals.
    ``flops`` is certain work, a lower bound: a ``while`` body counts times the trip count XLA
    proved for it, a data-dependent loop counts zero iterations and a ``conditional`` its cheapest
    branch. ``dynamic_loops`` counts those data-dependent loops and conditionals (as written in
    the program) and ``dynamic_flops`` is what one more pass through each would add.
    """

    flops: float
    dynamic_flops: float = 0.0
    dynamic_loops: int = 0

    def __add__(self, o: "Flops") -> "Flops":
        return Flops(self.flops + o.flops, self.dynamic_flops + o.dynamic_flops, self.dynamic_loops + o.dynamic_loops)

    def times(self, n: int) -> "Flops":
        return Flops(self.flops * n, self.dynamic_flops * n, self.dynamic_loops)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters + attention (12 x layers x d_model x seq_len)."""
    c = config.replace(num_experts=config.top_k if config.is_moe else 0, expert_names=())
    active = c.num_params() - config.vocab_size * config.d_model  # the embedding lookup is not a matmul
    return 6.0 * active + 12.0 * config.n_layers * config.d_model * seq_len


def training_flops(config: ModelConfig, steps: int, batch_size: int, seq_len: int) -> float:
    """Total training FLOPs of ``steps`` steps of ``batch_size`` x ``seq_len`` tokens."""
    return flops_per_token(config, seq_len) * steps * batch_size * seq_len


def _dims(shape: str) -> list[int] | None:
    """Dimensions of an array shape string (``f32[8,<=16]{1,0}``), None for a tuple."""
    m = _ARRAY.match(shape.strip())
    if m is None:
        return None
    return [int(d.replace("<=", "")) for d in m.group(1).split(",") if d.strip()]


def _split_shape(rest: str) -> tuple[str, str]:
    """``'<shape> <opcode>(...)...'`` -> (shape, remainder); tuple shapes nest parentheses."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[:i + 1], rest[i + 1:].lstrip()
    raise UserError(f"unbalanced tuple shape in HLO: {rest[:200]}")


def _attr_dims(attrs: str, name: str) -> list[int]:
    m = re.search(rf"\b{name}=\{{([\d,\s]*)\}}", attrs)
    return [int(d) for d in m.group(1).split(",") if d.strip()] if m else []


def _first_array(shape: str) -> list[int]:
    """Dims of an array shape, or of the first array in a tuple (a gemm's result beside its workspace)."""
    return _dims(shape) or _dims(shape.lstrip("(")) or []


def _matmul_flops(op: str, shape: str, operands: list[list[int] | None], attrs: str) -> float:
    out = _first_array(shape)
    lhs = operands[0] if operands else None
    rhs = operands[1] if len(operands) > 1 else None
    if op == "dot" and lhs is not None:
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in _attr_dims(attrs, "lhs_contracting_dims"))
    if op == "ragged-dot" and lhs is not None and rhs is not None:
        # Every lhs element meets each rhs column that is not contracted, batched or a group.
        skip = set(_attr_dims(attrs, "rhs_contracting_dims") + _attr_dims(attrs, "rhs_batch_dims")
                   + _attr_dims(attrs, "rhs_group_dims"))
        return 2.0 * math.prod(lhs) * math.prod(n for i, n in enumerate(rhs) if i not in skip)
    if op == "convolution" and rhs is not None:
        labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
        o = labels.group(1).index("o") if labels else len(rhs) - 1
        return 2.0 * math.prod(out) * math.prod(n for i, n in enumerate(rhs) if i != o)
    if op == "custom-call" and lhs is not None and _MATMUL_CALL.search(attrs):
        m = _CALL_CONTRACT.search(attrs)
        contract = [int(d.strip(' "')) for d in m.group(1).split(",") if d.strip()] if m else [len(lhs) - 1]
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
    return 0.0


def _parse(hlo: str) -> tuple[dict[str, list[tuple]], str]:
    """{computation: [(opcode, shape, operand dims, attrs, called computations)]}, entry name."""
    comps: dict[str, list[tuple]] = {}
    entry, current, shapes = None, None, {}
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header and not line[0].isspace():
            current, shapes = comps.setdefault(header.group(1), []), {}
            entry = header.group(1) if line.startswith("ENTRY") else entry
            continue
        m = _INSTR.match(line) if current is not None else None
        if m is None:
            continue
        name, rest = m.groups()
        shape, tail = _split_shape(rest)
        shapes[name] = shape
        op, _, args = tail.partition("(")
        depth, end = 1, len(args)
        for i, ch in enumerate(args):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                end = i
                break
        operand_str, attrs = args[:end], _METADATA.sub("", args[end + 1:])
        operands = [_dims(shapes.get(o, "")) for o in re.findall(r"%([\w.\-]+)", operand_str)]
        called = [(kind, re.findall(r"%?([\w.\-]+)", target)) for kind, target in _CALLED.findall(attrs)]
        current.append((op.strip(), shape, operands, attrs, called))
    if entry is None:
        raise UserError("no ENTRY computation in the HLO text; pass compiled.as_text() of a compiled program")
    return comps, entry


def hlo_flops(hlo: str) -> Flops:
    """Matmul FLOPs of one execution of an HLO module's text (see :class:`Flops` for what counts)."""
    comps, entry = _parse(hlo)

    @functools.lru_cache(maxsize=None)
    def cost(name: str) -> Flops:
        total = Flops(0.0)
        for op, shape, operands, attrs, called in comps.get(name, ()):
            total += Flops(_matmul_flops(op, shape, operands, attrs))
            targets = {kind: [cost(c) for c in names] for kind, names in called}
            if op == "while":
                body, cond = targets["body"][0], targets["condition"][0]
                trip = _TRIP.search(attrs)
                if trip:
                    total += body.times(int(trip.group(1))) + cond.times(int(trip.group(1)) + 1)
                else:  # data-dependent: zero iterations are certain, each one adds body + condition
                    once = body + cond
                    total += cond + Flops(0.0, once.flops + once.dynamic_flops, once.dynamic_loops + 1)
            elif op == "conditional":
                branches = [f for k in _BRANCHES for f in targets.get(k, ())]
                low = min(branches, key=lambda f: f.flops)
                high = max(f.flops + f.dynamic_flops for f in branches)
                total += Flops(low.flops, high - low.flops, max(f.dynamic_loops for f in branches) + 1)
            else:
                for fs in targets.values():
                    for f in fs:
                        total += f
        return total

    return cost(entry)


def compiled_flops(compiled: Any) -> Flops:
    """Matmul FLOPs of one call of a compiled jax program (``jax.jit(f).lower(...).compile()``).

    For a program partitioned over several devices this is one device's share (its HLO).
    """
    return hlo_flops(compiled.as_text())


def expert_config(anchor: ModelConfig, name: str = "expert") -> ModelConfig:
    """The 2-expert model :func:`flexmoe_jax.expert.upcycle` makes of a dense anchor (shapes only)."""
    return anchor.replace(num_experts=2, top_k=2, expert_names=("public", name), expert_bias=True)


def compile_train_step(config: ModelConfig, phase: str, batch_size: int, seq_len: int, *, grad_accum: int = 1,
                       mesh: Mesh | tuple[int, ...] | None = None, ocfg: Any = None, loss_cfg: Any = None):
    """(compiled step, trained config, mesh): ``phase``'s training step as :func:`flexmoe_jax.trainer.run`
    compiles it, on abstract inputs (nothing is initialized or run) placed with the trainer's shardings.

    ``config`` is the trained model; a dense one in the ``"expert"`` phase is upcycled first. ``mesh``:
    a Mesh (of any devices, e.g. a TPU topology's), a ``RunConfig.mesh`` shape, or None for one device.
    """
    from flexmoe_jax import model, optim, train
    from flexmoe_jax.sharding import make_mesh

    if phase not in train.PHASES:
        raise UserError(f"phase must be one of {train.PHASES}, got {phase!r}")
    if phase == "expert" and not config.is_moe:
        config = expert_config(config)
    if phase == "router_tune" and not config.is_moe:
        raise UserError("router tuning needs an MoE config (num_experts > 0); this one is dense")
    if mesh is None:
        mesh = make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    elif not isinstance(mesh, Mesh):
        mesh = train.resolve_mesh(tuple(mesh))
    ocfg = ocfg or optim.OptimConfig()
    ocfg = dataclasses.replace(ocfg, total_steps=ocfg.total_steps or max(ocfg.warmup_steps, 1) + 1)

    def placed(flat):  # abstract leaves with the shardings train.place gives them
        return {k: jax.ShapeDtypeStruct(flat[k].shape, flat[k].dtype, sharding=s)
                for k, s in train.shardings(config, flat, mesh).items()}

    split = jax.eval_shape(lambda: optim.split(model.init(config, 0), train.split_for(phase)))
    trainable, frozen = map(placed, split)
    tx = optim.make_optimizer(ocfg, trainable)
    # The trainer's state: each optimizer-state leaf sharded like its parameter, the whole state donated.
    state_sh = train.state_shardings(config, tx, trainable, mesh)
    state = train.abstract_state(trainable, tx, state_sh)
    rows = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=train.batch_sharding(mesh))
             for k, v in jax.eval_shape(train.lm_batch, rows).items()}
    step = train.jit_train_step(config, tx, loss_cfg or train.LossConfig(), grad_accum, mesh, state_sh,
                                train.shardings(config, frozen, mesh))
    return step.lower(state, frozen, batch).compile(), config, mesh


def train_step_flops(config: ModelConfig, phase: str, batch_size: int, seq_len: int, **kw) -> dict:
    """FLOPs of one training step of ``phase`` (:func:`compile_train_step`, same arguments).

    Returns per step: ``compiled`` (matmul FLOPs of the compiled program, summed over the mesh's
    devices; a lower bound if ``dynamic_loops``, see :class:`Flops`), ``estimate_6n``
    (:func:`flexmoe_jax.flops_per_token` x tokens), ``dynamic_loops``, ``dynamic_flops``
    and ``devices``.
    """
    compiled, config, mesh = compile_train_step(config, phase, batch_size, seq_len, **kw)
    counted = compiled_flops(compiled)
    n = mesh.devices.size
    return {"compiled": counted.flops * n, "dynamic_loops": counted.dynamic_loops,
            "dynamic_flops": counted.dynamic_flops * n, "devices": n,
            "estimate_6n": flops_per_token(config, seq_len) * batch_size * seq_len}


def routed_step_flops(config: ModelConfig, phase: str, batch_size: int, seq_len: int, **kw) -> dict:
    """:func:`train_step_flops` of a top-k MoE without data-dependent loops: the matmuls of a dropless
    top-k dispatch (each token through exactly ``top_k`` experts, no padding), counted by the compiler.

    Computed as the dense-dispatch step at E experts minus ``E - top_k`` times one expert's share (the
    difference of the steps at E and E - 1 experts; why and what it charges: docs/training.md, FLOPs and
    MFU). Dense models, and MoEs with every expert active, are counted directly. Adds ``method`` to the
    result (and ``per_expert`` when it subtracts).
    """
    e = config.num_experts if phase != "expert" or config.is_moe else 2
    k = config.top_k if config.is_moe else 2
    if not config.is_moe or k >= e:
        return {**train_step_flops(config, phase, batch_size, seq_len, **kw), "method": "compiled step"}
    dense = config.replace(moe_impl="dense")
    fewer = dense.replace(num_experts=e - 1, top_k=min(k, e - 1), expert_names=dense.names[: e - 1])
    full, less = (train_step_flops(c, phase, batch_size, seq_len, **kw) for c in (dense, fewer))
    per_expert = full["compiled"] - less["compiled"]
    return {**full, "compiled": full["compiled"] - (e - k) * per_expert, "per_expert": per_expert,
            "method": f"compiled dense-dispatch step minus the {e - k} experts each token skips"}


@functools.cache
def measured_peak_flops(dtype: str = "float32", n: int = 1024) -> float:
    """Matmul FLOP/s of this machine (an n^3 jitted matmul in ``dtype``), measured once (for MFU)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 5 * 2 * n ** 3 / (time.perf_counter() - t)
