"""Closed-form communication of a train step: what the textbooks say each strategy exchanges.

Shapes: B = global batch, b = rows one data replica (or one micro-batch) sees, D = residual width,
F = flattened features, t = devices on ``tensor``, S = stages, M = micro-batches, R = repeats,
T = the schedule's ticks (GPipe and 1F1B: ``2*(M*R + S - 1)`` when S divides M), L = layers.

Per device and per step, in elements (the counting conventions of :mod:`jaxmp.analysis`):

- data parallelism (Dettmers; Scaling Book): every gradient is all-reduced once over the mesh axes
  that split the batch where its layer runs and that its own sharding does not use: the parameter's
  elements per device. Conv layers use the ``conv_batch`` axes, dense layers ``batch``. Scalars (the
  mean loss, metrics such as the gradient norm) are not predicted: :func:`jaxmp.analyze.compare` counts
  them apart.
- tensor parallelism, per dense layer with b rows (Megatron-LM sec. 3):
  column (output split): forward all-gather ``b*fan_out*(t-1)/t`` unless a row layer follows
  (a Megatron pair keeps the hidden activation split), backward all-reduce ``b*fan_in`` of the partial
  input gradient unless it is the network's first layer (inputs need no gradient);
  row (input split): forward all-reduce ``b*fan_out``; backward all-gather ``b*fan_in*(t-1)/t``
  unless a column layer precedes it (pair) or it is first. A residual Megatron block therefore costs
  ``2*b*D``. ``hybrid`` adds the all-gather of the flattened conv features from the conv batch split
  to the dense one: ``b*F*(g-1)/g`` over the extra axes (Krizhevsky 2014).
- pipeline (any schedule table as one SPMD program, :mod:`jaxmp.pipeline.engine`): each tick of the
  table's loops is one collective-permute that moves one micro-batch activation or cotangent ``b*D``
  per device (an activation one stage on, or a cotangent one stage back, whichever the device's action
  sends): ``T*b*D`` for GPipe, 1F1B and ZB-H1 (``T`` their ticks), more where a table has a stage
  hear from two others in one tick (a second round). The textbook's minimum is ``b*D`` per boundary
  per micro-batch each way (the extra ticks are the bubble's share). The bubble is
  ``(S-1)/(M*R+S-1)`` of the stage-ticks (ZB-H1: ``(S-1)/(3M+S-1)``). No weight or gradient crosses ``pipe``; the
  gradients of each stage's buffers are summed over the batch axes once per step. Tensor-parallel
  layers inside stages run in per-stage branches, whose collectives the loop counts of the compiled
  program cannot attribute to ticks, so pipelined runs leave ``tensor`` uncovered.

Where a model/strategy has no closed form here (convolutions split by channel, heterogeneous pipeline
buffers), the axis is listed in ``Prediction.uncovered`` and only measured numbers are shown.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
from flax import nnx

from jaxmp.config import Config
from jaxmp.models import build_model
from jaxmp.models.cnn import MnistCNN, TextbookDense
from jaxmp.models.mlp import MLP1024, ResidualMLP
from jaxmp.pipeline import is_pipelined, schedule_for
from jaxmp.pipeline.engine import plan_exchange
from jaxmp.sharding import axis_size, param_specs, path_name, rules_for


class Expected(NamedTuple):
    """One closed-form term: ``elements`` moved per device per step by ``kind`` over ``axes``."""

    term: str
    kind: str
    axes: tuple[str, ...]
    elements: int
    formula: str


class Prediction(NamedTuple):
    """The closed-form terms of one train step, and the axes they do not cover."""

    terms: list[Expected]
    uncovered: tuple[str, ...]
    bubble: float  # fraction of idle stage-ticks; 0 without a pipeline


class _Dense(NamedTuple):
    name: str
    fan_in: int
    fan_out: int
    col: bool  # output split over tensor
    row: bool  # input split over tensor
    first: bool


class _Context(NamedTuple):
    cfg: Config
    mesh: jax.sharding.Mesh
    rules: dict
    model: nnx.Module
    params: dict  # path name -> (global shape, spec, logical names)
    pipeline: object = None  # jaxmp.pipeline.Pipeline of a pipelined program


def _axes(mesh: jax.sharding.Mesh, axes) -> tuple[str, ...]:
    """Mesh axes (in mesh order) of a rules value that span more than one device."""
    named = set((axes,) if isinstance(axes, str) else (axes or ()))
    return tuple(a for a in mesh.axis_names if a in named and mesh.shape[a] > 1)


def _spec_axes(spec) -> set[str]:
    used: set[str] = set()
    for entry in spec:
        used |= {entry} if isinstance(entry, str) else set(entry or ())
    return used


def _shard_elements(mesh, shape: tuple[int, ...], spec) -> int:
    return math.prod(dim // axis_size(mesh, axes) for dim, axes in zip(shape, tuple(spec) + (None,) * 8, strict=False))


def _context(cfg: Config, mesh: jax.sharding.Mesh, input_shape: tuple[int, ...], classes: int) -> _Context:
    rules = rules_for(cfg.model.strategy)
    model = nnx.eval_shape(lambda: build_model(cfg.model, input_shape, classes, nnx.Rngs(0)))
    abstract = nnx.state(model, nnx.Param)
    specs = param_specs(abstract, rules)
    params = {}
    for (path, var), (_, spec) in zip(
        jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))[0],
        jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0],
        strict=True,
    ):
        names = tuple(var.get_metadata().get("out_sharding") or ())
        params[path_name(path)] = (tuple(var.get_value().shape), spec, names)
    pipeline = None
    if is_pipelined(cfg.pipeline, mesh.shape["pipe"]):
        from jaxmp.step import build_program  # builds the layout only; nothing is compiled

        pipeline = build_program(cfg, mesh, input_shape, classes).pipeline
    return _Context(cfg, mesh, rules, model, params, pipeline)


def _stage_buffer_terms(ctx: _Context) -> list[Expected]:
    totals: dict[tuple[str, ...], int] = {}
    plan = ctx.pipeline.train
    for buffer in plan.packing.buffers.values():
        axes = tuple(a for a in plan.batch_axes if a not in buffer.tile_axes)
        if axes:
            totals[axes] = totals.get(axes, 0) + buffer.size
    formula = "stage buffer elements per device (padded to the largest stage)"
    return [Expected("gradients (data parallelism)", "all-reduce", axes, n, formula) for axes, n in totals.items()]


def _batch_rows(ctx: _Context, logical: str = "batch") -> int:
    return ctx.cfg.run.batch_size // axis_size(ctx.mesh, ctx.rules.get(logical))


def data_parallel_terms(ctx: _Context) -> list[Expected]:
    """Each gradient all-reduced once over its layer's batch axes minus its own axes.

    Pipelined, each stage's gradient buffers (padded to the largest stage) are summed over the axes
    that split the batch, minus those a buffer is tiled over (FSDP scatters those instead).
    """
    if ctx.pipeline is not None:
        return _stage_buffer_terms(ctx)
    totals: dict[tuple[str, ...], int] = {}
    for shape, spec, names in ctx.params.values():
        batch = ctx.rules.get("conv_batch" if "channels" in names else "batch")
        axes = tuple(a for a in _axes(ctx.mesh, batch) if a not in _spec_axes(spec))
        if axes:
            totals[axes] = totals.get(axes, 0) + _shard_elements(ctx.mesh, shape, spec)
    terms = [
        Expected("gradients (data parallelism)", "all-reduce", axes, n, "sum of parameter elements per device")
        for axes, n in totals.items()
    ]
    return terms


class _Run(NamedTuple):
    """Dense layers that run ``times`` times per step on ``rows`` rows each."""

    chain: list[_Dense]
    rows: int
    times: int
    where: str  # formula prefix, e.g. "2*L*" or "T*L/(S*R)*"


def _dense_runs(ctx: _Context) -> list[_Run] | None:
    """The dense layers in the order data flows through them, or None if there is no closed form.

    Pipelined programs have none: their tensor-parallel layers run inside per-stage branches, which the
    compiled program's loop counts cannot attribute to ticks (see :mod:`jaxmp.analysis`).
    """
    model, mesh, cfg = ctx.model, ctx.mesh, ctx.cfg

    def layer(name: str, first: bool) -> _Dense:
        shape, spec, _ = ctx.params[name + ".kernel"]
        in_axes, out_axes = (tuple(spec) + (None,) * len(shape))[len(shape) - 2 : len(shape)]
        split = [mesh.shape["tensor"] > 1 and "tensor" in _spec_axes((axes,)) for axes in (in_axes, out_axes)]
        return _Dense(name, shape[-2], shape[-1], col=split[1], row=split[0], first=first)

    rows = _batch_rows(ctx)
    if is_pipelined(cfg.pipeline, mesh.shape["pipe"]):
        return None
    if isinstance(model, TextbookDense):
        return [_Run([layer("layers.0.linear", True)], rows, 1, "")]
    if isinstance(model, MLP1024):
        return [_Run([layer(f"layers.{k}.linear", k == 0) for k in range(len(model.layers))], rows, 1, "")]
    if isinstance(model, MnistCNN):
        if "tensor" in _spec_axes(ctx.params["layers.0.conv.kernel"][1]):
            return None  # conv channels split over tensor: no closed form here
        return [_Run([layer(f"layers.{k}.linear", False) for k in (3, 4, 5)], rows, 1, "")]
    if isinstance(model, ResidualMLP):
        depth = ctx.params[f"{_BLOCKS}.up.kernel"][0][0]
        blocks = [layer(f"{_BLOCKS}.up", False), layer(f"{_BLOCKS}.down", False)]
        ends = [_Run([layer("pre.linear", True)], rows, 1, ""), _Run([layer("post.linear", False)], rows, 1, "")]
        return [*ends, _Run(blocks, rows, depth, "L*")]
    return None


_BLOCKS = "layers.0.layer"  # the stacked Megatron blocks of ResidualMLP


def tensor_terms(ctx: _Context) -> list[Expected] | None:
    """Column, row and Megatron-pair terms, plus hybrid's conv-to-dense all-gather; None if unknown."""
    runs = _dense_runs(ctx)
    if runs is None:
        return None
    t = ctx.mesh.shape["tensor"]
    terms = [term for run in runs for term in _dense_terms(run.chain, run.rows, run.times, t, run.where)]
    if isinstance(ctx.model, MnistCNN):
        extra = [
            a for a in _axes(ctx.mesh, ctx.rules.get("conv_batch")) if a not in _axes(ctx.mesh, ctx.rules.get("batch"))
        ]
        if extra:
            shape = ctx.params["layers.3.linear.kernel"][0]
            g = axis_size(ctx.mesh, tuple(extra))
            elements = _batch_rows(ctx) * shape[0] * (g - 1) // g
            terms.append(Expected("conv -> dense features", "all-gather", tuple(extra), elements, "b*F*(g-1)/g"))
    return terms


