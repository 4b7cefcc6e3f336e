"""Building blocks whose parameters carry logical axis names (never mesh axes).

Eager sharding is switched off on purpose: parameters are created inside ``jax.jit`` with
``out_shardings`` computed from the rules table, so they are born sharded and never exist whole on one
device (see ``jaxmp.training.step.init_state``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp.config import ConfigError

Axes = tuple[str | None, ...]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "none": lambda x: x,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
}


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by its flag value."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"--activation {name!r} is not one of {', '.join(ACTIVATIONS)}.") from None


def partitioned(init: nnx.Initializer, axes: Axes) -> nnx.Initializer:
    """Wrap an initializer so the parameter carries logical axis names (no eager sharding)."""
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def dense(
    fan_in: int, fan_out: int, axes: Axes, *, rngs: nnx.Rngs, use_bias: bool = True, dtype=jnp.float32
) -> nnx.Linear:
    """A linear layer whose kernel is named ``axes = (input axis, output axis)``; bias follows output.

    Parameters are float32; ``dtype`` is the compute dtype (inputs and weights are cast to it, so a
    bfloat16 model keeps float32 master weights and float32 gradients).
    """
    return nnx.Linear(
        fan_in,
        fan_out,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), axes[1:]),
        rngs=rngs,
    )


def conv3x3(in_channels: int, out_channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Conv:
    """A 3x3, stride-1, unpadded convolution whose output channels are the logical axis ``channels``."""
    return nnx.Conv(
        in_channels,
        out_channels,
        dtype=dtype,
        kernel_size=(3, 3),
        padding="VALID",
        kernel_init=partitioned(nnx.initializers.lecun_normal(), (None, None, None, "channels")),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("channels",)),
        rngs=rngs,
    )


def flatten_features(x: jax.Array) -> jax.Array:
    """``[B, ...]`` -> ``[B, F]``; images are flattened channel-major, as PyTorch's NCHW flatten."""
    if x.ndim == 4:
        x = jnp.transpose(x, (0, 3, 1, 2))
    return x.reshape(x.shape[0], -1)


def pad_features(x_BxF: jax.Array, width: int) -> jax.Array:
    """Zero-pad flattened inputs to ``width`` features (fixed-width textbook models)."""
    return jnp.pad(x_BxF, ((0, 0), (0, width - x_BxF.shape[-1])))


class LayerContext(NamedTuple):
    """What a layer may need besides its input: train mode, the step's dropout key, example ids.

    Dropout masks are drawn per example from ``fold_in(key, example id)``, so a micro-batch gets
    exactly its examples' rows of the full-batch mask, whatever the mesh or pipeline schedule.
    """

    train: bool = False
    key: jax.Array | None = None
    example_ids: jax.Array | None = None


def channel_dropout(x_BxHxWxC: jax.Array, rate: float, ctx: LayerContext, salt: int) -> jax.Array:
    """Dropout2d: zero whole channels of each example with probability ``rate``, scale the rest."""
    if not ctx.train or rate == 0.0:
        return x_BxHxWxC
    key = jax.random.fold_in(ctx.key, salt)

    def keep_mask(example_id):
        return jax.random.bernoulli(jax.random.fold_in(key, example_id), 1.0 - rate, (1, 1, x_BxHxWxC.shape[-1]))

    keep_Bx1x1xC = jax.vmap(keep_mask)(ctx.example_ids)
    return jnp.where(keep_Bx1x1xC, x_BxHxWxC / (1.0 - rate), jnp.zeros_like(x_BxHxWxC))


class Stacked(nnx.Module):
    """``depth`` identical layers whose parameters are stacked on a leading ``layers`` axis.

    Applied by a ``lax.scan`` over that axis, so compile time stays flat in depth; the pipeline slices
    the stack into contiguous runs of layers, one run per chunk (haliax's ``Stacked`` has the same idea).

    Args:
      make_layer: ``rngs -> layer``; called once under ``nnx.vmap``, so every layer has its own weights.
      depth: number of layers.
    """

    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], depth: int, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def build(rngs: nnx.Rngs) -> nnx.Module:
            return make_layer(rngs)

        self.layer = build(rngs)
        self.depth = depth

    def __call__(self, h: jax.Array, ctx: LayerContext) -> jax.Array:
        graphdef, stacked = nnx.split(self.layer)
        return scan_layers(graphdef, stacked, h, ctx)


def scan_layers(
    graphdef: nnx.GraphDef, stacked, h: jax.Array, ctx: LayerContext, *, unroll: bool = False, policy=None, first=0
):
    """Apply the layers whose parameters ``stacked`` carries on a leading axis, in order, by ``lax.scan``.

    Args:
      policy: a ``jax.checkpoint`` policy for each layer (None: no re-materialisation).
      first: the position in its stack of the first layer given (a pipeline chunk holds a run of it).
    """

    def one_layer(h, layer):
        index, layer_params = layer
        return nnx.merge(graphdef, layer_params)(h, layer_context(ctx, index)), None

    if policy is not None:
        one_layer = jax.checkpoint(one_layer, policy=policy, prevent_cse=False)
    indices = first + jnp.arange(jax.tree.leaves(stacked)[0].shape[0], dtype=jnp.int32)
    return jax.lax.scan(one_layer, h, (indices, stacked), unroll=unroll)[0]


def layer_context(ctx: LayerContext, index) -> LayerContext:
    """``ctx`` for layer ``index`` of a stack: its dropout key folded with the index, so the layers of
    a stack draw different masks (the same on any split of the stack into pipeline chunks)."""
    return ctx if ctx.key is None else ctx._replace(key=jax.random.fold_in(ctx.key, index))
