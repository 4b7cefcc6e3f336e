"""The one reader of compiled HLO text: instructions, shapes, computations and loop trip counts.

Why text: the optimised HLO of a compiled executable (``compiled.as_text()``) is the only record of what
XLA decided (collectives, fusions, loops) that every JAX version prints. Every inspection tool reads it
through this module: :mod:`jaxmp.inspection.collectives` (communication), :mod:`jaxmp.inspection.flops`
(FLOPs and memory traffic). ``execution_counts`` applies the ``known_trip_count`` XLA records for each
``while`` loop, so work inside scanned layers and pipeline ticks is counted as often as it runs.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*")


_OPCODE = re.compile(r"\s*(?P<opcode>[a-z][\w\-]*)\(")


_LEAF = re.compile(r"\s*(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]")


IOTA = re.compile(r"\[(?P<dims>[\d,\s]+)\]<=\[(?P<reshape>[\d,\s]+)\](?:T\((?P<perm>[\d,\s]+)\))?")


COMMENT = re.compile(r"/\*.*?\*/")


OPENERS = {"(": ")", "{": "}", "[": "]"}


DTYPE_NAMES = {
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


class Array(NamedTuple):
    dtype: str
    dims: tuple[int, ...]


Shape = Array | list  # a list is an HLO tuple shape (of shapes)


class Instruction(NamedTuple):
    name: str
    shape: Shape
    opcode: str
    operands: list[str]
    attrs: str
    count: int = 1


def close_bracket(text: str, pos: int) -> int:
    """Index just past the bracket that closes the one at ``text[pos]``."""
    stack = []
    for i in range(pos, len(text)):
        char = text[i]
        if char in OPENERS:
            stack.append(OPENERS[char])
        elif stack and char == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced {text[pos]!r} in HLO: {text[pos : pos + 80]!r}")


def parse_shape(text: str, pos: int = 0) -> tuple[Shape, int]:
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
            item, pos = parse_shape(text, pos)
            items.append(item)
    match = _LEAF.match(text, pos)
    if match is None:
        raise ValueError(f"cannot parse HLO shape at {text[pos : pos + 80]!r}")
    dims = tuple(int(d.replace("<=", "")) for d in match["dims"].split(",") if d.strip())
    pos = match.end()
    if pos < len(text) and text[pos] == "{":
        pos = close_bracket(text, pos)
    return Array(match["dtype"], dims), pos


def _split_operands(text: str) -> list[str]:
    """Top-level comma-separated items of ``text``; each reduced to its last token (the name)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        if char in OPENERS:
            depth += 1
        elif char in ")}]":
            depth -= 1
        elif char == "," and depth == 0:
            token = text[start:i].strip()
            if token:
                items.append(token.split()[-1].lstrip("%"))
            start = i + 1
    return items


def parse_instruction(line: str) -> Instruction | None:
    """The HLO instruction on ``line`` (name, result shape, opcode, operands, attributes), else None."""
    line = COMMENT.sub("", line)  # long tuples carry /*index=5*/ markers
    head = _INSTRUCTION.match(line)
    if head is None:
        return None
    try:
        shape, pos = parse_shape(line, head.end())
    except (ValueError, IndexError):
        return None
    opcode = _OPCODE.match(line, pos)
    if opcode is None:
        return None
    open_at = opcode.end() - 1
    end = close_bracket(line, open_at)
    operands = _split_operands(line[open_at + 1 : end - 1])
    return Instruction(head["name"], shape, opcode["opcode"], operands, line[end:])


def attribute(attrs: str, key: str) -> str | None:
    """The raw value of ``key=...`` in an instruction's attributes (balanced brackets), if present."""
    match = re.search(rf"(?:^|[\s,]){re.escape(key)}=", attrs)
    if match is None:
        return None
    start = match.end()
    iota = IOTA.match(attrs, start)
    if iota:
        return iota[0]
    if attrs[start] in OPENERS:
        return attrs[start : close_bracket(attrs, start)]
    if attrs.startswith("mesh[", start):  # mesh[...][, device_ids=(...)] {axes}
        pos = close_bracket(attrs, start + 4)
        devices = re.match(r",\s*device_ids=", attrs[pos:])
        if devices:
            pos = close_bracket(attrs, pos + devices.end())
        brace = attrs.index("{", pos)
        return attrs[start : close_bracket(attrs, brace)]
    return re.match(r"[^,\s]*", attrs[start:])[0]


