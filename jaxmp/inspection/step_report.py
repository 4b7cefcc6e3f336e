"""What a train step costs, read off the program XLA compiled (behind ``python -m jaxmp.analyze``).

Takes every trainer flag (same model, mesh, strategy and schedule) and, without training, compiles the
train step ahead of time and reports:

- every collective: kind, mesh axes, shape, dtype, bytes, executions per step (trip counts of the
  loops around it applied) and the layer/op it came from (HLO ``op_name`` metadata), with totals per
  axis;
- per-device memory: parameters, optimizer state, batch, temporaries (``memory_analysis()``) and the
  peak; FLOPs per device (matmul FLOPs from the HLO with loop trip counts, next to ``cost_analysis()``,
  which counts each loop body once);
- the closed-form prediction of :mod:`jaxmp.inspection.closed_forms` next to the measurement, per (kind, axes), with
  every difference flagged and explained where a rule recognises it (a weight moved instead of an
  activation, a gradient reduced inside a loop, an exchange XLA avoided);
- for ``--model dense``: Dettmers' data-vs-model-parallelism numbers for the layer inside a network,
  compiled on the same mesh (:func:`jaxmp.inspection.textbook.textbook_layer_exchange`).

``--json`` prints one JSON object instead of the tables. Invalid input: one line, exit code 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jaxmp.config import Config, validate
from jaxmp.inspection.closed_forms import Prediction, predict_program
from jaxmp.inspection.collectives import AxisTotal, Collective, origin, per_axis
from jaxmp.inspection.compiled import memory_and_flops
from jaxmp.inspection.flops import hlo_cost
from jaxmp.inspection.textbook import textbook_layer, textbook_layer_exchange
from jaxmp.parallel.mesh import DATA, TENSOR
from jaxmp.speech import speaks_python

_SMALL = 4  # collectives of at most this many elements (loss scalars) never trigger a note on their own


class Memory(NamedTuple):
    """Per-device bytes of one train step: what the state holds and what XLA allocates."""

    params: int
    optimizer: int
    batch: int
    other_state: int  # step counter, dropout key
    temporaries: int | None  # memory_analysis().temp_size_in_bytes
    peak: int | None  # arguments + outputs not aliased to them + temporaries


class Row(NamedTuple):
    """Predicted against measured elements per step for one (kind, axes)."""

    kind: str
    axes: tuple[str, ...]
    predicted: int | None  # None: no closed form covers these axes
    measured: int
    status: str  # "equal", "more", "less", "not predicted", "no closed form", "scalars"


class LayerRow(NamedTuple):
    """One line of the textbook layer table: a strategy's exchange, closed form and compiled."""

    strategy: str
    term: str
    kind: str
    predicted: int
    measured: int


class StepReport(NamedTuple):
    """Everything ``python -m jaxmp.analyze`` prints, as data."""

    model: str
    strategy: str
    mesh: dict[str, int]
    batch_size: int
    microbatches: int
    repeats: int
    collectives: list[Collective]
    axes: list[AxisTotal]
    memory: Memory
    flops: float  # matmul FLOPs per device per step, loops applied
    xla_flops: float | None  # cost_analysis(): loop bodies once
    bytes_accessed: float
    prediction: Prediction
    rows: list[Row]
    notes: list[str]
    layer: list[LayerRow]


def setup(cfg: Config, input_shape: tuple[int, ...] | None = None, classes: int | None = None):
    """Validate ``cfg`` and return its mesh, example shape, class count and the batch's dtypes and label
    shape (``build_program``'s ``input_dtype`` and ``label_shape``, from the dataset when it is read, else
    empty: float examples, one label each); compiles nothing.

    The same checks as the trainer's (``jaxmp.training.loop.prepare``) that do not need a training run:
    options, simulated devices (before JAX starts), mesh, dataset (read only when ``input_shape`` or
    ``classes`` is not given). The batch may exceed the dataset: nothing is trained.
    """
    from jaxmp.parallel.mesh import run_mesh, simulate_cpu_devices
    from jaxmp.training.data import load_dataset
    from jaxmp.training.loop import batch_shape

    validate(cfg)
    if cfg.run.cpu_devices:
        simulate_cpu_devices(cfg.run.cpu_devices)
    mesh = run_mesh(cfg.run.mesh, cfg.run.cpu_devices)  # the first devices it needs, as the trainer takes them
    batch = {}
    if input_shape is None or classes is None:
        dataset = load_dataset(cfg.data, cfg.run.seed)
        input_shape = input_shape or tuple(dataset.x_train.shape[1:])
        classes = classes or dataset.num_classes
        batch = batch_shape(dataset)
    return mesh, tuple(input_shape), classes, batch


