"""Tests for jaxmp.inspection.collectives: the communication we report must be the communication XLA compiled.

Why each group exists: the textbook tests pin Dettmers' data-vs-model-parallelism numbers to what XLA
actually emits; the axis tests check that device ids in compiled HLO map onto the right mesh axes (the
mapping everything else relies on); the parser tests cover HLO syntaxes the CPU compiler does not
produce today (explicit and iota groups, async pairs, combined collectives), written by hand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmp.inspection.collectives import Collective, collectives, replica_groups, summarize
from jaxmp.inspection.compiled import MemoryAndFlops, compile_sharded, compiled_text, memory_and_flops
from jaxmp.inspection.textbook import textbook_layer_exchange
from jaxmp.parallel.mesh import MeshShape, build_mesh


@pytest.fixture(scope="module")
def mesh24():
    return build_mesh(MeshShape(data=2, tensor=4))


def brief(colls: list[Collective]) -> list[tuple[str, tuple[str, ...], int, int]]:
    """(kind, axes, group size, elements), sorted: what the tests compare."""
    return sorted((c.kind, c.axes, c.group_size, c.elements) for c in colls)


# --------------------------------------------------------------------------- Dettmers' textbook layer

TEXTBOOK = {
    "dp": (500_000, [("all-reduce", ("data",), 2, 500_000)]),
    "column": (160_000, [("all-gather", ("tensor",), 2, 32_000), ("all-reduce", ("tensor",), 2, 128_000)]),
    "row": (128_000, [("all-gather", ("tensor",), 2, 64_000), ("all-reduce", ("tensor",), 2, 64_000)]),
}


@pytest.mark.parametrize("strategy", TEXTBOOK)
def test_textbook_totals_and_breakdown(strategy: str):
    total, breakdown = TEXTBOOK[strategy]
    colls = textbook_layer_exchange(strategy)
    assert sum(c.elements for c in colls) == total
    assert brief(colls) == breakdown
    assert all(c.dtype == "float32" and c.bytes == 4 * c.elements for c in colls)


def test_textbook_shapes_and_origin():
    """Column: y gathered (128x500) forward, dx summed backward; row: the reverse (see ANCHORS.md)."""
    column = {c.kind: c for c in textbook_layer_exchange("column")}
    assert column["all-gather"].shape == (128, 500)
    assert column["all-reduce"].shape == (128, 1000)
    assert "transpose" in column["all-reduce"].op_name  # backward pass
    row = {c.kind: c for c in textbook_layer_exchange("row")}
    assert row["all-reduce"].shape == (128, 500)
    assert row["all-gather"].shape == (128, 1000)
    assert "transpose" not in row["all-reduce"].op_name  # forward pass


def test_textbook_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="not one of"):
        textbook_layer_exchange("pipe")


# ---------------------------------------------------------------------- device ids -> mesh axes

AXIS_CASES = {
    # name: (function, input spec, output spec, expected (kind, axes, group size, elements))
    "tensor": (lambda x: x.sum(1), P("data", "tensor"), P("data"), ("all-reduce", ("tensor",), 4, 4)),
    "data": (lambda x: x.sum(0), P("data", "tensor"), P("tensor"), ("all-reduce", ("data",), 2, 4)),
    "both": (lambda x: x.sum(1), P(None, ("data", "tensor")), P(), ("all-reduce", ("data", "tensor"), 8, 8)),
    "data, tensor-major layout": (
        lambda x: x.sum(1),
        P("tensor", "data"),
        P("tensor"),
        ("all-reduce", ("data",), 2, 2),
    ),
    "gather data": (
        lambda x: x * 2,
        P("data", "tensor"),
        P(None, "tensor"),
        ("all-gather", ("data",), 2, 16),
    ),
}


def _compiled_collectives(mesh, case: str) -> list[Collective]:
    fn, in_spec, out_spec, _ = AXIS_CASES[case]
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    text = compiled_text(fn, x, in_shardings=NamedSharding(mesh, in_spec), out_shardings=NamedSharding(mesh, out_spec))
    return collectives(text, mesh)


@pytest.mark.parametrize("case", AXIS_CASES)
def test_axes_of_compiled_collectives(mesh24, case: str):
    assert brief(_compiled_collectives(mesh24, case)) == [AXIS_CASES[case][3]]


def test_ids_are_mesh_positions_not_device_ids():
    """A mesh over a permuted device list compiles to the same groups and the same axes."""
    devices = jax.devices()
    mesh = build_mesh(MeshShape(data=2, tensor=4), devices=[devices[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)])
    for case in ("tensor", "data"):
        assert brief(_compiled_collectives(mesh, case)) == [AXIS_CASES[case][3]]


@pytest.mark.parametrize(("outer", "inner"), [(3, 1), (3, 5)])
def test_loop_body_collectives_count_their_trip_counts(mesh24, outer, inner):
    def body(_, x):
        return jax.lax.psum(x, "tensor") * 0.5

    def nested(_, x):
        return jax.lax.fori_loop(0, inner, body, x) if inner > 1 else body(_, x)

    step = jax.shard_map(lambda x: jax.lax.fori_loop(0, outer, nested, x), mesh=mesh24, in_specs=P(), out_specs=P())
    text = compiled_text(step, jax.ShapeDtypeStruct((8, 16), jnp.float32))
    colls = collectives(text, mesh24)
    assert brief(colls) == [("all-reduce", ("tensor",), 4, 128)]
    assert colls[0].count == outer * inner and colls[0].total_elements == 128 * outer * inner


# ------------------------------------------------------------------------ parser, hand-written HLO


def _one(mesh, line: str) -> Collective:
    (coll,) = collectives(line, mesh)
    return coll


ADD = "to_apply=%add"
GROUPS = {
    "{{0,1,2,3},{4,5,6,7}}": (("tensor",), 4),
    "{{0,4},{1,5},{2,6},{3,7}}": (("data",), 2),
    "{}": (("data", "tensor"), 8),
    "[2,4]<=[8]": (("tensor",), 4),
    "[4,2]<=[2,4]T(1,0)": (("data",), 2),
    "[1,8]<=[8]": (("data", "tensor"), 8),
    "mesh['axis_0'=2,'axis_1'=4] {'axis_0'}": (("data",), 2),
    "mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_1'}": (("data",), 2),
    "mesh['axis_0'=1,'axis_1'=2,'axis_2'=2,'axis_3'=2], device_ids=([2,4]T(1,0)) {'axis_1'}": (
        ("tensor",),
        2,
    ),
    "mesh['a'=2,'b'=4] {'b':(1)2}": (("tensor",), 2),
    "mesh['a'=2,'b'=4] {'a','b':(2)2}": (("data", "tensor"), 4),
}


@pytest.mark.parametrize("groups", GROUPS)
def test_replica_group_syntaxes(mesh24, groups: str):
    line = f"  %ar.1 = f32[6]{{0}} all-reduce(%p), channel_id=1, replica_groups={groups}, {ADD}"
    coll = _one(mesh24, line)
    assert (coll.axes, coll.group_size) == GROUPS[groups]
    assert (coll.kind, coll.shape, coll.elements, coll.name) == ("all-reduce", (6,), 6, "ar.1")


def test_group_arrays():
    assert replica_groups("[4,2]<=[2,4]T(1,0)", 8).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("{{0,2},{1,3}}", 4).tolist() == [[0, 2], [1, 3]]
    subaxis = replica_groups("mesh['a'=2,'b'=4] {'b':(1)2}", 8)
    assert subaxis.tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    major = replica_groups("mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'}", 8)
    assert major.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize(
    ("pairs", "axes", "group_size"),
    [
        ("{{0,4},{4,0},{1,5},{5,1},{2,6},{6,2},{3,7},{7,3}}", ("data",), 2),
        ("{{0,1},{1,2},{2,3},{3,0},{4,5},{5,6},{6,7},{7,4}}", ("tensor",), 4),
        ("{{0,0},{1,1}}", (), 1),
    ],
)
def test_collective_permute_pairs(mesh24, pairs: str, axes: tuple[str, ...], group_size: int):
    coll = _one(mesh24, f"  %cp = bf16[4,8]{{1,0}} collective-permute(%p), source_target_pairs={pairs}")
    assert (coll.kind, coll.axes, coll.group_size, coll.dtype) == (
        "collective-permute",
        axes,
        group_size,
        "bfloat16",
    )
    assert coll.elements == (32 if group_size > 1 else 0)
    assert coll.bytes == 2 * coll.elements


ASYNC = """
ENTRY %main (p: f32[128,64]) -> f32[128,64] {
  %ars = f32[128,64]{1,0} all-reduce-start(%p), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %ard = f32[128,64]{1,0} all-reduce-done(%ars)
  %ags = (f32[4,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%q), replica_groups=[4,2]<=[2,4]T(1,0)
  %agd = f32[8,16]{1,0} all-gather-done(%ags)
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%r), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8]{0} collective-permute-done(%cps)
  %rss = ((f32[16]{0}), f32[8]{0}) reduce-scatter-start(%s), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}
  %rsu = ((f32[16]{0}), f32[8]{0}) reduce-scatter-update(%rss)
  ROOT %rsd = f32[8]{0} reduce-scatter-done(%rsu)
}
"""


def test_async_pairs_counted_once(mesh24):
    colls = collectives(ASYNC, mesh24)
    assert [(c.name, c.kind, c.axes, c.shape, c.elements) for c in colls] == [
        ("ars", "all-reduce", ("tensor",), (128, 64), 8192),
        ("ags", "all-gather", ("data",), (8, 16), 64),
        ("cps", "collective-permute", ("tensor",), (8,), 8),
        ("rss", "reduce-scatter", ("data",), (8,), 8),
    ]


def test_async_start_without_done_uses_start_layout(mesh24):
    lines = ASYNC.replace("%agd =", "%agx =").replace("all-gather-done(%ags)", "copy(%ags)")
    (gather,) = (c for c in collectives(lines, mesh24) if c.kind == "all-gather")
    assert (gather.shape, gather.elements) == ((8, 16), 64)


def test_combined_and_tuple_all_to_all(mesh24):
    combined = "%ar = (f32[10]{0}, bf16[4,4]{1,0}) all-reduce(%a, %b), replica_groups={{0,1,2,3,4,5,6,7}}, " + ADD
    colls = collectives(combined, mesh24)
    assert [(c.shape, c.dtype, c.elements, c.bytes) for c in colls] == [
        ((10,), "float32", 10, 40),
        ((4, 4), "bfloat16", 16, 32),
    ]
    chunk = "f32[2,4]{1,0}"
    a2a = f"%a2a = ({chunk}, {chunk}, {chunk}, {chunk}) all-to-all(%a, %b, %c, %d), replica_groups=[2,4]<=[8]"
    coll = _one(mesh24, a2a)
    assert (coll.kind, coll.axes, coll.shape, coll.elements) == ("all-to-all", ("tensor",), (4, 2, 4), 24)


def test_while_body_and_metadata(mesh24):
    meta = 'metadata={op_name="jit(f)/while/body/psum" source_file="f.py"}'
    text = f"""
