"""Read the communication XLA inserted off a compiled program.

Why: with ``AxisType.Auto`` meshes XLA, not jaxmp, decides where collectives go. The only trustworthy
record of what a sharded step exchanges is the optimised HLO of the compiled executable
(``jax.jit(f, in_shardings=..., out_shardings=...).lower(*args).compile().as_text()``). This module
parses that text into :class:`Collective` records (kind, mesh axes, shape, elements moved) so tests can
assert exactly which communication a strategy costs, e.g. the Dettmers data-vs-model-parallelism numbers
(:func:`jaxmp.inspection.textbook.textbook_layer_exchange`).

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
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
from jax.sharding import Mesh

from jaxmp.inspection.hlo import (
    DTYPE_NAMES,
    IOTA,
    Array,
    Instruction,
    Shape,
    array_leaves,
    attribute,
    close_bracket,
    execution_counts,
    itemsize_bits,
    lines_by_computation,
    parse_instruction,
    source_of,
)

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
    source: str = ""  # "file:line" of the Python line it came from (jaxmp.inspection.hlo.source_of)

    @property
    def total_elements(self) -> int:
        """Elements moved per run of the program (``elements * count``)."""
        return self.elements * self.count


_DEVICE_IOTA = re.compile(r"\[(?P<first>[\d,\s]+)\](?:<=\[(?P<reshape>[\d,\s]+)\])?(?:T\((?P<perm>[\d,\s]+)\))?$")


_AXIS_REF = re.compile(r"'?(?P<name>[^':,\s]+)'?(?::\((?P<pre>\d+)\)(?P<size>\d+))?")


_OP_NAME = re.compile(r'metadata=\{[^\n]*?\bop_name="(?P<op>(?:[^"\\]|\\.)*)"')


def _parse_instruction(line: str) -> Instruction | None:
    """The instruction on ``line`` if it is a collective (or an async part of one), else None."""
    inst = parse_instruction(line)
    return inst if inst is not None and _kind(inst.opcode)[0] is not None else None


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
    spec = text[5 : close_bracket(text, 4) - 1]
    names, sizes = [], []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, size = item.rpartition("=")
        names.append(name.strip("'\""))
        sizes.append(int(size))
    devices_at = text.find("device_ids=")
    total = int(np.prod(sizes))
    if devices_at >= 0:
        open_at = text.index("(", devices_at)
        devices = _device_ids(text[open_at + 1 : close_bracket(text, open_at) - 1])
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
    iota = IOTA.fullmatch(text.strip())
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


def _start_result(kind: str, shape: Shape) -> Shape:
    """Result shape of an async ``-start`` whose ``-done`` is missing (XLA's start tuple layouts)."""
    if isinstance(shape, Array) or kind == "all-reduce":
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


def _records(inst: Instruction, kind: str, result: Shape, mesh: Mesh) -> list[Collective]:
    num_devices = mesh.devices.size
    if kind == "collective-permute":
        pairs = source_target_pairs(attribute(inst.attrs, "source_target_pairs") or "{}")
        axes, group_size = _axes_of_pairs(pairs, mesh), _largest_component(pairs)
    else:
        groups = replica_groups(attribute(inst.attrs, "replica_groups"), num_devices)
        axes, group_size = _axes_of_groups(groups, mesh), groups.shape[1]
    arrays = array_leaves(result)
    if kind == "all-to-all" and len(arrays) > 1:  # one operand per peer: a single exchange
        first = arrays[0]
        same = all(a.dims == first.dims for a in arrays)
        total = sum(int(np.prod(a.dims, dtype=int)) for a in arrays)
        arrays = [Array(first.dtype, (len(arrays), *first.dims) if same else (total,))]
    op = _OP_NAME.search(inst.attrs)
    records = []
    for array in arrays:
        elements = _moved(kind, int(np.prod(array.dims, dtype=int)), group_size)
        records.append(
            Collective(
                kind=kind,
                axes=axes,
                shape=array.dims,
                dtype=DTYPE_NAMES.get(array.dtype, array.dtype),
                group_size=int(group_size),
                elements=elements,
                bytes=elements * itemsize_bits(array.dtype) // 8,
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
    multipliers = execution_counts(hlo_text)
    line_of = source_of(hlo_text)
    instructions = []
    for computation, line in lines_by_computation(hlo_text):
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
        where = line_of(inst.attrs)
        records += [r._replace(count=inst.count, source=where) for r in _records(inst, kind, result, mesh)]
    return records


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