def _dense_terms(chain: list[_Dense], rows: int, times: int, t: int, where: str) -> list[Expected]:
    """Column/row/pair terms of a chain of dense layers run ``times`` times on ``rows`` rows each."""
    terms = []
    for i, d in enumerate(chain):
        before = chain[i - 1] if i else None
        after = chain[i + 1] if i + 1 < len(chain) else None
        gathered = rows * (t - 1) // t
        if d.col and not (after and after.row):
            terms.append(
                Expected(
                    f"{d.name}: column output",
                    "all-gather",
                    ("tensor",),
                    times * gathered * d.fan_out,
                    f"{where}b*fan_out*(t-1)/t",
                )
            )
        if d.col and not d.first:
            terms.append(
                Expected(
                    f"{d.name}: column input grad",
                    "all-reduce",
                    ("tensor",),
                    times * rows * d.fan_in,
                    f"{where}b*fan_in",
                )
            )
        if d.row:
            terms.append(
                Expected(
                    f"{d.name}: row output", "all-reduce", ("tensor",), times * rows * d.fan_out, f"{where}b*fan_out"
                )
            )
        if d.row and not d.first and not (before and before.col):
            terms.append(
                Expected(
                    f"{d.name}: row input grad",
                    "all-gather",
                    ("tensor",),
                    times * gathered * d.fan_in,
                    f"{where}b*fan_in*(t-1)/t",
                )
            )
    return terms


