"""Multi-layer perceptrons: a residual Megatron MLP and the classic 1024-512-256-128-10 network.

Shapes: B = batch, F = input features, D = residual width, H = hidden width, C = classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp.config import ConfigError
from jaxmp.models.layers import (
    LayerContext,
    LayerSequence,
    activation_fn,
    dense,
    flatten_features,
    pad_features,
    partitioned,
)
from jaxmp.sharding import constrain


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

    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        with jax.numpy_dtype_promotion("standard"):  # flax's LayerNorm promotes bfloat16 to float32 for its stats
            normed_BxD = self.norm(x_BxD)
        h_BxH = activation_fn(self.activation)(self.up(normed_BxD))
        h_BxH = constrain(h_BxH, ("batch", "mlp"))
        return constrain(x_BxD + self.down(h_BxH), ("batch", "embed"))


class ResidualMLP(nnx.Module):
    """``embed`` -> ``depth`` Megatron blocks -> ``head``: the model tensor parallelism is made for.

    The blocks are stacked: every block parameter has a leading ``layers`` axis of size ``depth``
    (created by ``nnx.vmap``), applied by a ``lax.scan``, so compile time does not grow with depth and
    the pipeline can hand contiguous chunks of layers to stages (``layers`` -> ``pipe``).
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
        self.embed = dense(features, width, ("features", "embed"), rngs=rngs, dtype=dtype)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs: nnx.Rngs) -> MegatronBlock:
            return MegatronBlock(width, hidden, activation, rngs=rngs, dtype=dtype)

        self.blocks = stacked_blocks(rngs)
        self.head = dense(width, classes, ("embed", "classes"), rngs=rngs, dtype=dtype)

    def pre(self, x: jax.Array) -> jax.Array:
        """Inputs -> residual stream ``[B, D]`` (runs before the pipelined blocks)."""
        return constrain(self.embed(flatten_features(x)), ("batch", "embed"))

    def post(self, x_BxD: jax.Array) -> jax.Array:
        """Residual stream -> logits (runs after the pipelined blocks)."""
        return self.head(x_BxD)

    def __call__(self, x: jax.Array, *, train: bool = False, key: jax.Array | None = None) -> jax.Array:
        graphdef, stacked = nnx.split(self.blocks)

        def one_block(x_BxD, block_params):
            return nnx.merge(graphdef, block_params)(x_BxD), None

        return self.post(jax.lax.scan(one_block, self.pre(x), stacked)[0])


class MLP1024(LayerSequence, nnx.Module):
    """The classic layer-wise model-parallelism example: 1024 -> 512 -> 256 -> 128 -> classes, ReLU.

    Inputs are flattened and zero-padded to 1024 features (digits: 64, MNIST: 784), which leaves the
    function of the real features unchanged while keeping the textbook layer sizes. Under ``tp`` the
    layers alternate column and row splits, so each pair costs one all-reduce per direction. As a layer
    sequence (for heterogeneous pipelines) it has four layers, one per linear map.
    """

    WIDTHS = (1024, 512, 256, 128)
    num_layers = 4

    def __init__(self, features: int, classes: int, *, activation: str, rngs: nnx.Rngs, dtype=jnp.float32):
        if features > self.WIDTHS[0]:
            raise ConfigError(f"--model mlp-1024 takes at most 1024 input features, the data has {features}.")
        names = ("embed", "mlp", "embed", "mlp", "classes")
        sizes = (*self.WIDTHS, classes)
        self.layers = nnx.List(
            dense(sizes[i], sizes[i + 1], (names[i], names[i + 1]), rngs=rngs, dtype=dtype)
            for i in range(len(sizes) - 1)
        )
        self.activation = activation
        self.dtype = dtype

    def pre(self, x: jax.Array) -> jax.Array:
        return pad_features(flatten_features(x), self.WIDTHS[0]).astype(self.dtype)

    def apply_layer(self, k: int, h: jax.Array, ctx: LayerContext) -> jax.Array:
        h = self.layers[k](h)
        return activation_fn(self.activation)(h) if k < self.num_layers - 1 else h
