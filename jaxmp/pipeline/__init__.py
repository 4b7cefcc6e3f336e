"""Pipeline parallelism for any model written as a list of layers.

A reading path, one idea per module:

1. ``schedule``: a schedule is a table, one action (or an overlapped pair) per tick and device, and
   the rules a table must keep (:func:`.schedule.validate`).
2. ``registry``: the built-in schedules and what each promises (placement, backwards, stash, bubble);
   ``list_scheduling`` and ``dualpipev`` build their tables.
3. ``notation``: tables as torch's per-rank action lists and CSV, read (placed into ticks) and written.
4. ``partition`` and ``packing``: a model cut into chunks, and each stage's parameters in buffers.
5. ``transfers``: what a table implies for the executor: messages, stash slots, loops of ticks.
6. ``plan``: all of that for one program, with the shapes that cross ``pipe`` (:class:`.plan.Plan`).
7. ``engine``: the one executor, a ``shard_map`` around loops of ticks; its parts: ``ticks`` (one tick:
   receive, act lane by lane, send), ``actions`` (a chunk's ``F``, ``B``, ``I`` and ``W``) and
   ``residuals`` (what a forward keeps for its backward).

:func:`build_pipeline` turns a config, a model's parts and a mesh into the static plans of a train step
(forward and backward actions) and of evaluation (forwards only) that share one parameter packing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from jaxmp.config import ConfigError, PipelineConfig
from jaxmp.models.contract import ModelParts, apply_part, part_bytes
from jaxmp.models.layers import LayerContext
from jaxmp.parallel.mesh import PIPE
from jaxmp.parallel.rules import active_rules, rules_without_axes
from jaxmp.parallel.sharding import axis_size
from jaxmp.pipeline.engine import Checks, Plan, execute, split_microbatches
from jaxmp.pipeline.notation import read_csv, to_csv, write_csv
from jaxmp.pipeline.packing import Packing, Piece, piece_params
from jaxmp.pipeline.partition import chunk_bounds, chunks_and_placement
from jaxmp.pipeline.plot import plot
from jaxmp.pipeline.registry import (
    SCHEDULES,
    V,
    build_schedule,
    dualpipev,
    gpipe,
    naive,
    one_f_one_b,
    spec_of,
    zb_h1,
    zb_v,
)
from jaxmp.pipeline.schedule import Schedule, render, v_placement, validate

__all__ = [
    "SCHEDULES",
    "Checks",
    "Pipeline",
    "Schedule",
    "build_pipeline",
    "build_schedule",
    "check_schedule_csv",
    "dualpipev",
    "execute",
    "gpipe",
    "is_pipelined",
    "naive",
    "one_f_one_b",
    "plot",
    "read_csv",
    "render",
    "schedule_for",
    "split_microbatches",
    "to_csv",
    "v_placement",
    "validate",
    "write_csv",
    "zb_h1",
    "zb_v",
]

_RECOMPUTED = frozenset(
    {"convert_element_type", "broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims", "copy", "copy_p"}
    | {"random_bits", "random_fold_in", "random_wrap", "random_unwrap", "random_split", "random_seed", "threefry2x32"}
)


def _keep_all_but_layout(prim, *_, **__) -> bool:
    """Keep every residual except casts, layout changes and random bits: those are cheap to redo, and a
    cast of a weight (bfloat16 compute) kept per micro-batch would cost a weight's bytes per slot."""
    return prim.name not in _RECOMPUTED


# What a forward keeps for its backward (the pipeline's residual stash), per --remat.
REMAT_POLICIES = {
    "none": _keep_all_but_layout,  # no re-run
    "stage": jax.checkpoint_policies.dots_saveable,  # matmul results kept, element-wise work redone
    "full": jax.checkpoint_policies.nothing_saveable,  # only the chunk's input kept, B re-runs the chunk
}

# How a split backward's W gets the cotangents B computed, per --weight-pass: pulled again through the
# residuals (recompute: no memory beyond 1F1B's), or stashed by B until W (stash: no work done twice).
WEIGHT_PASSES = {"recompute": False, "stash": True}


class Pipeline(NamedTuple):
    """The static plans of one pipelined program."""

    train: Plan
    eval: Plan
    packing: Packing


def is_pipelined(cfg: PipelineConfig, stages: int) -> bool:
    """Whether the run needs the pipeline executor (more than one stage, micro-batch or repeat, or a
    schedule of its own)."""
    pieces = (cfg.placement, cfg.schedule_csv)
    return stages > 1 or cfg.microbatches > 1 or cfg.repeats > 1 or any(p is not None for p in pieces)


