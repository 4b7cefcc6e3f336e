"""``jaxmp.analyze``: the closed form must equal what XLA compiled, and the CLI must say so.

Why each group exists: the textbook tests pin Dettmers' numbers as ``python -m jaxmp.analyze`` reports
them; the prediction tests compare each strategy's closed form (:mod:`jaxmp.inspection.closed_forms`) with the compiled
train step, element for element, so a wrong formula or a regression in the sharding shows up as a
difference; the cost tests check the loop-aware FLOP count that the planner relies on, against
arithmetic; the notes tests feed hand-made collectives to the rules that explain differences.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest
from support import CLASSES, IMAGE, assert_one_line_error, run_module, small_config

from jaxmp.analyze import main
from jaxmp.inspection.closed_forms import predict
from jaxmp.inspection.collectives import Collective
from jaxmp.inspection.compiled import compile_sharded
from jaxmp.inspection.flops import hlo_cost
from jaxmp.inspection.step_report import Row, _row_note, _weight_moves, analyze_program, compare, layer_table
from jaxmp.parallel.mesh import MeshShape, build_mesh
from jaxmp.pipeline import one_f_one_b
from jaxmp.training.step import build_program

WIDTH, HIDDEN = 32, 64  # small_config's


def report_for(shape: MeshShape, model: str = "mlp", strategy: str = "tp", **overrides):
    cfg = small_config(model, strategy, **overrides)
    program = build_program(cfg, build_mesh(shape), IMAGE, CLASSES)
    return cfg, program, analyze_program(cfg, program)


def row(report, kind: str, axes: tuple[str, ...]) -> Row:
    (found,) = [r for r in report.rows if (r.kind, r.axes) == (kind, axes)]
    return found


# ------------------------------------------------------------------------------ the textbook table

DETTMERS = {"dp": 500_000, "column": 160_000, "row": 128_000}


@pytest.mark.parametrize("strategy", DETTMERS)
def test_layer_table_reproduces_dettmers_on_tensor2(strategy: str):
    """``--model dense --batch-size 128 --mesh tensor=2``: the same mesh for all three strategies."""
    cfg = small_config("dense", strategy, batch_size=128)
    table = layer_table(cfg, build_mesh(MeshShape(tensor=2)))
    assert sum(r.measured for r in table) == DETTMERS[strategy]
    assert all(r.measured == r.predicted for r in table)
    assert len(table) == (1 if strategy == "dp" else 2)


def test_layer_table_only_for_the_dense_model():
    assert layer_table(small_config("mlp", "tp"), build_mesh(MeshShape(tensor=2))) == []


# ------------------------------------------------------------- closed form == compiled train step


def param_elements_per_device(program) -> int:
    """From the shardings the step was compiled with (no init program to compile)."""
    (state, *_), _ = program.train_step.compiled.args_info
    (shardings, *_), _ = program.train_step.compiled.input_shardings
    return sum(
        math.prod(sh.shard_shape(info.shape))
        for info, sh in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params), strict=True)
    )


def test_data_parallelism_reduces_every_gradient_once():
    _, program, report = report_for(MeshShape(data=4, tensor=2), strategy="dp")
    batch_row = row(report, "all-reduce", ("data", "tensor"))
    assert batch_row.status == "equal"
    assert batch_row.measured == param_elements_per_device(program)
    assert {r.status for r in report.rows} <= {"equal", "scalars"}


def test_megatron_pair_costs_one_all_reduce_each_way_per_block():
    depth = 3
    _, _, report = report_for(MeshShape(data=2, tensor=4), depth=depth)
    tensor_row = row(report, "all-reduce", ("tensor",))
    assert tensor_row.status == "equal"
    assert tensor_row.measured == 2 * depth * (16 // 2) * WIDTH
    assert row(report, "all-reduce", ("data",)).status == "equal"


def test_row_split_train_step_adds_partial_outputs_once():
    """The dense layer is the network's first: the row split's input-gradient gather is not needed."""
    _, _, report = report_for(MeshShape(tensor=2), "dense", "row", batch_size=128)
    assert [(r.kind, r.axes, r.predicted, r.measured, r.status) for r in report.rows if r.status != "scalars"] == [
        ("all-reduce", ("tensor",), 128 * 500, 128 * 500, "equal")
    ]


def test_column_split_train_step_is_cheaper_than_the_textbook_and_says_why():
    _, _, report = report_for(MeshShape(tensor=2), "dense", "column", batch_size=128)
    gather = row(report, "all-gather", ("tensor",))
    assert (gather.predicted, gather.measured, gather.status) == (128 * 250, 0, "less")
    assert any("XLA avoided" in note for note in report.notes)


@pytest.mark.parametrize(("microbatches", "repeats"), [(4, 1), (2, 2)])
def test_pipeline_traffic_matches_the_closed_form(microbatches: int, repeats: int):
    stages, depth, batch = 2, 4, 16
    _, _, report = report_for(
        MeshShape(tensor=2, pipe=stages), depth=depth, batch_size=batch, microbatches=microbatches, repeats=repeats
    )
    schedule = one_f_one_b(stages, microbatches, repeats)  # the default schedule
    ticks = schedule.ticks
    b = batch // microbatches
    permute = row(report, "collective-permute", ("pipe",))
    assert permute.status == "equal" and permute.measured == ticks * b * WIDTH  # one message per tick
    others = [r for r in report.rows if r.axes == ("pipe",) and r.kind != "collective-permute"]
    assert [r for r in others if r.status != "scalars"] == []
    assert "tensor" in report.prediction.uncovered  # per-stage branches: no per-tick closed form
    assert report.prediction.bubble == pytest.approx(schedule.bubble_fraction)


def test_uncovered_axes_are_measured_only():
    _, _, report = report_for(MeshShape(data=4, tensor=2), "mnist-cnn", "tp")
    assert report.prediction.uncovered == ("tensor",)
    on_tensor = [r for r in report.rows if "tensor" in r.axes and r.status != "scalars"]
    assert on_tensor and all(r.predicted is None and r.status == "no closed form" for r in on_tensor)


def test_hybrid_conv_to_dense_gather_and_pair():
    _, _, report = report_for(MeshShape(data=4, tensor=2), "mnist-cnn", "hybrid")
    assert {r.status for r in report.rows} <= {"equal", "scalars"}
    flat = 4 * 4 * 64  # 12x12 images: two 3x3 convs, 2x2 pool
    assert row(report, "all-gather", ("tensor",)).measured == (16 // 4) * flat // 2


# --------------------------------------------------------------------------- memory, FLOPs, bytes


def test_memory_breakdown_matches_the_state():
    _, program, report = report_for(MeshShape(data=2, tensor=4), optimizer="adam")
    params = program.init().params  # real arrays: an independent count of the shards
    params_bytes = 4 * sum(math.prod(p.sharding.shard_shape(p.shape)) for p in jax.tree.leaves(params))
    assert report.memory.params == params_bytes
    assert report.memory.optimizer == 2 * params_bytes + 4  # adam: mu, nu and an int32 count
    assert report.memory.batch == 4 * (16 * math.prod(IMAGE) + 16) // 2  # x and y split over data=2
    assert report.memory.peak >= report.memory.params + report.memory.optimizer


def test_loop_aware_flops_count_every_iteration():
    def scanned(x, w):
        return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, length=10)[0]

    compiled = compile_sharded(
        scanned, jax.ShapeDtypeStruct((64, 128), jnp.float32), jax.ShapeDtypeStruct((128, 128), jnp.float32)
    )
    assert hlo_cost(compiled.as_text()).flops == 10 * 2 * 64 * 128 * 128
    assert compiled.cost_analysis()["flops"] < 2 * 2 * 64 * 128 * 128  # why hlo_cost exists


def test_loop_free_cost_agrees_with_xla():
    compiled = compile_sharded(lambda x, w: jnp.tanh(x @ w), *[jax.ShapeDtypeStruct((96, 96), jnp.float32)] * 2)
    cost = hlo_cost(compiled.as_text())
    assert cost.flops == 2 * 96**3
    assert cost.bytes_accessed == pytest.approx(compiled.cost_analysis()["bytes accessed"], rel=0.02)


def test_layer_flops_scale_with_depth():
    flops = [report_for(MeshShape(data=8), depth=d)[2].flops for d in (1, 3)]
    per_block = 3 * 2 * 2 * (16 // 8) * WIDTH * HIDDEN  # forward + two backward matmuls, up and down
    assert flops[1] - flops[0] == 2 * per_block


# ---------------------------------------------------------------------------------------- notes


def coll(kind: str, axes: tuple[str, ...], shape: tuple[int, ...], count: int = 1) -> Collective:
    elements = math.prod(shape)
    return Collective(kind, axes, shape, "float32", 2, elements, 4 * elements, "c", "jit(f)/while/body/x", count)


def test_note_for_gradients_reduced_inside_a_loop():
    colls = [coll("all-reduce", ("data",), (32, 64), count=5)]
    note = _row_note(Row("all-reduce", ("data",), 2048, 5 * 2048, "more"), colls, ("data",))
    assert "inside a loop of 5 iterations" in note and "2.50x" not in note and "5.00x" in note


def test_note_for_a_moved_weight():
    cfg, program, _ = report_for(MeshShape(tensor=2))
    moved = coll("all-gather", ("tensor",), (2, WIDTH, HIDDEN))  # shaped like layers.0.layer.up.kernel
    activation = coll("all-gather", ("tensor",), (16, WIDTH))
    notes = _weight_moves(cfg, program, [moved, activation])
    assert len(notes) == 1 and "moves weight layers.0.layer.up.kernel" in notes[0] and "constrain" in notes[0]


def test_compare_marks_each_status():
    from jaxmp.inspection.closed_forms import Expected, Prediction

    prediction = Prediction(
        [Expected("a", "all-reduce", ("data",), 10, ""), Expected("b", "all-gather", ("tensor",), 6, "")], (), 0.0
    )
    colls = [coll("all-reduce", ("data",), (5,), count=2), coll("all-to-all", ("pipe",), (3,))]
    statuses = {(r.kind, r.axes): r.status for r in compare(colls, prediction)}
    assert statuses == {
        ("all-reduce", ("data",)): "equal",
        ("all-gather", ("tensor",)): "less",
        ("all-to-all", ("pipe",)): "not predicted",
    }


def test_predict_needs_no_compilation():
    """``predict`` answers from shapes alone: XLA compiles nothing (a jit of something new, the
    control, does report a compile to the same listener)."""
    compiles = []

    def listen(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        cfg = small_config("mlp", "tp", depth=2)
        terms = predict(cfg, build_mesh(MeshShape(data=2, tensor=4)), IMAGE, CLASSES).terms
        assert compiles == []
        jax.jit(lambda a: a * 3.0 + 1.0).lower(jnp.ones(7)).compile()
        assert compiles  # the listener does hear compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert sum(t.elements for t in terms if t.axes == ("tensor",)) == 2 * 2 * 8 * WIDTH


# ------------------------------------------------------------------------------------------- CLI


def test_cli_json_reports_the_textbook_numbers():
    result = run_module(
        "jaxmp.analyze",
        *("--cpu-devices", "8", "--model", "dense", "--strategy", "row"),
        *("--mesh", "tensor=2", "--batch-size", "128", "--json"),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert sum(r["measured"] for r in data["layer"]) == 128_000
    assert data["mesh"] == {"data": 1, "context": 1, "tensor": 2, "pipe": 1}
    assert [c["shape"] for c in data["collectives"] if c["shape"]] == [[128, 500]]
    assert data["memory"]["params"] == 1000 * 500 * 4 // 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet"], "--model 'resnet' is not one of"),
        (["--mesh", "data=16"], "needs 16 devices but 8 are available"),
        (["--model", "dense", "--strategy", "tp"], "does not apply to --model dense"),
        (["--hidden", "100", "--mesh", "tensor=8"], "layers.0.layer.down.kernel"),
    ],
)
def test_bad_input_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, message)


def test_bad_flag_exit_code_of_the_process(tmp_path):
    result = run_module("jaxmp.analyze", "--cpu-devices", "2", "--mesh", "pipe=4", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
    assert list(tmp_path.iterdir()) == []


OWN_MODEL = """
from flax import nnx


class Dense(nnx.Module):
    def __init__(self, fan_in, fan_out, names, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
        self.linear = nnx.Linear(fan_in, fan_out, kernel_init=init, rngs=rngs)

    def __call__(self, h, ctx):
        return self.linear(h.reshape(h.shape[0], -1))


class Mine(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([Dense(64, 32, (None, "mlp"), rngs), Dense(32, 10, ("mlp", None), rngs)])
"""


def test_analyze_takes_a_model_of_your_own_from_the_command_line(tmp_path, capsys):
    """``--model-fn``: the report is the user's model's (its name, its collectives), not a preset's; its
    layers are jaxmp-unknown kinds, so the tensor axis has no closed form and says so."""
    (tmp_path / "models.py").write_text(OWN_MODEL)
    argv = ["--model-fn", f"{tmp_path / 'models.py'}:Mine", "--mesh", "data=2,tensor=4", "--batch-size", "16"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "Mine"
    kinds = {(c["kind"], tuple(c["axes"])) for c in report["collectives"] if c["elements"]}
    assert ("all-reduce", ("tensor",)) in kinds and ("all-reduce", ("data",)) in kinds
    assert report["prediction"]["uncovered"] == ["tensor"]