%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {{
  %x = f32[4]{{0}} get-tuple-element(%p), index=1
  %ar.2 = f32[4]{{0}} all-reduce(%x), replica_groups=[2,4]<=[8], to_apply=%add, {meta}
}}
ENTRY %main (a: f32[4]) -> f32[4] {{
  %w = (s32[], f32[4]{{0}}) while(%t), condition=%cond, body=%body
  ROOT %ag = f32[8]{{0}} all-gather(%a), replica_groups=[4,2]<=[2,4]T(1,0), dimensions={{0}}
}}
"""
    colls = collectives(text, mesh24)
    assert [(c.name, c.axes, c.op_name) for c in colls] == [
        ("ar.2", ("tensor",), "jit(f)/while/body/psum"),
        ("ag", ("data",), ""),
    ]


def test_ids_outside_the_mesh_raise(mesh24):
    with pytest.raises(ValueError, match="outside a mesh"):
        collectives("%ar = f32[2]{0} all-reduce(%p), replica_groups={{0,9}}, " + ADD, mesh24)


def test_summarize():
    def make(kind: str, axes: tuple[str, ...], elements: int) -> Collective:
        return Collective(kind, axes, (elements,), "float32", 2, elements, 4 * elements, "c", "")

    colls = [
        make("all-reduce", ("data",), 5),
        make("all-reduce", ("data",), 7),
        make("all-gather", ("data",), 3),
    ]
    assert summarize(colls) == {("all-reduce", ("data",)): 12, ("all-gather", ("data",)): 3}


# --------------------------------------------------------------------------------- memory and flops


def test_memory_and_flops_of_a_matmul():
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    report = memory_and_flops(compile_sharded(lambda x: x @ x.T, x))
    assert report.argument_bytes == 64 * 128 * 4
    assert report.output_bytes == 64 * 64 * 4
    assert report.temp_bytes is not None
    assert report.flops == pytest.approx(2 * 64 * 64 * 128, rel=0.01)


class _FakeCompiled:
    def __init__(self, memory, cost):
        self.memory, self.cost = memory, cost

    def memory_analysis(self):
        if isinstance(self.memory, Exception):
            raise self.memory
        return self.memory

    def cost_analysis(self):
        return self.cost


def test_memory_and_flops_guards():
    assert memory_and_flops(_FakeCompiled(None, None)) == MemoryAndFlops(None, None, None, None)
    assert memory_and_flops(_FakeCompiled(NotImplementedError(), [{"flops": 3.0}])).flops == 3.0
    assert memory_and_flops(_FakeCompiled(None, [])).flops is None
    assert np.isclose(memory_and_flops(_FakeCompiled(None, {"flops": 2})).flops, 2.0)
