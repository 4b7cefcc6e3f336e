"""Model presets: name -> Flax NNX module, and which strategies each one supports."""

from __future__ import annotations

import math

from flax import nnx

from jaxmp.config import ConfigError, ModelConfig
from jaxmp.models.cnn import MnistCNN, TextbookDense
from jaxmp.models.layers import COMPUTE_DTYPES
from jaxmp.models.mlp import MLP1024, MegatronBlock, ResidualMLP

__all__ = ["MLP1024", "MegatronBlock", "MnistCNN", "ResidualMLP", "TextbookDense", "build_model"]

DEFAULT_ACTIVATION = {"mlp": "gelu", "mlp-1024": "relu", "mnist-cnn": "none", "dense": "none"}
MODEL_STRATEGIES = {
    "mlp": ("dp", "tp", "hybrid"),
    "mlp-1024": ("dp", "tp", "hybrid"),
    "mnist-cnn": ("dp", "tp", "hybrid"),
    "dense": ("dp", "column", "row"),
}


def check_strategy(cfg: ModelConfig) -> None:
    """Raise ``ConfigError`` when the model has no such strategy."""
    allowed = MODEL_STRATEGIES[cfg.model]
    if cfg.strategy not in allowed:
        raise ConfigError(f"--strategy {cfg.strategy} does not apply to --model {cfg.model}; use {', '.join(allowed)}.")


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], classes: int, rngs: nnx.Rngs) -> nnx.Module:
    """Construct the preset ``cfg.model`` for examples of ``input_shape`` (without the batch axis).

    Raises:
      ConfigError: unknown model or strategy, or inputs the model cannot take.
    """
    check_strategy(cfg)
    activation = DEFAULT_ACTIVATION[cfg.model] if cfg.activation == "default" else cfg.activation
    features = math.prod(input_shape)
    dtype = COMPUTE_DTYPES[cfg.dtype]
    if cfg.model == "mlp":
        return ResidualMLP(
            features,
            classes,
            width=cfg.width,
            hidden=cfg.hidden,
            depth=cfg.depth,
            activation=activation,
            rngs=rngs,
            dtype=dtype,
        )
    if cfg.model == "mlp-1024":
        return MLP1024(features, classes, activation=activation, rngs=rngs, dtype=dtype)
    if cfg.model == "mnist-cnn":
        if len(input_shape) != 3:
            raise ConfigError(f"--model mnist-cnn needs images (H, W, C), the data has shape {input_shape}.")
        return MnistCNN(input_shape, classes, activation=activation, rngs=rngs, dtype=dtype)
    return TextbookDense(features, classes, rngs=rngs, dtype=dtype)
