"""The MNIST CNN of the classic model-parallelism tutorials, and the textbook dense layer, as lists of
layers (``jaxmp.models.contract``).

Shapes: B = batch, H/W = image height/width, C = channels, F = flattened features, K = classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp.config import ConfigError
from jaxmp.models.layers import LayerContext, activation_fn, channel_dropout, conv3x3, flatten_features
from jaxmp.models.mlp import Dense, FlatInput
from jaxmp.parallel.rules import constrain


class ConvDropout(nnx.Module):
    """Conv(3x3) - activation - Dropout2d: one layer of the tutorial CNN."""

    def __init__(self, c_in: int, c_out: int, rate: float, salt: int, *, activation: str, rngs: nnx.Rngs, dtype):
        self.conv = conv3x3(c_in, c_out, rngs=rngs, dtype=dtype)
        self.rate, self.salt, self.activation = rate, salt, activation

    def __call__(self, h_BxHxWxC: jax.Array, ctx: LayerContext) -> jax.Array:
        h = channel_dropout(activation_fn(self.activation)(self.conv(h_BxHxWxC)), self.rate, ctx, salt=self.salt)
        return constrain(h, ("conv_batch", None, None, "channels"))


class PoolFlatten(nnx.Module):
    """Max-pool 2x2, then flatten channel-major (as PyTorch's NCHW flatten): no parameters."""

    def __call__(self, h_BxHxWxC: jax.Array, ctx: LayerContext | None = None) -> jax.Array:
        h = nnx.max_pool(constrain(h_BxHxWxC, ("conv_batch", None, None, "channels")), (2, 2), strides=(2, 2))
        return constrain(flatten_features(h), ("batch", "flat"))


class LogSoftmax(nnx.Module):
    """The tutorial's output: log-probabilities."""

    def __call__(self, h: jax.Array, ctx: LayerContext | None = None) -> jax.Array:
        return jax.nn.log_softmax(h)


class _ImageInput(nnx.Module):
    def __init__(self, dtype):
        self.dtype = dtype

    def __call__(self, x_BxHxWxC: jax.Array, ctx: LayerContext | None = None) -> jax.Array:
        if x_BxHxWxC.ndim != 4:
            raise ConfigError(f"--model mnist-cnn needs images (B, H, W, C), got shape {x_BxHxWxC.shape}.")
        return constrain(x_BxHxWxC.astype(self.dtype), ("conv_batch", None, None, None))


class MnistCNN(nnx.Module):
    """Conv(C->32, 3x3) - Dropout2d(0.5) - Conv(32->64, 3x3) - Dropout2d(0.75) | max-pool 2 - flatten |
    Linear(F->128) - Linear(128->20) - Linear(20->K), then log-softmax.

    Six layers, as the tutorial wrote it, so its three-device split (the conv block, pool+flatten, the
    dense block) is ``--stage-split 2,1,3``. Faithful: no activations unless ``activation`` says so (then
    after each conv and the first two linear layers). Any input size of at least 6x6 works (28x28 gives
    F = 9216). Conv activations are named ``conv_batch`` and dense ones ``batch``, so the ``hybrid``
    strategy can run the convolutions data-parallel and the dense layers tensor-parallel (Krizhevsky
    2014), with XLA resharding the flattened features in between.
    """

    INPUT_BATCH_AXIS = "conv_batch"

    def __init__(
        self, image_shape: tuple[int, int, int], classes: int, *, activation: str, rngs: nnx.Rngs, dtype=jnp.float32
    ):
        height, width, channels = image_shape
        pooled = ((height - 4) // 2, (width - 4) // 2)
        if min(pooled) < 1:
            raise ConfigError(f"--model mnist-cnn needs images of at least 6x6, the data has {height}x{width}.")
        act = dict(activation=activation, rngs=rngs, dtype=dtype)
        self.pre = _ImageInput(dtype)
        self.layers = nnx.List(
            [
                ConvDropout(channels, 32, 0.5, 0, **act),
                ConvDropout(32, 64, 0.75, 1, **act),
                PoolFlatten(),
                Dense(pooled[0] * pooled[1] * 64, 128, ("flat", "mlp"), out_names=("batch", "mlp"), **act),
                Dense(128, 20, ("mlp", None), **act),
                Dense(20, classes, (None, "classes"), rngs=rngs, dtype=dtype),
            ]
        )
        self.post = LogSoftmax()


class TextbookDense(nnx.Module):
    """One bias-free dense layer, 1000 -> 500: the data-vs-model-parallelism example of the textbooks.

    Trained as a classifier over its 500 outputs (labels use the first few); inputs are flattened and
    zero-padded to 1000 features. Its kernel is named ``(dense_in, dense_out)``: the ``column`` strategy
    splits the output, ``row`` the input.
    """

    FAN_IN, FAN_OUT = 1000, 500

    def __init__(self, features: int, classes: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if features > self.FAN_IN:
            raise ConfigError(f"--model dense takes at most {self.FAN_IN} input features, the data has {features}.")
        if classes > self.FAN_OUT:
            raise ConfigError(f"--model dense has {self.FAN_OUT} outputs, the data has {classes} classes.")
        self.pre = FlatInput(pad_to=self.FAN_IN, dtype=dtype)
        self.layers = nnx.List(
            [Dense(self.FAN_IN, self.FAN_OUT, ("dense_in", "dense_out"), use_bias=False, rngs=rngs, dtype=dtype)]
        )