def array_leaves(shape: Shape) -> list[Array]:
    return [shape] if isinstance(shape, Array) else [leaf for item in shape for leaf in array_leaves(item)]


def itemsize_bits(dtype: str) -> int:
    if dtype == "pred":
        return 8
    match = re.match(r"[a-z]+?(\d+)", dtype)
    return int(match[1]) if match else 8


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")


CALLEE = re.compile(
    r"\b(?P<key>body|condition|calls|to_apply|branch_computations|async_execution_thread)=(?P<value>\{[^}]*\}|%?[\w.\-]+)"
)


TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')


def lines_by_computation(hlo_text: str):
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


def execution_counts(hlo_text: str) -> dict[str, int]:
    """How many times each computation runs per execution of ``ENTRY``: while bodies run their trip count."""
    calls: dict[str, list[tuple[str, int]]] = {}
    for computation, line in lines_by_computation(hlo_text):
        trip = TRIP_COUNT.search(line)
        for callee in CALLEE.finditer(COMMENT.sub("", line)):
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


def in_data_dependent_loops(hlo_text: str) -> set[str]:
    """The instructions (by name) that run inside a ``while`` loop whose trip count XLA does not know,
    and in anything such a loop calls: in a pipelined program, the stage actions, which only the
    devices of the stage taking the action enter (:mod:`jaxmp.pipeline.stage_collectives`)."""
    calls: dict[str, list[tuple[str, bool]]] = {}
    members: dict[str, list[str]] = {}
    for computation, line in lines_by_computation(hlo_text):
        head = _INSTRUCTION.match(line)
        if head is not None:
            members.setdefault(computation, []).append(head["name"])
        unknown = " while(" in line and TRIP_COUNT.search(line) is None
        for callee in CALLEE.finditer(COMMENT.sub("", line)):
            loop = unknown and callee["key"] in ("body", "condition")
            for name in re.findall(r"%?([\w.\-]+)", callee["value"]):
                calls.setdefault(computation, []).append((name, loop))
    inside: set[str] = set()

    def visit(name: str, looped: bool, seen: set) -> None:
        if (name, looped) in seen:
            return
        seen.add((name, looped))
        if looped:
            inside.update(members.get(name, ()))
        for callee, loop in calls.get(name, ()):
            visit(callee, looped or loop, seen)

    visit("ENTRY", False, set())
    return inside


_TABLE_ROW = re.compile(r"^(?P<id>\d+) (?P<value>.*)$")


_STACK_FRAME_ID = re.compile(r"\bstack_frame_id=(?P<id>\d+)")


def _tables(hlo_text: str) -> dict[str, dict[int, str]]:
    """The module's source tables (``FileNames``, ``FileLocations``, ``StackFrames``, ...): id -> row."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None and (row := _TABLE_ROW.match(line)):
            current[int(row["id"])] = row["value"]
        elif line.strip():
            current = None
    return tables


def _field(row: str, key: str) -> int:
    match = re.search(rf"\b{key}=(\d+)", row)
    return int(match[1]) if match else 0


def source_of(hlo_text: str):
    """``attrs -> "file:line"``: the innermost line of the program's Python source that an
    instruction came from (its ``stack_frame_id``), skipping JAX's, Flax's and other installed packages'
    frames; ``""`` when the module records none."""
    tables = _tables(hlo_text)
    files, locations, frames = (tables.get(k, {}) for k in ("FileNames", "FileLocations", "StackFrames"))

    def source(attrs: str) -> str:
        match = _STACK_FRAME_ID.search(attrs)
        frame, seen = int(match["id"]) if match else 0, set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            location = locations.get(_field(frames[frame], "file_location_id"), "")
            path = files.get(_field(location, "file_name_id"), "").strip('"')
            if path and "site-packages" not in path and "/jaxmp/pipeline/" not in path:
                return f"{path}:{_field(location, 'line')}"
            frame = _field(frames[frame], "parent_frame_id")
        return ""

    return source
