"""HLO text as data: computations of instructions (``parse``), and the trip count of a ``while`` loop
(``trip_count``): the one XLA proved (``known_trip_count``, CPU/GPU) or, where the HLO does not carry it
(TPU), the one its counter shows (from a constant, stepped by a constant, compared with a constant);
None when neither can be established. What :mod:`flexmoe_jax.hlo_count` counts FLOPs over.
"""

from __future__ import annotations

import dataclasses
import re

from flexmoe_jax.errors import UserError

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*)?\{\s*$")

_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")

_ARRAY = re.compile(r"^([a-z][a-z0-9]*)\[([^\]]*)\](?:\{[^}]*\})?")

_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation|"
                     r"branch_computations|called_computations|select|scatter)=(\{[^}]*\}|%?[\w.\-]+)")

_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')

_METADATA = re.compile(r"metadata=\{[^}]*\}")

# Ops that pass a loop counter's value through unchanged.
_PASS = ("copy", "bitcast", "reshape")



@dataclasses.dataclass(frozen=True)
class Instr:
    """One HLO instruction: ``name = shape op(operands), attrs`` (metadata dropped)."""

    name: str
    op: str
    shape: str
    operands: tuple[str, ...]
    literal: str  # the text between the op's parentheses (a constant's value)
    attrs: str
    called: tuple[tuple[str, tuple[str, ...]], ...]
    root: bool



def dims(shape: str) -> list[int] | None:
    """Dimensions of an array shape string (``f32[8,<=16]{1,0}``), None for a tuple."""
    m = _ARRAY.match(shape.strip())
    if m is None:
        return None
    return [int(d.replace("<=", "")) for d in m.group(2).split(",") if d.strip()]



def dtypes(shape: str) -> list[str]:
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



def attr_dims(attrs: str, name: str) -> list[int]:
    m = re.search(rf"\b{name}=\{{([\d,\s]*)\}}", attrs)
    return [int(d) for d in m.group(1).split(",") if d.strip()] if m else []



def first_array(shape: str) -> list[int]:
    """Dims of an array shape, or of the first array in a tuple (a gemm's result beside its workspace)."""
    return dims(shape) or dims(shape.lstrip("(")) or []



def _instruction(line: str) -> Instr | None:
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
    return Instr(name, op.strip(), shape, _operand_names(operand_str), operand_str.strip(), attrs, called, bool(root))



def _operand_names(text: str) -> tuple[str, ...]:
    """Operand names of ``[shape] %name, ...`` (shapes, ``%`` and ``/*index=5*/`` comments optional)."""
    pieces, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            pieces.append(re.sub(r"/\*.*?\*/", "", text[start:i]).split())
            start = i + 1
    return tuple(p[-1].lstrip("%") for p in pieces if p and re.fullmatch(r"%?[\w.\-]+", p[-1]))



def parse(hlo: str) -> tuple[dict[str, dict[str, Instr]], str]:
    """{computation: {instruction name: instruction}} (in program order), and the entry's name."""
    comps: dict[str, dict[str, Instr]] = {}
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



def _root(comp: dict[str, Instr]) -> Instr | None:
    return next((i for i in comp.values() if i.root), None)



def _through(comp: dict[str, Instr], name: str) -> Instr | None:
    """The instruction ``name`` names, looking through copies and bitcasts."""
    ins = comp.get(name)
    while ins is not None and ins.op in _PASS and len(ins.operands) == 1:
        ins = comp.get(ins.operands[0])
    return ins



def _unwrapped(ins: Instr | None, comps: dict[str, dict[str, Instr]]) -> Instr | None:
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



def _int_constant(ins: Instr | None) -> int | None:
    if ins is None or ins.op != "constant" or not re.fullmatch(r"-?\d+", ins.literal):
        return None
    return int(ins.literal)



def _tuple_index(comp: dict[str, Instr], name: str) -> int | None:
    """i when ``name`` is element i of the computation's (tuple) parameter, else None."""
    ins = _through(comp, name)
    if ins is None or ins.op != "get-tuple-element" or len(ins.operands) != 1:
        return None
    param = _through(comp, ins.operands[0])
    m = re.search(r"\bindex=(\d+)", ins.attrs)
    return int(m.group(1)) if param is not None and param.op == "parameter" and m else None



def _carried_constant(i: int, init: list[int | None], body_next: list[str], body: dict[str, Instr]) -> int | None:
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



def trip_count(loop: Instr, caller: dict[str, Instr], comps: dict[str, dict[str, Instr]]) -> int | None:
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



def _step(ins: Instr | None, body: dict[str, Instr], i: int, init: list[int | None],
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
