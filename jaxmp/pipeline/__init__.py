"""Pipeline parallelism: schedules as data (``schedule``), the scan executor (``gpipe``), and the glue
that runs a model's stacked layers through it.

A model can be pipelined when it has ``pre(x)``, a stacked ``blocks`` module (leading ``layers`` axis)
and ``post(h)``: ``pre`` and ``post`` run on the whole batch, the blocks run as ``S`` stages (x ``R``
repeats) over ``M`` micro-batches under ``jax.vmap`` (``gpipe.run_pipeline``). Heterogeneous models
(``LayerSequence``: mlp-1024, mnist-cnn) are not pipelined yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from flax import nnx

from jaxmp.config import ConfigError, PipelineConfig
from jaxmp.pipeline.gpipe import merge_microbatches, run_pipeline, split_microbatches
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


def check_pipeline(cfg: PipelineConfig, model: nnx.Module, stages: int, batch: int, batch_parts: int) -> None:
    """Raise ``ConfigError`` if ``model`` cannot run as ``stages`` stages of ``cfg`` on this batch."""
    if not is_pipelined(cfg, stages):
        return
    name = type(model).__name__
    if not hasattr(model, "blocks"):
        raise ConfigError(
            f"model {name} has layers of different shapes, which jaxmp cannot pipeline yet; use --model mlp or pipe=1."
        )
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


def pipelined_forward(model, x: jax.Array, schedule: Schedule, *, remat: str = "none", poison: bool = False):
    """``model.post(blocks(model.pre(x)))`` with the blocks run as a pipeline over micro-batches."""
    h_Mxbx = split_microbatches(model.pre(x), schedule.microbatches)
    graphdef, stacked = nnx.split(model.blocks)

    def layer_fn(layer_params, h):
        return nnx.merge(graphdef, layer_params)(h)

    out_Mxbx = run_pipeline(layer_fn, stacked, h_Mxbx, schedule, remat=remat, poison=poison)
    return model.post(merge_microbatches(out_Mxbx))


def make_forward(cfg: PipelineConfig, stages: int, *, poison: bool = False) -> Forward:
    """``forward(model, x, train=..., key=...) -> logits``, pipelined when ``cfg`` asks for it."""
    if not is_pipelined(cfg, stages):
        return lambda model, x, **kw: model(x, **kw)
    schedule = schedule_for(cfg, stages)
    return lambda model, x, **kw: pipelined_forward(model, x, schedule, remat=cfg.remat, poison=poison)


def batch_parts(mesh: jax.sharding.Mesh, axes) -> int:
    """How many devices the batch is split over."""
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)
