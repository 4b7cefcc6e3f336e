"""Model presets: one registry, name -> how to build it, which strategies it supports, its defaults.

Adding a preset means adding one :class:`Preset` to :data:`PRESETS`: ``--model`` offers it, the
checkpoint records its options, and the cost tools read its closed forms off its layer kinds
(:mod:`jaxmp.inspection.closed_forms`), as they do for a model of your own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from flax import nnx

from jaxmp.config import ConfigError, ModelConfig
from jaxmp.models.attention import ContextAttention
from jaxmp.models.cnn import MnistCNN, TextbookDense
from jaxmp.models.gpt import GPT, check_split
from jaxmp.models.layers import COMPUTE_DTYPES
from jaxmp.models.mlp import MLP1024, MegatronBlock, ResidualMLP
from jaxmp.parallel.mesh import axes_with_role
from jaxmp.parallel.rules import as_axes

__all__ = [
    "GPT",
    "MLP1024",
    "PRESETS",
    "MegatronBlock",
    "MnistCNN",
    "Preset",
    "ResidualMLP",
    "TextbookDense",
    "build_model",
]


class Preset(NamedTuple):
    """One ``--model``: ``build(cfg, input_shape, classes, activation, dtype, rngs)``."""

    build: Callable[..., nnx.Module]
    strategies: tuple[str, ...]
    activation: str  # what --activation default means for it
    options: tuple[str, ...] = ()  # the ModelConfig fields that shape it (recorded in checkpoints)
    check_mesh: Callable | None = None  # (cfg, mesh, rules, input_shape) -> None: ConfigError for a mesh it cannot use
    has_sequence: bool = False  # it names its sequence axes "seq" and "tokens" (--sequence-parallel, a context axis)
    ties_embeddings: bool = False  # its head can reuse its input embedding (--tie-embeddings)


def _mlp(cfg: ModelConfig, input_shape, classes, activation, dtype, rngs) -> nnx.Module:
    sizes = dict(width=cfg.width, hidden=cfg.hidden, depth=cfg.depth)
    return ResidualMLP(math.prod(input_shape), classes, **sizes, activation=activation, rngs=rngs, dtype=dtype)


def _mlp_1024(cfg: ModelConfig, input_shape, classes, activation, dtype, rngs) -> nnx.Module:
    return MLP1024(math.prod(input_shape), classes, activation=activation, rngs=rngs, dtype=dtype)


def _mnist_cnn(cfg: ModelConfig, input_shape, classes, activation, dtype, rngs) -> nnx.Module:
    if len(input_shape) != 3:
        raise ConfigError(f"--model mnist-cnn needs images (H, W, C), the data has shape {input_shape}.")
    return MnistCNN(input_shape, classes, activation=activation, rngs=rngs, dtype=dtype)


def _dense(cfg: ModelConfig, input_shape, classes, activation, dtype, rngs) -> nnx.Module:
    return TextbookDense(math.prod(input_shape), classes, rngs=rngs, dtype=dtype)


def _gpt(cfg: ModelConfig, input_shape, classes, activation, dtype, rngs) -> nnx.Module:
    if len(input_shape) != 1:
        raise ConfigError(
            f"--model gpt reads windows of token ids, the data has examples of shape {input_shape}; use a text "
            "dataset (--dataset shakespeare or synthetic-text)."
        )
    sizes = dict(width=cfg.width, hidden=cfg.hidden, heads=cfg.heads, depth=cfg.depth)
    options = dict(activation=activation, dropout=cfg.dropout, tie_embeddings=cfg.tie_embeddings)
    context = ContextAttention(cfg.context_strategy, cfg.context_balance)
    return GPT(classes, input_shape[0], **sizes, **options, context=context, rngs=rngs, dtype=dtype)


def _gpt_mesh(cfg: ModelConfig, mesh, rules, input_shape) -> None:
    check_split("--heads", cfg.heads, dict(mesh.shape), as_axes(rules.get("heads")), "the heads")
    shape = dict(mesh.shape)
    if cfg.sequence_parallel:
        axes = as_axes(rules.get("tokens"))
        check_split("--seq-len", input_shape[0], shape, axes, "the tokens (--sequence-parallel)")
    context = tuple(a for a in as_axes(rules.get("seq")) if shape[a] > 1)
    if not context:
        return
    parts = math.prod(shape[a] for a in context)
    if cfg.context_balance and input_shape[0] % (2 * parts):
        raise ConfigError(
            f"--seq-len {input_shape[0]} is not divisible by {2 * parts}: --context-balance gives each of the {parts} "
            "devices of context a chunk from the head and one from the tail of every sequence; choose a --seq-len "
            "that divides, or --no-context-balance."
        )
    check_split("--seq-len", input_shape[0], shape, context, "the sequence")
    if cfg.context_strategy == "ulysses":
        axes = as_axes(rules.get("seq_heads"))
        check_split("--heads", cfg.heads, shape, axes, "the heads (--context-strategy ulysses)")
    if cfg.context_strategy == "ring" and len(context) > 1:
        raise ConfigError(
            f"--context-strategy ring passes blocks round one mesh axis; the sequence is split over {context}."
        )
    stages = [a for a in axes_with_role("stages") if shape[a] > 1]
    if cfg.context_strategy == "ring" and stages:
        # jaxmp.pipeline.stage_collectives: a collective-permute inside a stage's action waits for every device.
        raise ConfigError(
            f"--context-strategy ring sends blocks with collective-permutes, which would hang inside a pipeline "
            f"stage's action (the devices of the other stages never reach them); with {stages[0]}="
            f"{shape[stages[0]]} use --context-strategy all-gather or ulysses."
        )


PRESETS: dict[str, Preset] = {
    "mlp": Preset(_mlp, ("dp", "tp", "hybrid"), "gelu", ("width", "hidden", "depth")),
    "mlp-1024": Preset(_mlp_1024, ("dp", "tp", "hybrid"), "relu"),
    "mnist-cnn": Preset(_mnist_cnn, ("dp", "tp", "hybrid"), "none"),
    "dense": Preset(_dense, ("dp", "column", "row"), "none"),
    "gpt": Preset(
        _gpt,
        ("dp", "tp"),
        "gelu",
        ("width", "hidden", "depth", "heads", "dropout", "tie_embeddings"),
        _gpt_mesh,
        True,
        True,
    ),
}


def preset(cfg: ModelConfig) -> Preset:
    """The registry entry of ``cfg.model``; ``ConfigError`` when there is none."""
    if cfg.model not in PRESETS:
        raise ConfigError(f"--model {cfg.model!r} is not one of {', '.join(PRESETS)}.")
    return PRESETS[cfg.model]


def check_preset(cfg: ModelConfig) -> None:
    """Raise ``ConfigError`` when the preset has no such strategy, or an option does not apply to it."""
    allowed = preset(cfg).strategies
    if cfg.strategy not in allowed:
        raise ConfigError(f"--strategy {cfg.strategy} does not apply to --model {cfg.model}; use {', '.join(allowed)}.")
    if cfg.sequence_parallel and not preset(cfg).has_sequence:
        raise ConfigError(f"--sequence-parallel applies to --model gpt, not {cfg.model}.")
    if cfg.tie_embeddings and not preset(cfg).ties_embeddings:
        raise ConfigError(
            f"--tie-embeddings applies to --model gpt, not {cfg.model}: its head's weight [width, classes] is not "
            "the transpose of an input embedding."
        )


def activation_of(cfg: ModelConfig) -> str:
    """The activation ``cfg`` asks for, ``default`` resolved to the preset's own."""
    return preset(cfg).activation if cfg.activation == "default" else cfg.activation


