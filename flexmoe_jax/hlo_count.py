"""Matmul FLOPs of compiled XLA programs, counted through loops (CPU, GPU and TPU HLO).

:func:`compiled_flops` reads the optimized HLO (:mod:`flexmoe_jax.hlo_parse`) and multiplies each loop
body by its trip count; Pallas kernels count by their cost estimate. ``cost_analysis`` counts a ``while``
body once. What cannot be proven is reported as unknown, never as a number. Method and caveats:
docs/training.md (FLOPs and MFU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

from flexmoe_jax.hlo_parse import Instr, attr_dims, dims, dtypes, first_array, parse, trip_count

# Library matmuls (cuBLAS gemm, oneDNN matmul) by custom-call target, and the dot dimension
# numbers in their backend_config (unverified here: no GPU build was available to test them).
_MATMUL_CALL = re.compile(r'custom_call_target="[^"]*(gemm|matmul|Matmul)[^"]*"')

_CALL_CONTRACT = re.compile(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]')

# A Pallas/Mosaic TPU kernel, and the cost estimate pallas_call(cost_estimate=...) leaves in its backend_config.
_TPU_KERNEL = 'custom_call_target="tpu_custom_call"'

_KERNEL_FLOPS = re.compile(r'"cost_estimate"\s*:\s*\{[^}]*?"flops"\s*:\s*"?(\d+)')

_INDEX_TYPES = ("pred", "s32", "u32", "s64", "u64")

_BRANCHES = ("true_computation", "false_computation", "branch_computations")



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
    types = dtypes(shape) + [t for s in operand_shapes for t in dtypes(s)]
    return Flops(0.0) if types and all(t in _INDEX_TYPES for t in types) else Flops(0.0, unknown_kernels=1)



def _matmul_flops(ins: Instr, shapes: dict[str, str]) -> Flops:
    """Matmul FLOPs of one instruction (0 for anything but the ops :class:`Flops` counts)."""
    op, attrs, out = ins.op, ins.attrs, first_array(ins.shape)
    operands = [dims(shapes.get(o, "")) for o in ins.operands]
    lhs = operands[0] if operands else None
    rhs = operands[1] if len(operands) > 1 else None
    if op == "dot" and lhs is not None:
        return Flops(2.0 * math.prod(out) * math.prod(lhs[d] for d in attr_dims(attrs, "lhs_contracting_dims")))
    if op == "ragged-dot" and lhs is not None and rhs is not None:
        # Every lhs element meets each rhs column that is not contracted, batched or a group.
        skip = set(attr_dims(attrs, "rhs_contracting_dims") + attr_dims(attrs, "rhs_batch_dims")
                   + attr_dims(attrs, "rhs_group_dims"))
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



def hlo_flops(hlo: str) -> Flops:
    """Matmul FLOPs of one execution of an HLO module's text (see :class:`Flops` for what counts)."""
    comps, entry = parse(hlo)

    @functools.lru_cache(maxsize=None)
    def cost(name: str) -> Flops:
        total, comp = Flops(0.0), comps.get(name, {})
        shapes = {n: i.shape for n, i in comp.items()}
        for ins in comp.values():
            total += _matmul_flops(ins, shapes)
            targets = {kind: [cost(c) for c in names] for kind, names in ins.called}
            if ins.op == "while":
                body, cond = targets["body"][0], targets["condition"][0]
                trip = trip_count(ins, comp, comps)
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
