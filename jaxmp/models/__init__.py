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
from jaxmp.models.cnn import MnistCNN, TextbookDense
from jaxmp.models.gpt import GPT, check_split
from jaxmp.models.layers import COMPUTE_DTYPES
from jaxmp.models.mlp import MLP1024, MegatronBlock, ResidualMLP
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
    sequence_parallel: bool = False  # it names its residual stream's sequence axis "tokens" (--sequence-parallel)
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
    return GPT(classes, input_shape[0], **sizes, **options, rngs=rngs, dtype=dtype)


def _gpt_mesh(cfg: ModelConfig, mesh, rules, input_shape) -> None:
    check_split("--heads", cfg.heads, dict(mesh.shape), as_axes(rules.get("heads")), "the heads")
    if cfg.sequence_parallel:
        axes = as_axes(rules.get("tokens"))
        check_split("--seq-len", input_shape[0], dict(mesh.shape), axes, "the tokens (--sequence-parallel)")


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
    if cfg.sequence_parallel and not preset(cfg).sequence_parallel:
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
    own_check = preset(cfg).check_mesh
    if own_check is not None:
        own_check(cfg, mesh, rules, input_shape)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], classes: int, rngs: nnx.Rngs) -> nnx.Module:
    """Construct the preset ``cfg.model`` for examples of ``input_shape`` (without the batch axis).

    Raises:
      ConfigError: unknown model or strategy, or inputs the model cannot take.
    """
    check_preset(cfg)
    return preset(cfg).build(cfg, input_shape, classes, activation_of(cfg), COMPUTE_DTYPES[cfg.dtype], rngs)