def memory_breakdown(compiled: jax.stages.Compiled) -> Memory:
    """Per-device bytes of the train step's arguments ``(state, x, y)``, split by role, plus XLA's totals."""
    (state_info, *batch_info), _ = compiled.args_info
    (state_sh, *batch_sh), _ = compiled.input_shardings

    def nbytes(infos, shardings) -> int:
        return sum(
            math.prod(sh.shard_shape(info.shape)) * info.dtype.itemsize
            for info, sh in zip(jax.tree.leaves(infos), jax.tree.leaves(shardings), strict=True)
        )

    reported = memory_and_flops(compiled)
    return Memory(
        params=nbytes(state_info.params, state_sh.params),
        optimizer=nbytes(state_info.opt_state, state_sh.opt_state),
        batch=nbytes(batch_info, batch_sh),
        other_state=nbytes((state_info.step, state_info.key), (state_sh.step, state_sh.key)),
        temporaries=reported.temp_bytes,
        peak=reported.peak_bytes,
    )


def compare(colls: list[Collective], prediction: Prediction) -> list[Row]:
    """One row per (kind, axes) that is measured or predicted, measured elements per step included.

    Scalar collectives (the mean loss, metrics such as the gradient norm) get rows of their own, kind
    ``"scalar all-reduce"`` and status ``"scalars"``: no closed form counts them and they cost nothing.
    """
    measured: dict[tuple[str, tuple[str, ...]], int] = {}
    for coll in colls:
        if coll.elements:
            key = ("scalar " + coll.kind if coll.shape == () else coll.kind, coll.axes)
            measured[key] = measured.get(key, 0) + coll.total_elements
    predicted: dict[tuple[str, tuple[str, ...]], int] = {}
    for term in prediction.terms:
        key = (term.kind, term.axes)
        predicted[key] = predicted.get(key, 0) + term.elements
    rows = []
    for kind, axes in sorted(set(measured) | set(predicted), key=lambda k: (k[1], k[0])):
        got, want = measured.get((kind, axes), 0), predicted.get((kind, axes))
        if kind.startswith("scalar "):
            status = "scalars"
        elif any(axis in prediction.uncovered for axis in axes):
            status, want = "no closed form", None
        elif want is None:
            status = "not predicted"
        else:
            status = "equal" if got == want else ("more" if got > want else "less")
        rows.append(Row(kind, axes, want, got, status))
    return rows


def analyze_program(cfg: Config, program) -> StepReport:
    """Measure and predict the train step of an already built ``Program`` (compiles it if needed)."""
    from jaxmp.inspection.collectives import collectives

    compiled = program.train_step.compiled
    text = compiled.as_text()
    colls = collectives(text, program.mesh)
    prediction = predict_program(cfg, program)
    rows = compare(colls, prediction)
    cost = hlo_cost(text)
    return StepReport(
        model=_model_name(cfg, program),
        strategy=cfg.model.strategy,
        mesh=dict(program.mesh.shape),
        batch_size=cfg.run.batch_size,
        microbatches=cfg.pipeline.microbatches,
        repeats=cfg.pipeline.repeats,
        collectives=colls,
        axes=per_axis(colls),
        memory=memory_breakdown(compiled),
        flops=cost.flops,
        xla_flops=memory_and_flops(compiled).flops,
        bytes_accessed=cost.bytes_accessed,
        prediction=prediction,
        rows=rows,
        notes=diagnose(cfg, program, colls, rows, prediction),
        layer=layer_table(cfg, program.mesh) if _model_name(cfg, program) == "dense" else [],
    )