def pipeline_terms(ctx: _Context) -> list[Expected] | None:
    """Activations and cotangents between stages over ``pipe``; None if unknown (stages of other shapes).

    One collective-permute of one micro-batch message (``b*D``) per tick of the executor's loops (see
    :attr:`jaxmp.pipeline.transfers.Transfers.permutes`). No parameter or gradient crosses ``pipe``:
    each stage's are on its own devices.
    """
    stages = ctx.mesh.shape["pipe"]
    if stages == 1 or not is_pipelined(ctx.cfg.pipeline, stages):
        return []
    if not isinstance(ctx.model, ResidualMLP):
        return None
    schedule = schedule_for(ctx.cfg.pipeline, stages)
    b = _batch_rows(ctx) // schedule.microbatches
    width = ctx.params[f"{_BLOCKS}.up.kernel"][0][-2]
    permutes = plan_exchange(schedule).permutes
    return [Expected("activations and cotangents", "collective-permute", ("pipe",), permutes * b * width, "T*b*D")]


def predict(cfg: Config, mesh: jax.sharding.Mesh, input_shape: tuple[int, ...], classes: int) -> Prediction:
    """The closed-form terms of ``cfg``'s train step on ``mesh`` (see the module docstring)."""
    ctx = _context(cfg, mesh, input_shape, classes)
    terms = data_parallel_terms(ctx)
    uncovered: list[str] = []
    for axis, found in (("tensor", tensor_terms(ctx)), ("pipe", pipeline_terms(ctx))):
        if found is None and mesh.shape[axis] > 1:
            uncovered.append(axis)
        terms += found or []
    stages = mesh.shape["pipe"]
    bubble = schedule_for(cfg.pipeline, stages).bubble_fraction if is_pipelined(cfg.pipeline, stages) else 0.0
    return Prediction(terms, tuple(uncovered), bubble)


def textbook_layer(strategy: str, batch: int, fan_in: int, fan_out: int, devices: int) -> list[Expected]:
    """Dettmers' closed form for one layer inside a network (input gradient needed), per device."""
    g = devices
    if strategy == "dp":
        return [Expected("weight gradient", "all-reduce", (), fan_in * fan_out, "fan_in*fan_out")]
    gathered = "b*{}*(g-1)/g"
    if strategy == "column":
        return [
            Expected(
                "output y (forward)", "all-gather", (), batch * fan_out * (g - 1) // g, gathered.format("fan_out")
            ),
            Expected("input gradient dx (backward)", "all-reduce", (), batch * fan_in, "b*fan_in"),
        ]
    return [
        Expected("output y (forward)", "all-reduce", (), batch * fan_out, "b*fan_out"),
        Expected(
            "input gradient dx (backward)", "all-gather", (), batch * fan_in * (g - 1) // g, gathered.format("fan_in")
        ),
    ]