def check_schedule_csv(cfg: PipelineConfig, stages: int | None = None) -> Schedule | None:
    """``--schedule-csv``'s table (None without one), checked against ``--microbatches`` and, when given,
    the mesh's ``stages`` along ``pipe``: the CSV defines both, so a disagreement is one line."""
    if cfg.schedule_csv is None:
        return None
    schedule = read_csv(cfg.schedule_csv)
    flag = f"--schedule-csv {cfg.schedule_csv}"
    if schedule.microbatches != cfg.microbatches:
        raise ConfigError(
            f"{flag} runs {schedule.microbatches} micro-batches, --microbatches is {cfg.microbatches}; "
            f"give --microbatches {schedule.microbatches}."
        )
    if stages is not None and schedule.stages != stages:
        raise ConfigError(
            f"{flag} has {schedule.stages} rows (one per device along pipe), the mesh has pipe={stages}; "
            f"give a --mesh with pipe={schedule.stages}."
        )
    return schedule


def schedule_for(cfg: PipelineConfig, stages: int, chunk_stage=None, *, backward: bool = True) -> Schedule:
    """The schedule table of ``cfg`` for chunks placed on ``chunk_stage`` (default: contiguous/circular,
    or the CSV's). Evaluation (``backward=False``) runs the same forwards for every schedule."""
    from_csv = check_schedule_csv(cfg, stages)
    if from_csv is not None and backward:
        schedule = from_csv
    elif from_csv is not None:
        schedule = build_schedule("gpipe", stages, cfg.microbatches, placement=from_csv.chunk_stage, backward=False)
        schedule = schedule._replace(name=from_csv.name)
    else:
        schedule = build_schedule(
            cfg.schedule, stages, cfg.microbatches, cfg.repeats, placement=chunk_stage, backward=backward
        )
    if backward and WEIGHT_PASSES[cfg.weight_pass] and not schedule.split_backward:
        split = ", ".join(name for name, spec in SCHEDULES.items() if spec.splits_backward)
        raise ConfigError(
            f"--weight-pass {cfg.weight_pass} needs a schedule with W actions ({split}), not {schedule.name}."
        )
    return schedule


def chunks_and_devices(cfg: PipelineConfig, num_units: int, stages: int, costs) -> tuple[list, tuple[int, ...]]:
    """The chunks' unit bounds and stages (:func:`.partition.chunks_and_placement`); a V schedule's are two
    per stage, the two at the turn on the same stage; a CSV schedule's are those its rows run."""
    from_csv = check_schedule_csv(cfg, stages)
    if from_csv is not None:
        return chunk_bounds(cfg.stage_split, num_units, from_csv.chunks, costs), from_csv.chunk_stage
    spec = spec_of(cfg.schedule)
    if spec.placement != V:
        return chunks_and_placement(cfg.stage_split, cfg.placement, num_units, stages, cfg.repeats, costs)
    chunk_stage = spec.placement_for(stages, cfg.repeats, cfg.placement)
    return chunk_bounds(cfg.stage_split, num_units, len(chunk_stage), costs), chunk_stage


MAX_UNITS = 2**16  # the most layers (a stack of depth L counts L) a pipeline plans, one by one, on the host


def check_unit_count(parts: ModelParts) -> None:
    """``ConfigError`` for a model of more layers than a pipeline can plan: the split, the packing and the
    transfers are worked out per layer in Python, so a stack of depth 10**8 would take minutes and one of
    depth 2**31 all of the host's memory before its train state could be found too large."""
    units = sum(part.depth or 1 for part in parts.layers)
    if units > MAX_UNITS:
        raise ConfigError(
            f"the model has {units} layers (--depth counts each block), beyond the {MAX_UNITS} a pipeline "
            "plans (one by one, on the host)."
        )


def check_microbatches(cfg: PipelineConfig, batch: int, batch_parts: int) -> None:
    microbatches = spec_of(cfg.schedule).microbatches_for(cfg.microbatches)
    if batch % (microbatches * batch_parts):
        raise ConfigError(
            f"--batch-size {batch} cannot be split into {microbatches} micro-batches that divide evenly over "
            f"the {batch_parts} devices of the batch axes (needs a multiple of {microbatches * batch_parts})."
        )


