"""Read the communication XLA inserted off a compiled program.

Why: with ``AxisType.Auto`` meshes XLA, not jaxmp, decides where collectives go. The only trustworthy
record of what a sharded step exchanges is the optimised HLO of the compiled executable
(``jax.jit(f, in_shardings=..., out_shardings=...).lower(*args).compile().as_text()``). This module
parses that text into :class:`Collective` records (kind, mesh axes, shape, elements moved) so tests can
assert exactly which communication a strategy costs, e.g. the Dettmers data-vs-model-parallelism numbers
(:func:`textbook_layer_exchange`).

Device ids. In an SPMD-partitioned program the ids in ``replica_groups`` / ``source_target_pairs`` are
logical ids: positions in ``mesh.devices.flat`` (the executable's device assignment), not
``Device.id``. A collective's axes are the mesh axes along which the coordinates
``np.unravel_index(id, mesh.devices.shape)`` vary inside a group. (Checked in the tests: a mesh built
over a permuted device list compiles to the same HLO and maps to the same axes.)

Replica-group syntaxes understood: explicit ``{{0,1},{2,3}}``; iota ``[2,4]<=[8]`` and
``[4,2]<=[2,4]T(1,0)``; empty ``{}`` (all devices); and the mesh-axes form that current XLA prints,
``mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_1'}`` including sub-axes
``'axis_1':(1)2``. Its mesh is XLA's own (axis names unrelated to jaxmp's); it is expanded to explicit
groups of logical ids first.

Counting conventions (``elements`` = what the textbook counts as moved):
  - all-reduce: the array's elements;
  - all-gather: elements each device receives = output elements * (g-1)/g;
  - reduce-scatter: input elements * (g-1)/g = output elements * (g-1) (what each device sends);
  - all-to-all: array elements * (g-1)/g (what each device sends, and receives);
  - collective-permute: the array's elements; ``group_size`` is the largest set of devices the
    source-target pairs connect;
  - a collective over groups of one device moves nothing: 0.
A tuple-shaped (combined) all-reduce / all-gather / reduce-scatter gives one :class:`Collective` per
operand, all with the same ``name``. A tuple-form all-to-all (one operand per peer) is one exchange: one
:class:`Collective` with shape ``(operands, *chunk)``. Async pairs (``all-reduce-start`` /
``-done`` ...) count once, at the ``-start``, with the shape of the ``-done``.

Loops: ``count`` is how often a collective runs per execution of the program: the product of the
``known_trip_count`` of the while loops around it (XLA records it in the loop's backend config). A
collective inside a conditional branch counts as if that branch ran.

Wire bytes (:func:`wire_bytes`, for time estimates): what one device sends in a bandwidth-optimal ring,
per execution: all-reduce ``2 (g-1)/g`` x the array (reduce-scatter then all-gather), all-gather,
reduce-scatter and all-to-all ``elements`` as counted above, collective-permute the array.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmp.mesh import MeshShape, build_mesh
from jaxmp.sharding import logical_to_spec, rules_for

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


class Collective(NamedTuple):
    """One collective of a compiled program (see the module docstring for the counting conventions)."""

    kind: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    group_size: int
    elements: int
    bytes: int
    name: str
    op_name: str
    count: int = 1  # executions per run of the program: loop bodies count their trip count

    @property
    def total_elements(self) -> int:
        """Elements moved per run of the program (``elements * count``)."""
        return self.elements * self.count


class MemoryAndFlops(NamedTuple):
    """Per-device memory (bytes) and flops XLA reports for a compiled program; None when unavailable.

    ``flops`` and ``bytes_accessed`` are ``cost_analysis()``'s: XLA counts each while-loop body once
    (checked on jax 0.10 CPU), so for scanned layers or pipelines use :mod:`jaxmp.hlo_cost`. Peak
    memory is ``argument + output - alias + temp`` (donated inputs alias outputs).
    """

    argument_bytes: int | None
    output_bytes: int | None
    temp_bytes: int | None
    flops: float | None
    alias_bytes: int | None = None
    bytes_accessed: float | None = None

    @property
    def peak_bytes(self) -> int | None:
        """Live bytes at the program's peak: arguments, outputs not aliased to arguments, temporaries."""
        parts = (self.argument_bytes, self.output_bytes, self.temp_bytes)
        if any(part is None for part in parts):
            return None
        return self.argument_bytes + self.output_bytes - (self.alias_bytes or 0) + self.temp_bytes


