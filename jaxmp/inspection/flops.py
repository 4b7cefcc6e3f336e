"""FLOPs and memory traffic per device, read off compiled HLO with loop trip counts applied.

Why not just ``compiled.cost_analysis()``: on jax 0.10 (CPU) XLA's cost analysis counts the body of a
``while`` loop once, whatever its trip count, so a ``lax.scan`` over 8 layers or over the ticks of a
pipeline reports a fraction of the real work (checked in ``tests/test_analyze.py``). This module walks
the optimised HLO text instead:

- FLOPs: ``2 * prod(result dims) * prod(contracted dims)`` for every ``dot`` (and GPU gemm
  ``custom-call`` with ``dot_dimension_numbers``) and ``2 * prod(result dims) * prod(kernel dims) /
  kernel output features`` for every ``convolution`` (multiply-adds of the matmul-like work;
  element-wise ops are left out, as in the usual ``6 * params * tokens`` accounting);
- bytes: for every instruction that is not inside a fusion, the bytes of its result and of its
  operands, as XLA's cost analysis counts a fusion (tuple plumbing, parameters, constants and
  control flow move nothing and are skipped);
- a computation runs as often as its callers say: a ``while`` body ``known_trip_count`` times, a
  fusion or call once per call, and a conditional costs its most expensive branch (an upper bound:
  each device runs one branch).
"""

from __future__ import annotations

import json
import math
import re
from typing import NamedTuple

from jaxmp.inspection.hlo import (
    CALLEE,
    TRIP_COUNT,
    Array,
    Instruction,
    Shape,
    array_leaves,
    itemsize_bits,
    lines_by_computation,
    parse_instruction,
)

_NO_TRAFFIC = {
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "iota",
}


class HloCost(NamedTuple):
    """Per-device matmul FLOPs and memory traffic of one execution of a compiled program."""

    flops: float
    bytes_accessed: float


def _elements(shape: Shape) -> int:
    return sum(math.prod(leaf.dims) for leaf in array_leaves(shape))


def _bytes(shape: Shape) -> int:
    return sum(math.prod(leaf.dims) * itemsize_bits(leaf.dtype) // 8 for leaf in array_leaves(shape))


def _dims(attrs: str, key: str) -> list[int]:
    match = re.search(rf"{key}=\{{([\d,\s]*)\}}", attrs)
    return [int(d) for d in match[1].split(",") if d.strip()] if match else []


def _dot_flops(inst: Instruction, shapes: dict[str, Shape]) -> float:
    lhs = shapes.get(inst.operands[0]) if inst.operands else None
    if not isinstance(lhs, Array):
        return 0.0
    contracting = _dims(inst.attrs, "lhs_contracting_dims")
    if inst.opcode == "custom-call":  # GPU gemm: dimension numbers live in the backend config JSON
        match = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
        if match is None:
            return 0.0
        contracting = [int(d) for d in json.loads(f"[{match[1]}]")]
    return 2.0 * _elements(inst.shape) * math.prod(lhs.dims[d] for d in contracting)


def _conv_flops(inst: Instruction, shapes: dict[str, Shape]) -> float:
    kernel = shapes.get(inst.operands[1]) if len(inst.operands) > 1 else None
    labels = re.search(r"dim_labels=\w+_(\w+)->", inst.attrs)
    if not isinstance(kernel, Array) or labels is None or "o" not in labels[1]:
        return 0.0
    outputs = kernel.dims[labels[1].index("o")]
    return 2.0 * _elements(inst.shape) * math.prod(kernel.dims) / max(outputs, 1)


def _computations(hlo_text: str) -> dict[str, list[Instruction]]:
    bodies: dict[str, list[Instruction]] = {}
    for computation, line in lines_by_computation(hlo_text):
        inst = parse_instruction(line)
        if inst:
            bodies.setdefault(computation, []).append(inst)
    return bodies


def _callees(inst: Instruction) -> list[tuple[str, str, int]]:
    """(key, computation, times per call) for every computation ``inst`` calls."""
    trip = TRIP_COUNT.search(inst.attrs)
    found = []
    for callee in CALLEE.finditer(inst.attrs):
        times = int(trip["n"]) if trip and callee["key"] in ("body", "condition") else 1
        for name in re.findall(r"%?([\w.\-]+)", callee["value"]):
            found.append((callee["key"], name, times))
    return found


def hlo_cost(hlo_text: str) -> HloCost:
    """Matmul FLOPs and memory traffic of ``compiled.as_text()``, loop trip counts applied (see module doc)."""
    bodies = _computations(hlo_text)
    memo: dict[tuple[str, bool], tuple[float, float]] = {}

    def cost(name: str, fused: bool, depth: int = 0) -> tuple[float, float]:
        if (name, fused) in memo or depth > 64:
            return memo.get((name, fused), (0.0, 0.0))
        shapes = {inst.name: inst.shape for inst in bodies.get(name, ())}
        flops = traffic = 0.0
        for inst in bodies.get(name, ()):
            if inst.opcode == "dot" or (inst.opcode == "custom-call" and "dot_dimension_numbers" in inst.attrs):
                flops += _dot_flops(inst, shapes)
            elif inst.opcode == "convolution":
                flops += _conv_flops(inst, shapes)
            if not fused and inst.opcode not in _NO_TRAFFIC:
                traffic += _bytes(inst.shape) + sum(_bytes(shapes[op]) for op in inst.operands if op in shapes)
            branches = []
            for key, callee, times in _callees(inst):
                inner = cost(callee, fused or inst.opcode == "fusion" or key == "to_apply", depth + 1)
                if key == "branch_computations":
                    branches.append(inner)
                else:
                    flops, traffic = flops + times * inner[0], traffic + times * inner[1]
            if branches:
                flops += max(b[0] for b in branches)
                traffic += max(b[1] for b in branches)
        memo[(name, fused)] = (flops, traffic)
        return flops, traffic

    flops, traffic = cost("ENTRY", False)
    return HloCost(flops, traffic)