def build_pipeline(
    cfg: PipelineConfig,
    parts: ModelParts,
    abstract,
    specs,
    mesh,
    x_struct,
    batch_axes: tuple[str, ...],
    boundary_names: tuple | None = None,
) -> Pipeline:
    """Chunks, placement, packing and the train and eval plans.

    Args:
      abstract: the model's parameters (pure dict of shape structs), layer order.
      specs: their ``PartitionSpec`` s without ``pipe``.
      x_struct: one global batch of inputs.
      batch_axes: the mesh axes that split the batch (manual in the executor).
      boundary_names: the logical axes of the activations between layers, if the model declares them
        (its class's ``BOUNDARY_NAMES``): messages between stages then keep that split (a transformer's
        tokens under sequence parallelism: each device sends 1/t of the activation).

    Raises:
      ConfigError: the split, placement or micro-batches do not fit the model, mesh or batch.
    """
    stages = mesh.shape[PIPE]
    check_unit_count(parts)
    abstract = parts.with_ties(abstract)  # each part's parameters under its own key (a tied one too)
    costs = unit_costs(cfg.stage_split, parts, abstract, x_struct)
    bounds, chunk_stage = chunks_and_devices(cfg, len(parts.units), stages, costs)
    check_microbatches(cfg, x_struct.shape[0], axis_size(mesh, batch_axes))
    packing = Packing(parts, abstract, specs, bounds, chunk_stage, mesh)
    microbatches = spec_of(cfg.schedule).microbatches_for(cfg.microbatches)
    b = x_struct.shape[0] // microbatches
    *boundaries, outputs = _boundaries(
        packing, abstract, jax.ShapeDtypeStruct((b, *x_struct.shape[1:]), x_struct.dtype)
    )
    shared = dict(
        packing=packing,
        batch_axes=batch_axes,
        inner_rules=rules_without_axes(active_rules(), {PIPE, *batch_axes}),
        boundaries=tuple(boundaries),
        outputs=outputs,
        policy=REMAT_POLICIES[cfg.remat],
        unroll=cfg.unroll,
        stash_cotangents=WEIGHT_PASSES[cfg.weight_pass],
        boundary_names=boundary_names,
    )
    train = Plan.build(schedule=schedule_for(cfg, stages, chunk_stage), **shared)
    evaluate = Plan.build(schedule=schedule_for(cfg, stages, chunk_stage, backward=False), **shared)
    return Pipeline(train, evaluate, packing)


def _boundaries(packing: Packing, abstract, x_struct) -> list[jax.ShapeDtypeStruct]:
    """The activation (one example's shape, dtype) after every chunk; the last is the model's output."""

    def run_all(params, x):
        h, outs, ctx = x, [], LayerContext()
        for chunk in packing.chunks:
            for piece in chunk.pieces:
                h = apply_part(piece.part, piece_params(params, piece), h, ctx)
            outs.append(h)
        return outs

    return [jax.ShapeDtypeStruct(o.shape[1:], o.dtype) for o in jax.eval_shape(run_all, abstract, x_struct)]


def unit_costs(split: str, parts: ModelParts, abstract, x_struct) -> list[float] | None:
    """Per unit: forward FLOPs (``auto``) or parameter bytes (``auto-memory``); ``pre``/``post`` count
    with the first and last unit. None for the other splits."""
    if split == "auto-memory":
        costs = [float(part_bytes(abstract, parts.layers[i], 1)) for i, _ in parts.units]
        ends = [part_bytes(abstract, p) if p is not None else 0 for p in (parts.pre, parts.post)]
    elif split == "auto":
        costs, ends = layer_flops(parts, abstract, x_struct)
    else:
        return None
    costs[0] += ends[0]
    costs[-1] += ends[1]
    return costs


def layer_flops(parts: ModelParts, abstract, x_struct) -> tuple[list[float], list[float]]:
    """Forward FLOPs per unit for one example, and of ``pre`` and ``post``, from XLA's cost analysis."""
    h = jax.ShapeDtypeStruct((1, *x_struct.shape[1:]), x_struct.dtype)
    ctx = LayerContext()

    def flops_of(part, rows, h):
        params = piece_params(abstract, Piece(part, rows))
        fn = jax.jit(lambda p, h: apply_part(part, p, h, ctx))
        cost = fn.lower(params, h).cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("flops", 0.0)), jax.eval_shape(fn, params, h)

    pre_flops = 0.0
    if parts.pre is not None:
        pre_flops, h = flops_of(parts.pre, None, h)
    costs = []
    for i, k in parts.units:
        part = parts.layers[i]
        flops, h_next = flops_of(part, (k, k + 1) if part.depth else None, h)
        costs.append(flops)
        h = h_next
    ends = [pre_flops, flops_of(parts.post, None, h)[0] if parts.post is not None else 0.0]
    return costs, ends