def _model_name(cfg: Config, program) -> str:
    """The preset's name, or the class name of a model of the user's own."""
    kind = type(program.model)
    return cfg.model.model if kind.__module__.startswith("jaxmp.models.") else kind.__qualname__


def layer_table(cfg: Config, mesh: jax.sharding.Mesh) -> list[LayerRow]:
    """Dettmers' table for ``--model dense``: the layer inside a network (input gradient needed).

    The trainer's step has no input gradient (the layer is the first), so its own exchange is smaller;
    this compiles forward + backward of the same layer, split by the same rules on the same mesh.
    """
    from jaxmp.models.cnn import TextbookDense
    from jaxmp.parallel.rules import rules_for
    from jaxmp.parallel.sharding import axis_size

    if cfg.model.model != "dense":
        return []
    strategy = cfg.model.strategy
    fan_in, fan_out = TextbookDense.FAN_IN, TextbookDense.FAN_OUT
    measured = textbook_layer_exchange(strategy, cfg.run.batch_size, fan_in, fan_out, mesh)
    batch_axes = rules_for(strategy).get("batch")
    rows = cfg.run.batch_size // axis_size(mesh, batch_axes)
    devices = axis_size(mesh, batch_axes) if strategy == "dp" else mesh.shape[TENSOR]
    table = []
    for term in textbook_layer(strategy, rows, fan_in, fan_out, devices):
        got = sum(c.elements * c.count for c in measured if c.kind == term.kind)
        table.append(LayerRow(strategy, term.term, term.kind, term.elements, got))
    return table


def _param_shapes(program) -> dict[tuple[int, ...], str]:
    """Trailing-two-dims shape of every matrix parameter (per layer for stacked ones) -> its name."""
    from jaxmp.parallel.sharding import path_name

    (state_info, *_), _ = program.train_step.compiled.args_info
    shapes = {}
    for path, info in jax.tree_util.tree_flatten_with_path(state_info.params)[0]:
        if len(info.shape) >= 2:
            shapes.setdefault(tuple(info.shape[-2:]), path_name(path))
    return shapes


def _weight_moves(cfg: Config, program, colls: list[Collective]) -> list[str]:
    """Notes for collectives that gather or shuffle an array shaped like a weight matrix."""
    shapes = _param_shapes(program)
    fsdp_axes = set(cfg.model.fsdp and _batch_axes(program) or ())
    notes, seen = [], set()
    for coll in colls:
        name = shapes.get(tuple(coll.shape[-2:])) if len(coll.shape) >= 2 else None
        if coll.kind == "all-reduce" or name is None or set(coll.axes) <= fsdp_axes or (name, coll.kind) in seen:
            continue
        seen.add((name, coll.kind))
        notes.append(
            f"{coll.kind} over {'x'.join(coll.axes)} of {coll.shape} ({origin(coll.op_name)}) moves weight {name} "
            f"({coll.total_elements:,} elements per step), not an activation: XLA could not keep the matmul where "
            "the weight lives. Pin the intended layout: store the weight as it is used (its rule in the rules "
            "table) and constrain the activation, e.g. jaxmp.parallel.rules.constrain(h, ('batch', 'mlp')) "
            f"or jax.lax.with_sharding_constraint(h, P('{DATA}', '{TENSOR}'))."
        )
    return notes