# ----------------------------------------------------------------------------------------- HLO syntax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*(?P<opcode>[a-z][\w\-]*)\(")
_LEAF = re.compile(r"\s*(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]")
_IOTA = re.compile(r"\[(?P<dims>[\d,\s]+)\]<=\[(?P<reshape>[\d,\s]+)\](?:T\((?P<perm>[\d,\s]+)\))?")
_DEVICE_IOTA = re.compile(r"\[(?P<first>[\d,\s]+)\](?:<=\[(?P<reshape>[\d,\s]+)\])?(?:T\((?P<perm>[\d,\s]+)\))?$")
_AXIS_REF = re.compile(r"'?(?P<name>[^':,\s]+)'?(?::\((?P<pre>\d+)\)(?P<size>\d+))?")
_COMMENT = re.compile(r"/\*.*?\*/")
_OP_NAME = re.compile(r'metadata=\{[^\n]*?\bop_name="(?P<op>(?:[^"\\]|\\.)*)"')
_OPENERS = {"(": ")", "{": "}", "[": "]"}

_DTYPES = {
    "pred": "bool",
    "s4": "int4",
    "s8": "int8",
    "s16": "int16",
    "s32": "int32",
    "s64": "int64",
    "u4": "uint4",
    "u8": "uint8",
    "u16": "uint16",
    "u32": "uint32",
    "u64": "uint64",
    "f16": "float16",
    "bf16": "bfloat16",
    "f32": "float32",
    "f64": "float64",
    "c64": "complex64",
    "c128": "complex128",
    "f8e4m3fn": "float8_e4m3fn",
    "f8e5m2": "float8_e5m2",
}


class _Array(NamedTuple):
    dtype: str
    dims: tuple[int, ...]


Shape = _Array | list  # a list is an HLO tuple shape (of shapes)


class _Instruction(NamedTuple):
    name: str
    shape: Shape
    opcode: str
    operands: list[str]
    attrs: str
    count: int = 1


def _close(text: str, pos: int) -> int:
    """Index just past the bracket that closes the one at ``text[pos]``."""
    stack = []
    for i in range(pos, len(text)):
        char = text[i]
        if char in _OPENERS:
            stack.append(_OPENERS[char])
        elif stack and char == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced {text[pos]!r} in HLO: {text[pos : pos + 80]!r}")


def _parse_shape(text: str, pos: int = 0) -> tuple[Shape, int]:
    """Parse an HLO shape (``f32[4,8]{1,0}`` or a tuple of shapes) starting at ``pos``."""
    while text[pos] == " ":
        pos += 1
    if text[pos] == "(":
        items: list[Shape] = []
        pos += 1
        while True:
            while text[pos] in " ,":
                pos += 1
            if text[pos] == ")":
                return items, pos + 1
            item, pos = _parse_shape(text, pos)
            items.append(item)
    match = _LEAF.match(text, pos)
    if match is None:
        raise ValueError(f"cannot parse HLO shape at {text[pos : pos + 80]!r}")
    dims = tuple(int(d.replace("<=", "")) for d in match["dims"].split(",") if d.strip())
    pos = match.end()
    if pos < len(text) and text[pos] == "{":
        pos = _close(text, pos)
    return _Array(match["dtype"], dims), pos


