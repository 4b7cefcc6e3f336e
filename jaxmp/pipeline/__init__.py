"""Pipeline parallelism: schedules as data (``schedule``), the scan executor (``gpipe``), and the glue
that runs a model's stacked layers through it.

Two kinds of model can be pipelined:
- homogeneous: ``pre(x)``, a stacked ``blocks`` module (leading ``layers`` axis) and ``post(h)``; the
  blocks run as ``S`` stages (x ``R`` repeats) over ``M`` micro-batches, each device running its own
  stage inside a ``shard_map`` over ``pipe`` (``gpipe.run_pipeline``);
- heterogeneous: a ``LayerSequence`` (layers of different shapes, e.g. conv then dense); chunks of
  layers run under ``lax.switch`` in a ``shard_map`` over ``pipe`` (``hetero.run_hetero_pipeline``),
  split ``uniform``ly, by ``auto`` FLOP balance, or by explicit layer counts (``partition``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp.config import ConfigError, PipelineConfig
from jaxmp.models.layers import LayerSequence
from jaxmp.pipeline.gpipe import merge_microbatches, run_pipeline, split_microbatches
from jaxmp.pipeline.hetero import layer_flops, run_hetero_pipeline
from jaxmp.pipeline.partition import chunk_bounds
from jaxmp.pipeline.schedule import Schedule, gpipe, render

__all__ = [
    "Schedule",
    "check_pipeline",
    "gpipe",
    "make_forward",
    "pipelined_forward",
    "render",
    "schedule_for",
]

Forward = Callable[..., jax.Array]


def is_pipelined(cfg: PipelineConfig, stages: int) -> bool:
    """Whether the run needs the pipeline executor (more than one stage, micro-batch or repeat)."""
    return stages > 1 or cfg.microbatches > 1 or cfg.repeats > 1


def schedule_for(cfg: PipelineConfig, stages: int) -> Schedule:
    """The schedule table for ``stages`` pipeline stages under ``cfg``."""
    microbatches = 1 if cfg.schedule == "naive" else cfg.microbatches
    return gpipe(stages, microbatches, cfg.repeats)


def check_pipeline(
    cfg: PipelineConfig, model: nnx.Module, mesh: jax.sharding.Mesh, batch: int, batch_parts: int
) -> None:
    """Raise ``ConfigError`` if ``model`` cannot run as ``pipe`` stages of ``cfg`` on this batch."""
    stages = mesh.shape["pipe"]
    if not is_pipelined(cfg, stages):
        return
    name = type(model).__name__
    if isinstance(model, LayerSequence):
        if mesh.shape["tensor"] > 1:
            raise ConfigError(
                f"model {name} has layers of different shapes; its pipeline runs with tensor=1 (tensor-parallel "
                "collectives inside per-stage branches deadlock XLA's CPU runtime); use data and pipe axes."
            )
        if getattr(model, "dtype", jnp.float32) != jnp.float32:
            raise ConfigError(
                f"model {name} has layers of different shapes; its pipeline runs in float32 only (XLA:CPU fails to "
                "compile the bfloat16 program); use --dtype float32."
            )
        chunk_bounds(cfg.stage_split, model.num_layers, stages * cfg.repeats)
        _check_microbatches(cfg, stages, batch, batch_parts)
        return
    if not hasattr(model, "blocks"):
        raise ConfigError(f"model {name} has no layers to pipeline; use pipe=1.")
    depth = jax.tree.leaves(nnx.state(model.blocks))[0].shape[0]
    chunks = stages * cfg.repeats
    if chunks > depth:
        raise ConfigError(
            f"{chunks} pipeline chunks (pipe x repeats) need at least {chunks} layers, the model has {depth}."
        )
    if depth % chunks:
        raise ConfigError(f"--depth {depth} cannot be split into {chunks} equal chunks (pipe x repeats).")
    if cfg.stage_split not in ("uniform", "auto") and set(cfg.stage_split.split(",")) != {str(depth // chunks)}:
        raise ConfigError(f"--stage-split {cfg.stage_split}: stacked layers need equal stages of {depth // chunks}.")
    _check_microbatches(cfg, stages, batch, batch_parts)


def _check_microbatches(cfg: PipelineConfig, stages: int, batch: int, batch_parts: int) -> None:
    microbatches = schedule_for(cfg, stages).microbatches
    if batch % (microbatches * batch_parts):
        raise ConfigError(
            f"--batch-size {batch} cannot be split into {microbatches} micro-batches that divide evenly over "
            f"the {batch_parts} devices of the batch axes (needs a multiple of {microbatches * batch_parts})."
        )


def pipelined_forward(
    model, x: jax.Array, schedule: Schedule, *, remat: str = "none", poison: bool = False, unroll: bool = False
):
    """``model.post(blocks(model.pre(x)))`` with the blocks run as a pipeline over micro-batches."""
    h_Mxbx = split_microbatches(model.pre(x), schedule.microbatches)
    graphdef, stacked = nnx.split(model.blocks)

    def layer_fn(layer_params, h):
        return nnx.merge(graphdef, layer_params)(h)

    out_Mxbx = run_pipeline(layer_fn, stacked, h_Mxbx, schedule, remat=remat, poison=poison, unroll=unroll)
    return model.post(merge_microbatches(out_Mxbx))


def make_forward(cfg: PipelineConfig, stages: int, *, poison: bool = False) -> Forward:
    """``forward(model, x, train=..., key=...) -> logits``, pipelined when ``cfg`` asks for it."""
    if not is_pipelined(cfg, stages):
        return lambda model, x, **kw: model(x, **kw)
    schedule = schedule_for(cfg, stages)

    def forward(model, x, *, train: bool = False, key=None):
        if not isinstance(model, LayerSequence):
            return pipelined_forward(model, x, schedule, remat=cfg.remat, poison=poison, unroll=cfg.unroll)
        flops = layer_flops(model, jax.eval_shape(model.pre, x).shape) if cfg.stage_split == "auto" else None
        bounds = chunk_bounds(cfg.stage_split, model.num_layers, stages * cfg.repeats, flops)
        return run_hetero_pipeline(model, x, schedule, bounds, train=train, key=key, poison=poison)

    return forward