def _batch_axes(program) -> tuple[str, ...]:
    axes = program.rules.get("batch") or ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _row_note(row: Row, colls: list[Collective], batch_axes: tuple[str, ...]) -> str | None:
    """Why one predicted row differs from its measurement, where the collectives tell."""
    axes = "x".join(row.axes)
    mine = [c for c in colls if (c.kind, c.axes) == (row.kind, row.axes) and c.elements and c.shape]
    if row.status == "less":
        others = sorted({f"{c.kind} {c.shape}" for c in colls if c.axes == row.axes and c.kind != row.kind and c.shape})
        return (
            f"{row.kind} over {axes}: measured {row.measured:,} < predicted {row.predicted:,} elements: XLA avoided "
            f"part of the textbook exchange" + (f" (it uses {', '.join(others)} instead)" if others else "") + "."
        )
    looped = [c for c in mine if c.count > 1 and c.kind == "all-reduce" and set(c.axes) <= set(batch_axes)]
    if row.status == "more" and looped:
        trips = max(c.count for c in looped)
        return (
            f"{row.kind} over {axes}: measured {row.measured:,} = {row.measured / row.predicted:.2f}x predicted "
            f"{row.predicted:,}: gradients are all-reduced inside a loop of {trips} iterations (e.g. "
            f"{looped[0].shape}, {origin(looped[0].op_name)}), not once per step. Accumulate them across the loop "
            "and reduce once."
        )
    if row.status == "more":
        return f"{row.kind} over {axes}: measured {row.measured:,} > predicted {row.predicted:,} elements."
    if row.status == "not predicted" and row.measured > _SMALL:
        kinds = sorted({f"{c.shape} {origin(c.op_name)}" for c in mine})[:3]
        return f"{row.kind} over {axes}: {row.measured:,} elements no closed form predicts: {'; '.join(kinds)}."
    return None


def diagnose(cfg: Config, program, colls: list[Collective], rows: list[Row], prediction: Prediction) -> list[str]:
    """Plain-language notes on every difference between the compiled program and the textbook."""
    batch_axes = _batch_axes(program)
    notes = [note for row in rows if (note := _row_note(row, colls, batch_axes))]
    notes += _weight_moves(cfg, program, colls)
    if prediction.uncovered:
        notes.append(
            f"no closed form for axes {', '.join(prediction.uncovered)} of this model/strategy: measured only."
        )
    if prediction.bubble:
        notes.append(
            f"pipeline bubble ({program.pipeline.train.schedule.name}): {prediction.bubble:.1%} of stage-ticks "
            "idle; idle ticks do no work, but the HLO walk charges each tick its costliest branch, so FLOPs and tensor "
            "collectives include the bubble."
        )
    return notes


@speaks_python
def analyze(
    cfg: Config | None = None,
    *,
    model_fn: Callable | None = None,
    input_shape: tuple[int, ...] | None = None,
    classes: int | None = None,
    **pieces,
) -> StepReport:
    """Compile a train step ahead of time (no training) and report its costs.

    Args:
      cfg: the run's options (default ``Config()``): mesh, strategy, batch, pipeline.
      model_fn: ``rngs -> model`` for a model of your own (default: ``--model-fn``, else the preset).
      input_shape, classes: one example's shape and the number of classes; default: the dataset's.
      pieces: ``optimizer=``, ``loss=``, ``rules=``, ``input_dtype=``, ``label_shape=``, as
        :func:`jaxmp.training.step.build_program` takes them.
    """
    from jaxmp.models.contract import own_model_fn
    from jaxmp.pipeline.plot import check_plot_path, save_schedule_plot
    from jaxmp.training.step import build_program

    cfg = validate(cfg or Config())
    check_plot_path(cfg.run.schedule_plot)
    model_fn = own_model_fn(cfg, model_fn)
    mesh, input_shape, classes, batch = setup(cfg, input_shape, classes)
    program = build_program(cfg, mesh, input_shape, classes, model_fn=model_fn, **{**batch, **pieces})
    save_schedule_plot(program.pipeline, cfg.run.schedule_plot)
    return analyze_program(cfg, program)


def to_json(report: StepReport) -> dict[str, Any]:
    """The report as plain JSON types (named tuples become objects)."""

    def plain(value):
        if isinstance(value, tuple) and hasattr(value, "_asdict"):
            return {k: plain(v) for k, v in value._asdict().items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    data = plain(report)
    data["memory"]["note"] = "bytes per device; peak = arguments + non-aliased outputs + temporaries"
    data["flops_note"] = "flops: matmul FLOPs per device per step, loops applied; xla_flops: cost_analysis()"
    return data


__all__ = ["LayerRow", "Memory", "Row", "StepReport", "analyze", "analyze_program", "compare", "setup", "to_json"]