def _split_operands(text: str) -> list[str]:
    """Top-level comma-separated items of ``text``; each reduced to its last token (the name)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        if char in _OPENERS:
            depth += 1
        elif char in ")}]":
            depth -= 1
        elif char == "," and depth == 0:
            token = text[start:i].strip()
            if token:
                items.append(token.split()[-1].lstrip("%"))
            start = i + 1
    return items


def parse_instruction(line: str) -> _Instruction | None:
    """The HLO instruction on ``line`` (name, result shape, opcode, operands, attributes), else None."""
    line = _COMMENT.sub("", line)  # long tuples carry /*index=5*/ markers
    head = _INSTRUCTION.match(line)
    if head is None:
        return None
    try:
        shape, pos = _parse_shape(line, head.end())
    except (ValueError, IndexError):
        return None
    opcode = _OPCODE.match(line, pos)
    if opcode is None:
        return None
    open_at = opcode.end() - 1
    end = _close(line, open_at)
    operands = _split_operands(line[open_at + 1 : end - 1])
    return _Instruction(head["name"], shape, opcode["opcode"], operands, line[end:])


def _parse_instruction(line: str) -> _Instruction | None:
    """The instruction on ``line`` if it is a collective (or an async part of one), else None."""
    inst = parse_instruction(line)
    return inst if inst is not None and _kind(inst.opcode)[0] is not None else None


def _attr(attrs: str, key: str) -> str | None:
    """The raw value of ``key=...`` in an instruction's attributes (balanced brackets), if present."""
    match = re.search(rf"(?:^|[\s,]){re.escape(key)}=", attrs)
    if match is None:
        return None
    start = match.end()
    iota = _IOTA.match(attrs, start)
    if iota:
        return iota[0]
    if attrs[start] in _OPENERS:
        return attrs[start : _close(attrs, start)]
    if attrs.startswith("mesh[", start):  # mesh[...][, device_ids=(...)] {axes}
        pos = _close(attrs, start + 4)
        devices = re.match(r",\s*device_ids=", attrs[pos:])
        if devices:
            pos = _close(attrs, pos + devices.end())
        brace = attrs.index("{", pos)
        return attrs[start : _close(attrs, brace)]
    return re.match(r"[^,\s]*", attrs[start:])[0]


# ------------------------------------------------------------------------------------ device groups


def _ints(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"\d+", text)]


