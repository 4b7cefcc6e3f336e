"""Multi-layer perceptrons: a residual Megatron MLP and the classic 1024-512-256-128-10 network, as
lists of layers (``jaxmp.models.contract``).

Shapes: B = batch, F = input features, D = residual width, H = hidden width, C = classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp.config import ConfigError
from jaxmp.models.layers import (
    LayerContext,
    Stacked,
    activation_fn,
    dense,
    flatten_features,
    pad_features,
    partitioned,
)
from jaxmp.parallel.rules import constrain


class MegatronBlock(nnx.Module):
    """Pre-norm residual block: ``x + down(act(up(norm(x))))``.

    ``up`` is split by column (its output ``mlp`` axis on ``tensor``) and ``down`` by row (its input
    ``mlp`` axis on ``tensor``), so the hidden activation never leaves its device and the block costs
    one all-reduce forward (after ``down``) and one backward (the gradient of the block input)
    (Shoeybi et al. 2019, "Megatron-LM", section 3).
    """

    def __init__(self, width: int, hidden: int, activation: str, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm = nnx.LayerNorm(
            width,
            dtype=dtype,
            scale_init=partitioned(nnx.initializers.ones_init(), ("embed",)),
            bias_init=partitioned(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )
        self.up = dense(width, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.down = dense(hidden, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.activation = activation

    def __call__(self, x_BxD: jax.Array, ctx: LayerContext | None = None) -> jax.Array:
        with jax.numpy_dtype_promotion("standard"):  # flax's LayerNorm promotes bfloat16 to float32 for its stats
            normed_BxD = self.norm(x_BxD)
        h_BxH = activation_fn(self.activation)(self.up(normed_BxD))
        h_BxH = constrain(h_BxH, ("batch", "mlp"))
        return constrain(x_BxD + self.down(h_BxH), ("batch", "embed"))


class Dense(nnx.Module):
    """A linear layer with an activation, its output pinned to logical names: one layer of a list.

    Args:
      axes: logical names of the kernel (input axis, output axis).
      out_names: logical names of the output activation (None: leave it to XLA).
      pad_to: flatten the input and zero-pad it to this many features first (fixed-width textbook models).
    """

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        axes,
        *,
        activation: str = "none",
        out_names=None,
        use_bias: bool = True,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        self.linear = dense(fan_in, fan_out, axes, use_bias=use_bias, rngs=rngs, dtype=dtype)
        self.activation = activation
        self.out_names = out_names

    def __call__(self, h_BxF: jax.Array, ctx: LayerContext | None = None) -> jax.Array:
        h = activation_fn(self.activation)(self.linear(h_BxF))
        return constrain(h, self.out_names) if self.out_names else h


class FlatInput(nnx.Module):
    """Flatten examples to features, optionally zero-pad them to a fixed width, cast to the compute dtype."""

    def __init__(self, *, pad_to: int | None = None, names=("batch", None), dtype=jnp.float32):
        self.pad_to, self.names, self.dtype = pad_to, names, dtype

    def __call__(self, x: jax.Array, ctx: LayerContext | None = None) -> jax.Array:
        x_BxF = flatten_features(x)
        if self.pad_to is not None:
            x_BxF = pad_features(x_BxF, self.pad_to)
        return constrain(x_BxF.astype(self.dtype), self.names)


class ResidualMLP(nnx.Module):
    """``embed`` -> ``depth`` Megatron blocks (one :class:`Stacked` layer) -> ``head``.

    The model tensor parallelism is made for. The blocks share one stacked parameter set with a leading
    ``layers`` axis, so compile time does not grow with depth; the pipeline hands each stage a run of
    blocks, while ``embed`` runs before the first stage's blocks and ``head`` after the last stage's.
    """

    def __init__(
        self,
        features: int,
        classes: int,
        *,
        width: int,
        hidden: int,
        depth: int,
        activation: str,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        self.pre = Embed(features, width, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [Stacked(lambda r: MegatronBlock(width, hidden, activation, rngs=r, dtype=dtype), depth, rngs=rngs)]
        )
        self.post = Dense(width, classes, ("embed", "classes"), rngs=rngs, dtype=dtype)


class Embed(nnx.Module):
    """Inputs -> residual stream ``[B, D]``."""

    def __init__(self, features: int, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.linear = dense(features, width, ("features", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, ctx: LayerContext | None = None) -> jax.Array:
        return constrain(self.linear(flatten_features(x)), ("batch", "embed"))


class MLP1024(nnx.Module):
    """The classic layer-wise model-parallelism example: 1024 -> 512 -> 256 -> 128 -> classes, ReLU.

    Four layers, one per linear map. Inputs are flattened and zero-padded to 1024 features (digits: 64,
    MNIST: 784), which leaves the function of the real features unchanged while keeping the textbook
    layer sizes. Under ``tp`` the layers alternate column and row splits, so each pair costs one
    all-reduce per direction.
    """

    WIDTHS = (1024, 512, 256, 128)

    def __init__(self, features: int, classes: int, *, activation: str, rngs: nnx.Rngs, dtype=jnp.float32):
        if features > self.WIDTHS[0]:
            raise ConfigError(f"--model mlp-1024 takes at most 1024 input features, the data has {features}.")
        names = ("embed", "mlp", "embed", "mlp", "classes")
        sizes = (*self.WIDTHS, classes)
        self.pre = FlatInput(pad_to=self.WIDTHS[0], dtype=dtype)
        self.layers = nnx.List(
            Dense(
                sizes[i],
                sizes[i + 1],
                (names[i], names[i + 1]),
                activation=activation if i < len(sizes) - 2 else "none",
                rngs=rngs,
                dtype=dtype,
            )
            for i in range(len(sizes) - 1)
        )
