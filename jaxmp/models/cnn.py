"""The MNIST CNN of the classic model-parallelism tutorials, and the textbook dense layer.

Shapes: B = batch, H/W = image height/width, C = channels, F = flattened features, K = classes.
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
    channel_dropout,
    conv3x3,
    dense,
    flatten_features,
    pad_features,
)
from jaxmp.sharding import constrain


class MnistCNN(LayerSequence, nnx.Module):
    """Conv(C->32, 3x3) - Dropout2d(0.5) - Conv(32->64, 3x3) - Dropout2d(0.75) - max-pool 2 - flatten -
    Linear(F->128) - Linear(128->20) - Linear(20->K) - log-softmax.

    Faithful to the tutorial: no activations unless ``activation`` says so (then after each conv and
    the first two linear layers). Any input size of at least 6x6 works (28x28 gives F = 9216). Conv
    activations are named ``conv_batch`` and dense ones ``batch``, so the ``hybrid`` strategy can run the
    convolutions data-parallel and the dense layers tensor-parallel (Krizhevsky 2014), with XLA
    resharding the flattened features in between. As a layer sequence (for heterogeneous pipelines) it
    has five layers: conv1, conv2 (with pooling and flattening), fc1, fc2, fc3.
    """

    INPUT_BATCH_AXIS = "conv_batch"
    num_layers = 5

    def __init__(
        self, image_shape: tuple[int, int, int], classes: int, *, activation: str, rngs: nnx.Rngs, dtype=jnp.float32
    ):
        height, width, channels = image_shape
        pooled = ((height - 4) // 2, (width - 4) // 2)
        if min(pooled) < 1:
            raise ConfigError(f"--model mnist-cnn needs images of at least 6x6, the data has {height}x{width}.")
        self.conv1 = conv3x3(channels, 32, rngs=rngs, dtype=dtype)
        self.conv2 = conv3x3(32, 64, rngs=rngs, dtype=dtype)
        self.fc1 = dense(pooled[0] * pooled[1] * 64, 128, ("flat", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(128, 20, ("mlp", None), rngs=rngs, dtype=dtype)
        self.fc3 = dense(20, classes, (None, "classes"), rngs=rngs, dtype=dtype)
        self.activation = activation
        self.dtype = dtype

    def pre(self, x_BxHxWxC: jax.Array) -> jax.Array:
        if x_BxHxWxC.ndim != 4:
            raise ConfigError(f"--model mnist-cnn needs images (B, H, W, C), got shape {x_BxHxWxC.shape}.")
        return constrain(x_BxHxWxC.astype(self.dtype), ("conv_batch", None, None, None))

    def apply_layer(self, k: int, h: jax.Array, ctx: LayerContext) -> jax.Array:
        act = activation_fn(self.activation)
        if k == 0:
            h = channel_dropout(act(self.conv1(h)), 0.5, ctx, salt=0)
            return constrain(h, ("conv_batch", None, None, "channels"))
        if k == 1:
            h = channel_dropout(act(self.conv2(h)), 0.75, ctx, salt=1)
            h = nnx.max_pool(constrain(h, ("conv_batch", None, None, "channels")), (2, 2), strides=(2, 2))
            return constrain(flatten_features(h), ("batch", "flat"))
        if k == 2:
            return constrain(act(self.fc1(h)), ("batch", "mlp"))
        if k == 3:
            return act(self.fc2(h))
        return jax.nn.log_softmax(self.fc3(h))


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
        self.layer = dense(self.FAN_IN, self.FAN_OUT, ("dense_in", "dense_out"), use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, *, train: bool = False, key: jax.Array | None = None) -> jax.Array:
        x_BxF = pad_features(flatten_features(x), self.FAN_IN)
        return self.layer(constrain(x_BxF, ("batch", None)))
