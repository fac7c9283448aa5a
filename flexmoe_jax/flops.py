"""FLOPs of compiled XLA programs counted through loops, the training step's FLOPs per phase, and peak FLOP/s.

:func:`compiled_flops` reads the optimized HLO (CPU, GPU or TPU) and multiplies each loop body by its
trip count: the one XLA proved (``known_trip_count``, CPU/GPU) or, where the HLO does not carry it (TPU),
the one its counter shows (a counter from a constant, stepped by a constant, compared with a constant).
``cost_analysis`` counts a ``while`` body once. :func:`train_step_flops` compiles a phase's real training
step on abstract inputs and counts it beside the 6N estimate. Method and caveats: docs/training.md
(FLOPs and MFU).
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

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*)?\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"^([a-z][a-z0-9]*)\[([^\]]*)\](?:\{[^}]*\})?")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation|"
                     r"branch_computations|called_computations|select|scatter)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
# Library matmuls (cuBLAS gemm, oneDNN matmul) by custom-call target, and the dot dimension
# numbers in their backend_config (unverified here: no GPU build was available to test them).
_MATMUL_CALL = re.compile(r'custom_call_target="[^"]*(gemm|matmul|Matmul)[^"]*"')
_CALL_CONTRACT = re.compile(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]')
# A Pallas/Mosaic TPU kernel, and the cost estimate pallas_call(cost_estimate=...) leaves in its backend_config.
_TPU_KERNEL = 'custom_call_target="tpu_custom_call"'
_KERNEL_FLOPS = re.compile(r'"cost_estimate"\s*:\s*\{[^}]*?"flops"\s*:\s*"?(\d+)')
_INDEX_TYPES = ("pred", "s32", "u32", "s64", "u64")
_METADATA = re.compile(r"metadata=\{[^}]*\}")
_BRANCHES = ("true_computation", "false_computation", "branch_computations")
# Ops that pass a loop counter's value through unchanged.
_PASS = ("copy", "bitcast", "reshape")


@dataclasses.dataclass(frozen=True)
class Flops:
    """Matmul FLOPs of one execution of a compiled program.

    Counted: 2 x multiply-adds of every ``dot``, ``convolution`` (taps that meet padding or the
    holes of a dilated input excluded), ``ragged-dot``, library gemm custom-call (cuBLAS, oneDNN)
    and the ``cost_estimate`` flops of Pallas TPU kernels; not counted: elementwise ops, reductions,
    transcendentals. ``flops`` is certain work, a lower bound: a ``while`` body counts times its trip
    count (XLA's ``known_trip_count``, else the one a constant-bounded counter shows), a loop whose trip
    count cannot be established counts zero iterations and a ``conditional`` its cheapest branch.
    ``dynamic_loops`` counts those loops and conditionals (as written in the program) and
    ``dynamic_flops`` is what one more pass through each would add. ``unknown_kernels`` counts
    calls of Pallas TPU kernels without a cost estimate (their work is not in ``flops``). The count
    is exact only when both are 0 (:attr:`exact`).
    """

    flops: float
    dynamic_flops: float = 0.0
    dynamic_loops: int = 0
    unknown_kernels: int = 0

    def __add__(self, o: "Flops") -> "Flops":
        return Flops(self.flops + o.flops, self.dynamic_flops + o.dynamic_flops, self.dynamic_loops + o.dynamic_loops,
                     self.unknown_kernels + o.unknown_kernels)

    def times(self, n: int) -> "Flops":
        """n executions: FLOPs scale; loops and kernels are counted as written (n > 0) or vanish (n == 0)."""
        if n == 0:
            return Flops(0.0)
        return Flops(self.flops * n, self.dynamic_flops * n, self.dynamic_loops, self.unknown_kernels)

    @property
    def exact(self) -> bool:
        """Whether ``flops`` is the program's whole matmul count (no unknown trip count or kernel)."""
        return self.dynamic_loops == 0 and self.unknown_kernels == 0

    def describe(self, scale: float = 1.0) -> str:
        """``flops * scale`` as text, or "unknown" with the certain lower bound and what is missing."""
        if self.exact:
            return f"{self.flops * scale:.3e}"
        missing = [f"{n} {what}" for n, what in ((self.dynamic_loops, "loops/conditionals of unknown trip count"),
                                                  (self.unknown_kernels, "kernels without a cost estimate")) if n]
        return f"unknown (at least {self.flops * scale:.3e}; {' and '.join(missing)} not counted)"


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active parameters + attention (12 x layers x d_model x seq_len)."""
    c = config.replace(num_experts=config.top_k if config.is_moe else 0, expert_names=())
    active = c.num_params() - config.vocab_size * config.d_model  # the embedding lookup is not a matmul
    return 6.0 * active + 12.0 * config.n_layers * config.d_model * seq_len


def training_flops(config: ModelConfig, steps: int, batch_size: int, seq_len: int) -> float:
    """Total training FLOPs of ``steps`` steps of ``batch_size`` x ``seq_len`` tokens."""
    return flops_per_token(config, seq_len) * steps * batch_size * seq_len


@dataclasses.dataclass(frozen=True)
class _Instr:
    """One HLO instruction: ``name = shape op(operands), attrs`` (metadata dropped)."""

    name: str
    op: str
    shape: str
    operands: tuple[str, ...]
    literal: str  # the text between the op's parentheses (a constant's value)
    attrs: str
    called: tuple[tuple[str, tuple[str, ...]], ...]
    root: bool


def _dims(shape: str) -> list[int] | None:
    """Dimensions of an array shape string (``f32[8,<=16]{1,0}``), None for a tuple."""
    m = _ARRAY.match(shape.strip())
    if m is None:
        return None
    return [int(d.replace("<=", "")) for d in m.group(2).split(",") if d.strip()]


def _dtypes(shape: str) -> list[str]:
    """Element types of an array or tuple shape string."""
    return re.findall(r"\b([a-z][a-z0-9]*)\[", shape)


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


@functools.lru_cache(maxsize=None)
def _window_taps(size: int, out: int, window: int, stride: int, pad_lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dimension whose tap meets a real input element.

    Taps that land in padding or in the holes of a dilated input multiply zeros (the TPU compiler writes
    a batched matmul as a convolution over a dilated batch dimension, where one tap in ``window`` is real).
    """
    last = (size - 1) * lhs_dilate  # the dilated input spans [0, last], real elements at multiples of lhs_dilate
    total = 0
    for o in range(out):
        first = o * stride - pad_lo
        if rhs_dilate == 1:
            lo, hi = max(first, 0), min(first + window - 1, last)
            total += max(0, hi // lhs_dilate - (lo - 1) // lhs_dilate) if hi >= lo else 0
        else:
            total += sum(1 for k in range(window)
                         if 0 <= (p := first + k * rhs_dilate) <= last and p % lhs_dilate == 0)
    return total


def _window(attrs: str, key: str, n: int, default: int) -> list[int]:
    """One ``window={...}`` field (``size=3x4``) as n ints; pads give their low edge."""
    window = re.search(r"window=\{([^}]*)\}", attrs)
    m = re.search(rf"\b{key}=(\S+)", window.group(1)) if window else None
    if m is None:
        return [default] * n
    return [int(v.split("_")[0]) for v in m.group(1).split("x")]


def _conv_flops(out: list[int], lhs: list[int], rhs: list[int], attrs: str) -> float:
    """2 x multiply-adds of a convolution: out batch x out features x kernel input features x real taps.

    Grouping needs no factor: with ``feature_group_count`` G the kernel's input features are already
    C_in / G, with ``batch_group_count`` G the output batch is already N / G.
    """
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if labels is None:  # no labels: XLA's default, bf01_oi01->bf01
        spatial = len(out) - 2
        lhs_l = out_l = "bf" + "".join(map(str, range(spatial)))
        rhs_l = "oi" + "".join(map(str, range(spatial)))
    else:
        lhs_l, rhs_l, out_l = labels.groups()
    n = len(out_l) - 2
    keys = ("size", "stride", "pad", "lhs_dilate", "rhs_dilate")
    fields = [_window(attrs, k, n, 0 if k == "pad" else 1) for k in keys]
    taps = 1
    for d in range(n):
        taps *= _window_taps(lhs[lhs_l.index(str(d))], out[out_l.index(str(d))], *(f[d] for f in fields))
    return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * taps


def _kernel_flops(shape: str, operand_shapes: list[str], attrs: str) -> Flops:
    """A Pallas TPU kernel's cost estimate; a kernel without one counts as unknown, unless it reads and
    writes only index types (ints, predicates: no floating-point matmul, e.g. ragged-dot's group metadata)."""
    m = _KERNEL_FLOPS.search(attrs)
    if m:
        return Flops(float(m.group(1)))
    types = _dtypes(shape) + [t for s in operand_shapes for t in _dtypes(s)]
    return Flops(0.0) if types and all(t in _INDEX_TYPES for t in types) else Flops(0.0, unknown_kernels=1)


def _matmul_flops(ins: _Instr, shapes: dict[str, str]) -> Flops:
    """Matmul FLOPs of one instruction (0 for anything but the ops :class:`Flops` counts)."""
    op, attrs, out = ins.op, ins.attrs, _first_array(ins.shape)
    operands = [_dims(shapes.get(o, "")) for o in ins.operands]
    lhs = operands[0] if operands else None
    rhs = operands[1] if len(operands) > 1 else None
    if op == "dot" and lhs is not None:
        return Flops(2.0 * math.prod(out) * math.prod(lhs[d] for d in _attr_dims(attrs, "lhs_contracting_dims")))
    if op == "ragged-dot" and lhs is not None and rhs is not None:
        # Every lhs element meets each rhs column that is not contracted, batched or a group.
        skip = set(_attr_dims(attrs, "rhs_contracting_dims") + _attr_dims(attrs, "rhs_batch_dims")
                   + _attr_dims(attrs, "rhs_group_dims"))
        return Flops(2.0 * math.prod(lhs) * math.prod(n for i, n in enumerate(rhs) if i not in skip))
    if op == "convolution" and lhs is not None and rhs is not None:
        return Flops(_conv_flops(out, lhs, rhs, attrs))
    if op == "custom-call" and _TPU_KERNEL in attrs:
        return _kernel_flops(ins.shape, [shapes.get(o, "") for o in ins.operands], attrs)
    if op == "custom-call" and lhs is not None and _MATMUL_CALL.search(attrs):
        m = _CALL_CONTRACT.search(attrs)
        contract = [int(d.strip(' "')) for d in m.group(1).split(",") if d.strip()] if m else [len(lhs) - 1]
        return Flops(2.0 * math.prod(out) * math.prod(lhs[d] for d in contract))
    return Flops(0.0)


def _instruction(line: str) -> _Instr | None:
    """An instruction line parsed, None for anything else."""
    m = _INSTR.match(line)
    if m is None:
        return None
    root, name, rest = m.groups()
    shape, tail = _split_shape(rest)
    op, _, args = tail.partition("(")
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            end = i
            break
    operand_str, attrs = args[:end], _METADATA.sub("", args[end + 1:])
    called = tuple((kind, tuple(re.findall(r"%?([\w.\-]+)", target))) for kind, target in _CALLED.findall(attrs))
    return _Instr(name, op.strip(), shape, _operand_names(operand_str), operand_str.strip(), attrs, called, bool(root))


def _operand_names(text: str) -> tuple[str, ...]:
    """Operand names of ``[shape] %name, ...`` (shapes, ``%`` and ``/*index=5*/`` comments optional)."""
    pieces, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            pieces.append(re.sub(r"/\*.*?\*/", "", text[start:i]).split())
            start = i + 1
    return tuple(p[-1].lstrip("%") for p in pieces if p and re.fullmatch(r"%?[\w.\-]+", p[-1]))


def _parse(hlo: str) -> tuple[dict[str, dict[str, _Instr]], str]:
    """{computation: {instruction name: instruction}} (in program order), and the entry's name."""
    comps: dict[str, dict[str, _Instr]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header and not line[0].isspace():
            current = comps.setdefault(header.group(1), {})
            entry = header.group(1) if line.startswith("ENTRY") else entry
            continue
        ins = _instruction(line) if current is not None else None
        if ins is not None:
            current[ins.name] = ins
    if entry is None:
        raise UserError("no ENTRY computation in the HLO text; pass compiled.as_text() of a compiled program")
    return comps, entry


def _root(comp: dict[str, _Instr]) -> _Instr | None:
    return next((i for i in comp.values() if i.root), None)


def _through(comp: dict[str, _Instr], name: str) -> _Instr | None:
    """The instruction ``name`` names, looking through copies and bitcasts."""
    ins = comp.get(name)
    while ins is not None and ins.op in _PASS and len(ins.operands) == 1:
        ins = comp.get(ins.operands[0])
    return ins


def _unwrapped(ins: _Instr | None, comps: dict[str, dict[str, _Instr]]) -> _Instr | None:
    """A fusion that only wraps one op on its parameters (CPU's ``wrapped_compare``) as that op on the
    fusion's operands; any other instruction as it is."""
    if ins is None or ins.op != "fusion":
        return ins
    inner = comps.get(dict(ins.called).get("calls", ("",))[0], {})
    root = _root(inner)
    params = [inner.get(o) for o in root.operands] if root else []
    if not root or not all(p is not None and p.op == "parameter" and p.literal.isdigit() for p in params):
        return ins
    return dataclasses.replace(root, operands=tuple(ins.operands[int(p.literal)] for p in params))


def _int_constant(ins: _Instr | None) -> int | None:
    if ins is None or ins.op != "constant" or not re.fullmatch(r"-?\d+", ins.literal):
        return None
    return int(ins.literal)


def _tuple_index(comp: dict[str, _Instr], name: str) -> int | None:
    """i when ``name`` is element i of the computation's (tuple) parameter, else None."""
    ins = _through(comp, name)
    if ins is None or ins.op != "get-tuple-element" or len(ins.operands) != 1:
        return None
    param = _through(comp, ins.operands[0])
    m = re.search(r"\bindex=(\d+)", ins.attrs)
    return int(m.group(1)) if param is not None and param.op == "parameter" and m else None


def _carried_constant(i: int, init: list[int | None], body_next: list[str], body: dict[str, _Instr]) -> int | None:
    """The value of loop-state element i when the body passes it on unchanged and it starts as a constant."""
    if i < len(body_next) and _tuple_index(body, body_next[i]) == i:
        return init[i] if i < len(init) else None
    return None


def _value(comp, name, init, body_next, body) -> int | None:
    """A constant, or a loop-invariant element of the loop state that starts as one."""
    c = _int_constant(_through(comp, name))
    if c is not None:
        return c
    i = _tuple_index(comp, name)
    return None if i is None else _carried_constant(i, init, body_next, body)


def _iterations(start: int, step: int, bound: int, direction: str) -> int | None:
    """Trips of ``for (i = start; i <direction> bound; i += step)``; None if it would not end."""
    if direction in ("LE", "GE"):
        bound, direction = bound + (1 if direction == "LE" else -1), direction[0] + "T"
    if direction == "LT" or direction == "GT":
        ahead = bound - start if direction == "LT" else start - bound
        pace = step if direction == "LT" else -step
        if ahead <= 0:
            return 0
        return -(-ahead // pace) if pace > 0 else None
    if direction == "NE" and step != 0 and (bound - start) % step == 0 and (bound - start) // step >= 0:
        return (bound - start) // step
    return None


_FLIP = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "NE": "NE", "EQ": "EQ"}


def _trip_count(loop: _Instr, caller: dict[str, _Instr], comps: dict[str, dict[str, _Instr]]) -> int | None:
    """A ``while`` loop's trip count: XLA's ``known_trip_count`` if the HLO carries it, else the one its
    counter shows. The counter is a loop-state element that starts as a constant, is stepped by a
    constant each pass (``add``), and the condition compares it with a constant (or with a state element
    that starts as one and never changes). None where no such counter is found (a data-dependent loop).
    """
    known = _TRIP.search(loop.attrs)
    if known:
        return int(known.group(1))
    names = dict(loop.called)
    cond, body = comps.get(names.get("condition", ("",))[0]), comps.get(names.get("body", ("",))[0])
    state = _through(caller, loop.operands[0]) if loop.operands else None
    test, nxt = _unwrapped(_root(cond or {}), comps), _root(body or {})
    if test is None or nxt is None or state is None or state.op != "tuple" or nxt.op != "tuple":
        return None
    if test.op != "compare" or len(test.operands) != 2:
        return None
    init = [_int_constant(_through(caller, o)) for o in state.operands]
    body_next = list(nxt.operands)
    direction = re.search(r"direction=(\w+)", test.attrs)
    for side in (0, 1):
        i = _tuple_index(cond, test.operands[side])
        bound = _value(cond, test.operands[1 - side], init, body_next, body)
        if i is None or bound is None or i >= len(body_next) or init[i] is None:
            continue
        step = _step(_unwrapped(_through(body, body_next[i]), comps), body, i, init, body_next)
        if step is not None and direction:
            d = direction.group(1) if side == 0 else _FLIP.get(direction.group(1), "")
            return _iterations(init[i], step, bound, d)
    return None


def _step(ins: _Instr | None, body: dict[str, _Instr], i: int, init: list[int | None],
          body_next: list[str]) -> int | None:
    """s when ``ins``, the body's next value of state element i, is ``element i + s`` (or ``- s``) for a
    constant s."""
    if ins is None or ins.op not in ("add", "subtract") or len(ins.operands) != 2:
        return None
    a, b = ins.operands
    for x, y in ((a, b), (b, a)) if ins.op == "add" else ((a, b),):
        if _tuple_index(body, x) == i:
            s = _value(body, y, init, body_next, body)
            if s is not None:
                return s if ins.op == "add" else -s
    return None


def hlo_flops(hlo: str) -> Flops:
    """Matmul FLOPs of one execution of an HLO module's text (see :class:`Flops` for what counts)."""
    comps, entry = _parse(hlo)

    @functools.lru_cache(maxsize=None)
    def cost(name: str) -> Flops:
        total, comp = Flops(0.0), comps.get(name, {})
        shapes = {n: i.shape for n, i in comp.items()}
        for ins in comp.values():
            total += _matmul_flops(ins, shapes)
            targets = {kind: [cost(c) for c in names] for kind, names in ins.called}
            if ins.op == "while":
                body, cond = targets["body"][0], targets["condition"][0]
                trip = _trip_count(ins, comp, comps)
                if trip is not None:
                    total += body.times(trip) + cond.times(trip + 1)
                else:  # unknown trip count: zero iterations are certain, each one adds body + condition
                    once = body + cond
                    total += cond + Flops(0.0, once.flops + once.dynamic_flops, once.dynamic_loops + 1,
                                          once.unknown_kernels)
            elif ins.op == "conditional":
                branches = [f for k in _BRANCHES for f in targets.get(k, ())]
                low = min(branches, key=lambda f: f.flops)
                high = max(f.flops + f.dynamic_flops for f in branches)
                total += Flops(low.flops, high - low.flops, max(f.dynamic_loops for f in branches) + 1,
                               max(f.unknown_kernels for f in branches))
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
    devices; a lower bound if ``dynamic_loops`` or ``unknown_kernels``, see :class:`Flops`),
    ``estimate_6n`` (:func:`flexmoe_jax.flops_per_token` x tokens), ``dynamic_loops``,
    ``dynamic_flops``, ``unknown_kernels`` and ``devices``.
    """
    compiled, config, mesh = compile_train_step(config, phase, batch_size, seq_len, **kw)
    counted = compiled_flops(compiled)
    n = mesh.devices.size
    return {"compiled": counted.flops * n, "dynamic_loops": counted.dynamic_loops,
            "dynamic_flops": counted.dynamic_flops * n, "unknown_kernels": counted.unknown_kernels, "devices": n,
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