def _iota(reshape: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
    """``iota(prod(reshape)).reshape(reshape).transpose(perm)``: XLA's compact device lists."""
    array = np.arange(int(np.prod(reshape))).reshape(tuple(reshape))
    return array.transpose(tuple(perm)) if perm else array


def _device_ids(text: str) -> np.ndarray:
    """Flat logical ids from a mesh's ``device_ids=(...)``: ``[2,4]T(1,0)``, ``[..]<=[..]T(..)``, a list."""
    text = text.strip()
    match = _DEVICE_IOTA.match(text)
    if match and (match["reshape"] or match["perm"]):
        reshape = _ints(match["reshape"] or match["first"])
        return _iota(reshape, _ints(match["perm"]) if match["perm"] else None).ravel()
    if text.startswith("[") and "]" in text:  # [dims]id,id,... : an explicit array with its shape
        text = text[text.index("]") + 1 :]
    return np.asarray(_ints(text))


def _mesh_form_groups(text: str) -> np.ndarray:
    """Groups (rows) of logical ids from ``mesh['a'=4,'b'=2], device_ids=(...) {'b'}``."""
    spec = text[5 : _close(text, 4) - 1]
    names, sizes = [], []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, size = item.rpartition("=")
        names.append(name.strip("'\""))
        sizes.append(int(size))
    devices_at = text.find("device_ids=")
    total = int(np.prod(sizes))
    if devices_at >= 0:
        open_at = text.index("(", devices_at)
        devices = _device_ids(text[open_at + 1 : _close(text, open_at) - 1])
    else:
        devices = np.arange(total)
    refs = [
        (names.index(m["name"]), int(m["pre"]) if m["pre"] else None, int(m["size"]) if m["size"] else None)
        for m in _AXIS_REF.finditer(text[text.rindex("{") + 1 : -1])
    ]
    return _group_over_axes(devices.reshape(sizes), sizes, refs)


def _group_over_axes(
    devices: np.ndarray, sizes: list[int], refs: list[tuple[int, int | None, int | None]]
) -> np.ndarray:
    """Split each mesh dimension into the sub-axes ``refs`` name, move the grouped pieces last, regroup."""
    shape: list[int] = []
    pieces: dict[int, list[tuple[int, int]]] = {}  # dim -> [(pre_size, index in shape)]
    for dim, size in enumerate(sizes):
        bounds = {1, size} | {b for d, pre, sub in refs if d == dim and pre for b in (pre, pre * sub)}
        ordered = sorted(bounds) if size > 1 else [1, 1]
        pieces[dim] = []
        for lo, hi in zip(ordered, ordered[1:], strict=False):
            pieces[dim].append((lo, len(shape)))
            shape.append(hi // lo)
    grouped: list[int] = []
    for dim, pre, sub in refs:
        lo, hi = (1, sizes[dim]) if pre is None else (pre, pre * sub)
        grouped += [index for start, index in pieces[dim] if lo <= start < hi]
    rest = [i for i in range(len(shape)) if i not in grouped]
    group_size = int(np.prod([shape[i] for i in grouped], dtype=int))
    return devices.reshape(shape).transpose(rest + grouped).reshape(-1, group_size)


def replica_groups(text: str | None, num_devices: int) -> np.ndarray:
    """Groups of logical device ids (one row each) from a ``replica_groups=`` value, any syntax."""
    if text is None or re.fullmatch(r"\{\s*\}", text):
        return np.arange(num_devices).reshape(1, -1)
    if text.startswith("mesh["):
        return _mesh_form_groups(text)
    iota = _IOTA.fullmatch(text.strip())
    if iota:
        array = _iota(_ints(iota["reshape"]), _ints(iota["perm"]) if iota["perm"] else None)
        return array.reshape(_ints(iota["dims"]))
    groups = [_ints(group) for group in re.findall(r"\{([\d,\s]*)\}", text)]
    if not groups:
        raise ValueError(f"cannot read replica_groups={text}")
    width = max(len(group) for group in groups)
    if any(len(group) != width for group in groups):
        raise ValueError(f"replica groups of different sizes are not supported: {text}")
    return np.asarray(groups, dtype=int)


def source_target_pairs(text: str) -> np.ndarray:
    """``{{0,1},{1,0}}`` as an array of (source, target) rows."""
    return np.asarray([_ints(pair) for pair in re.findall(r"\{([\d,\s]*)\}", text)], dtype=int).reshape(-1, 2)


# ------------------------------------------------------------------------------- ids to mesh axes


def _coordinates(ids: np.ndarray, mesh: Mesh) -> np.ndarray:
    shape = mesh.devices.shape
    if ids.size and (ids.min() < 0 or ids.max() >= mesh.devices.size):
        raise ValueError(f"device id {int(ids.max())} is outside a mesh of {mesh.devices.size} devices")
    return np.stack(np.unravel_index(ids, shape), axis=-1)


def _axes_of_groups(groups: np.ndarray, mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes along which coordinates vary inside some group, in mesh order."""
    coords = _coordinates(groups, mesh)  # (groups, members, mesh dims)
    varies = (coords != coords[:, :1]).any(axis=(0, 1))
    return tuple(name for name, moved in zip(mesh.axis_names, varies, strict=True) if moved)


def _axes_of_pairs(pairs: np.ndarray, mesh: Mesh) -> tuple[str, ...]:
    coords = _coordinates(pairs, mesh)  # (pairs, 2, mesh dims)
    varies = (coords[:, 0] != coords[:, 1]).any(axis=0)
    return tuple(name for name, moved in zip(mesh.axis_names, varies, strict=True) if moved)


def _largest_component(pairs: np.ndarray) -> int:
    """Size of the largest set of devices the pairs connect (union-find)."""
    parent: dict[int, int] = {}

    def root(node: int) -> int:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for source, target in pairs.tolist():
        parent[root(source)] = root(target)
    sizes: dict[int, int] = {}
    for node in list(parent):
        sizes[root(node)] = sizes.get(root(node), 0) + 1
    return max(sizes.values(), default=1)


# ------------------------------------------------------------------------------------- collectives


def _leaves(shape: Shape) -> list[_Array]:
    return [shape] if isinstance(shape, _Array) else [leaf for item in shape for leaf in _leaves(item)]


def _start_result(kind: str, shape: Shape) -> Shape:
    """Result shape of an async ``-start`` whose ``-done`` is missing (XLA's start tuple layouts)."""
    if isinstance(shape, _Array) or kind == "all-reduce":
        return shape
    return shape[1] if len(shape) > 1 else shape[0]  # ((operands), result, ...) or (operand, result, ...)


def _moved(kind: str, elements: int, group_size: int) -> int:
    if group_size <= 1:
        return 0
    if kind in ("all-gather", "all-to-all"):
        return elements * (group_size - 1) // group_size
    if kind == "reduce-scatter":
        return elements * (group_size - 1)
    return elements


def _itemsize_bits(dtype: str) -> int:
    if dtype == "pred":
        return 8
    match = re.match(r"[a-z]+?(\d+)", dtype)
    return int(match[1]) if match else 8


def _records(inst: _Instruction, kind: str, result: Shape, mesh: Mesh) -> list[Collective]:
    num_devices = mesh.devices.size
    if kind == "collective-permute":
        pairs = source_target_pairs(_attr(inst.attrs, "source_target_pairs") or "{}")
        axes, group_size = _axes_of_pairs(pairs, mesh), _largest_component(pairs)
    else:
        groups = replica_groups(_attr(inst.attrs, "replica_groups"), num_devices)
        axes, group_size = _axes_of_groups(groups, mesh), groups.shape[1]
    arrays = _leaves(result)
    if kind == "all-to-all" and len(arrays) > 1:  # one operand per peer: a single exchange
        first = arrays[0]
        same = all(a.dims == first.dims for a in arrays)
        total = sum(int(np.prod(a.dims, dtype=int)) for a in arrays)
        arrays = [_Array(first.dtype, (len(arrays), *first.dims) if same else (total,))]
    op = _OP_NAME.search(inst.attrs)
    records = []
    for array in arrays:
        elements = _moved(kind, int(np.prod(array.dims, dtype=int)), group_size)
        records.append(
            Collective(
                kind=kind,
                axes=axes,
                shape=array.dims,
                dtype=_DTYPES.get(array.dtype, array.dtype),
                group_size=int(group_size),
                elements=elements,
                bytes=elements * _itemsize_bits(array.dtype) // 8,
                name=inst.name,
                op_name=op["op"] if op else "",
            )
        )
    return records


def _kind(opcode: str) -> tuple[str | None, str]:
    """(collective kind, "" / "start" / "done" / "update") of an opcode; kind None if not a collective."""
    for suffix in ("start", "done", "update"):
        if opcode.endswith("-" + suffix) and opcode[: -len(suffix) - 1] in KINDS:
            return opcode[: -len(suffix) - 1], suffix
    return (opcode, "") if opcode in KINDS else (None, "")


def collectives(hlo_text: str, mesh: Mesh) -> list[Collective]:
    """Every collective in the HLO text of a compiled SPMD program, in text order.

    Args:
      hlo_text: ``compiled.as_text()`` (the optimised, partitioned module).
      mesh: the ``jax.sharding.Mesh`` the program was compiled for; logical device ids are positions in
        ``mesh.devices.flat``.

    Returns:
      One :class:`Collective` per collective (per operand for combined ones); async start/done pairs
      once; ``count`` is how often it runs per execution: the product of the known trip counts of the
      ``while`` loops around it (1 where XLA does not know a trip count).
    """
    multipliers = _execution_counts(hlo_text)
    instructions = []
    for computation, line in _lines_by_computation(hlo_text):
        inst = _parse_instruction(line)
        if inst:
            instructions.append(inst._replace(count=multipliers.get(computation, 1)))
    by_name = {inst.name: inst for inst in instructions}
    done_shape: dict[str, Shape] = {}
    for inst in instructions:
        kind, phase = _kind(inst.opcode)
        source = inst
        while kind and phase == "done" and source.operands and source.operands[0] in by_name:
            source = by_name[source.operands[0]]
            if _kind(source.opcode)[1] == "start":
                done_shape[source.name] = inst.shape
                break
    records: list[Collective] = []
    for inst in instructions:
        kind, phase = _kind(inst.opcode)
        if kind is None or phase in ("done", "update"):
            continue
        result = inst.shape
        if phase == "start":
            result = done_shape.get(inst.name) or _start_result(kind, inst.shape)
        records += [r._replace(count=inst.count) for r in _records(inst, kind, result, mesh)]
    return records


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(
    r"\b(?P<key>body|condition|calls|to_apply|branch_computations|async_execution_thread)=(?P<value>\{[^}]*\}|%?[\w.\-]+)"
)
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')


def _lines_by_computation(hlo_text: str):
    """``(computation name, line)`` for every line; ``ENTRY`` (and loose instruction lines) is ``"ENTRY"``."""
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and not line.startswith(" "):
                current = "ENTRY" if line.startswith("ENTRY") else match["name"]
            else:
                yield "ENTRY", line
            continue
        if line.startswith("}"):
            current = None
            continue
        yield current, line


def _execution_counts(hlo_text: str) -> dict[str, int]:
    """How many times each computation runs per execution of ``ENTRY``: while bodies run their trip count."""
    calls: dict[str, list[tuple[str, int]]] = {}
    for computation, line in _lines_by_computation(hlo_text):
        trip = _TRIP_COUNT.search(line)
        for callee in _CALLEE.finditer(_COMMENT.sub("", line)):
            times = int(trip["n"]) if trip and callee["key"] == "body" else 1
            for name in re.findall(r"%?([\w.\-]+)", callee["value"]):
                calls.setdefault(computation, []).append((name, times))
    counts: dict[str, int] = {}

    def visit(name: str, times: int, depth: int = 0) -> None:
        counts[name] = counts.get(name, 0) + times
        for callee, factor in calls.get(name, ()) if depth < 64 else ():
            visit(callee, times * factor, depth + 1)

    visit("ENTRY", 1)
    return counts


def summarize(colls: Iterable[Collective], *, per_run: bool = False) -> dict[tuple[str, tuple[str, ...]], int]:
    """Total elements moved per (kind, axes): per appearance, or per run of the program (``per_run``)."""
    totals: dict[tuple[str, tuple[str, ...]], int] = {}
    for coll in colls:
        key = (coll.kind, coll.axes)
        totals[key] = totals.get(key, 0) + (coll.total_elements if per_run else coll.elements)
    return totals


def wire_bytes(coll: Collective) -> int:
    """Bytes one device sends per execution in a ring (module docstring); all-reduce is 2 (g-1)/g x array."""
    if coll.kind == "all-reduce" and coll.group_size > 1:
        return 2 * coll.bytes * (coll.group_size - 1) // coll.group_size
    return coll.bytes


class AxisTotal(NamedTuple):
    """Traffic over one set of mesh axes per run of the program (loop trip counts applied)."""

    axes: tuple[str, ...]
    collectives: int  # executions
    elements: int
    bytes: int
    wire_bytes: int


def per_axis(colls: Iterable[Collective]) -> list[AxisTotal]:
    """Totals per set of mesh axes, largest traffic first; collectives that move nothing are left out."""
    totals: dict[tuple[str, ...], list[int]] = {}
    for coll in colls:
        if coll.elements == 0:
            continue
        row = totals.setdefault(coll.axes, [0, 0, 0, 0])
        for i, value in enumerate((1, coll.elements, coll.bytes, wire_bytes(coll))):
            row[i] += value * coll.count
    rows = [AxisTotal(axes, *values) for axes, values in totals.items()]
    return sorted(rows, key=lambda row: -row.bytes)


def origin(op_name: str) -> str:
    """Where a collective came from, from its HLO ``op_name``: ``"backward: shard_map/while/dot_general"``.

    JAX names the backward pass ``transpose(jvp(...))``; the path keeps the last few scopes (loops,
    ``shard_map``, the primitive) without the ``jit(...)`` prefix and autodiff wrappers.
    """
    if not op_name:
        return ""
    phase = "backward" if "transpose(" in op_name else "forward"
    wrappers = re.compile(r"^(?:jit\(.*|transpose\(.*|jvp(?:\(.*)?|closed_call|body|)$")
    scopes: list[str] = []
    for token in re.split(r"[/:]", op_name):  # fused ops read "(a/b:c/d)": scopes and ops, ":"-joined
        token = token.strip("()")
        if not wrappers.match(token) and token not in scopes:
            scopes.append(token)
    return f"{phase}: {'/'.join(scopes[-3:])}"


# ------------------------------------------------------------------------------------ compilation


def compile_sharded(
    fn: Callable, *args: Any, in_shardings: Any = None, out_shardings: Any = None
) -> jax.stages.Compiled:
    """``jax.jit(fn, ...).lower(*args).compile()``; ``None`` shardings are left to XLA (not replicated)."""
    kwargs = {}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    return jax.jit(fn, **kwargs).lower(*args).compile()


def compiled_text(fn: Callable, *args: Any, in_shardings: Any = None, out_shardings: Any = None) -> str:
    """The optimised HLO text of ``fn`` compiled with the given shardings (args may be ShapeDtypeStructs)."""
    return compile_sharded(fn, *args, in_shardings=in_shardings, out_shardings=out_shardings).as_text()


def memory_and_flops(compiled: jax.stages.Compiled) -> MemoryAndFlops:
    """Per-device argument / output / temp bytes and flops XLA reports; fields are None when missing."""
    try:
        memory = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        memory = None
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError):
        cost = None
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = cost.get("flops") if cost else None
    accessed = cost.get("bytes accessed") if cost else None

    def field(name: str) -> int | None:
        value = getattr(memory, name, None)
        return None if value is None else int(value)

    return MemoryAndFlops(
        argument_bytes=field("argument_size_in_bytes"),
        output_bytes=field("output_size_in_bytes"),
        temp_bytes=field("temp_size_in_bytes"),
        flops=None if flops is None else float(flops),
        alias_bytes=field("alias_size_in_bytes"),
        bytes_accessed=None if accessed is None else float(accessed),
    )


# ------------------------------------------------------------------------ Dettmers' textbook layer

_TEXTBOOK_AXIS = {"dp": "data", "column": "tensor", "row": "tensor"}


def _textbook_specs(strategy: str) -> tuple[P, P, P, P]:
    """(activation, weight, x where the matmul uses it, y where the matmul makes it) from the rules table.

    The batch axis of the activations and the weight's ``(dense_in, dense_out)`` axes come from
    :func:`jaxmp.sharding.rules_for`, so the layer is split exactly as the ``dense`` model is.
    """
    rules = rules_for(strategy)
    batch = rules.get("batch")
    weight = logical_to_spec(("dense_in", "dense_out"), rules)
    w_in, w_out = (tuple(weight) + (None, None))[:2]
    return P(batch, None), weight, P(batch, w_in), P(batch, w_out)


def textbook_layer_exchange(
    strategy: str, batch: int = 128, fan_in: int = 1000, fan_out: int = 500, mesh: Mesh | None = None
) -> list[Collective]:
    """Collectives XLA emits for forward + backward of one bias-free dense layer ``y = x @ W``.

    Dettmers' example (ANCHORS.md): batch 128, W 1000x500, two devices. The step returns ``y`` and, for
    an output cotangent ``dy``, ``dx = dy @ W.T`` and ``dW = x.T @ dy`` (via ``jax.vjp``): the layer as
    it runs inside a network, where the input gradient is needed. Strategies (the ``dense`` model's
    rules table, :mod:`jaxmp.sharding`), with ``g`` devices on the split axis:
      - "dp": x, dy, y, dx split by batch; W, dW replicated -> all-reduce dW: ``fan_in*fan_out``
        (500,000);
      - "column": W, dW split by output over ``tensor``; activations whole -> all-gather y
        ``batch*fan_out*(g-1)/g`` (32,000 received) + all-reduce of the partial dx ``batch*fan_in``
        (128,000) = 160,000;
      - "row": W, dW split by input -> all-reduce of the partial y ``batch*fan_out`` (64,000) +
        all-gather dx ``batch*fan_in*(g-1)/g`` (64,000) = 128,000.
    Sharding constraints pin where the matmul works (x used column-split for "row", y produced
    column-split for "column"); their transposes pin the backward the same way (dx made column-split
    for "row", dy sliced for "column"). The CPU compiler emits exactly the textbook pattern with or
    without them.

    Args:
      strategy: "dp", "column" or "row".
      mesh: default: a 2-device mesh, ``data=2`` for "dp" and ``tensor=2`` otherwise; any mesh works
        (e.g. ``tensor=2`` for all three: "dp" then splits the batch over ``tensor`` as the trainer does).
    """
    if strategy not in _TEXTBOOK_AXIS:
        raise ValueError(f"strategy {strategy!r} is not one of {', '.join(_TEXTBOOK_AXIS)}")
    act, weight, x_use, y_made = _textbook_specs(strategy)
    mesh = build_mesh(MeshShape(**{_TEXTBOOK_AXIS[strategy]: 2})) if mesh is None else mesh

    def named(spec: P) -> NamedSharding:
        return NamedSharding(mesh, spec)

    def layer(x: jax.Array, w: jax.Array) -> jax.Array:
        x = jax.lax.with_sharding_constraint(x, named(x_use))
        return jax.lax.with_sharding_constraint(x @ w, named(y_made))

    def step(x: jax.Array, w: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        y, vjp = jax.vjp(layer, x, w)
        dx, dw = vjp(dy)
        return y, dx, dw

    f32 = np.float32
    args = (
        jax.ShapeDtypeStruct((batch, fan_in), f32),
        jax.ShapeDtypeStruct((fan_in, fan_out), f32),
        jax.ShapeDtypeStruct((batch, fan_out), f32),
    )
    text = compiled_text(
        step,
        *args,
        in_shardings=(named(act), named(weight), named(act)),
        out_shardings=(named(act), named(act), named(weight)),
    )
    return collectives(text, mesh)