def check_mesh(cfg: ModelConfig, mesh, rules, input_shape: tuple[int, ...]) -> None:
    """Raise ``ConfigError`` when the preset cannot be split over ``mesh`` as ``rules`` ask (its own
    check: e.g. gpt's heads over ``tensor``); parameter shapes are checked for every model anyway."""
    check_context(mesh, f"--model {cfg.model}", preset(cfg).has_sequence)
    own_check = preset(cfg).check_mesh
    if own_check is not None:
        own_check(cfg, mesh, rules, input_shape)


def check_context(mesh, model: str, has_sequence: bool) -> None:
    """A ``context`` axis splits sequences: ``ConfigError`` for a model that has none."""
    split = {axis: mesh.shape[axis] for axis in axes_with_role("sequence") if mesh.shape[axis] > 1}
    if split and not has_sequence:
        (axis, size), *_ = split.items()
        raise ConfigError(
            f"--mesh {axis}={size} splits each sequence over {size} devices, and {model} has no sequence axis: "
            f"context parallelism applies to --model gpt; fold those devices into data instead."
        )


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], classes: int, rngs: nnx.Rngs) -> nnx.Module:
    """Construct the preset ``cfg.model`` for examples of ``input_shape`` (without the batch axis).

    Raises:
      ConfigError: unknown model or strategy, or inputs the model cannot take.
    """
    check_preset(cfg)
    return preset(cfg).build(cfg, input_shape, classes, activation_of(cfg), COMPUTE_DTYPES[cfg.dtype], rngs)
