"""A model of your own: jaxmp.examples.digits, the README's example (notebook 05 trains it too)."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp.models.layers import LayerContext


class Linear(nnx.Module):
    """A linear layer whose kernel axes are named (here: the input and output axes' logical names)."""

    def __init__(self, fan_in: int, fan_out: int, names: tuple, rngs: nnx.Rngs, activation=None):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
        bias = nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:])
        self.linear = nnx.Linear(fan_in, fan_out, kernel_init=init, bias_init=bias, rngs=rngs)
        self.activation = activation

    def __call__(self, h: jax.Array, ctx: LayerContext) -> jax.Array:
        h = self.linear(h)
        return self.activation(h) if self.activation else h


class Block(nnx.Module):
    """A residual block with dropout: column-split up-projection, row-split down-projection. ``hidden``
    names their shared axis: ``mlp`` is one the ``tp`` strategy splits over ``tensor``; a name of your
    own needs a rule (``rules={"hidden": "tensor"}``)."""

    def __init__(self, width: int, rngs: nnx.Rngs, hidden: str = "mlp"):
        self.up = Linear(width, 2 * width, ("embed", hidden), rngs, activation=jax.nn.gelu)
        self.down = Linear(2 * width, width, (hidden, "embed"), rngs)

    def __call__(self, h: jax.Array, ctx: LayerContext) -> jax.Array:
        u = self.up(h, ctx)
        if ctx.train:  # one mask per example, drawn from its global id: the same on any mesh
            keep = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(ctx.key, i), 0.9, u.shape[1:]))
            u = jnp.where(keep(ctx.example_ids), u / 0.9, 0.0)
        return h + self.down(u, ctx)


class Flatten(nnx.Module):
    def __call__(self, x: jax.Array, ctx: LayerContext) -> jax.Array:
        return x.reshape(x.shape[0], -1)


class MyModel(nnx.Module):
    """Flatten | widen, three residual blocks, narrow | classify."""

    def __init__(self, features: int, classes: int, rngs: nnx.Rngs, width: int = 32, hidden: str = "mlp"):
        self.pre = Flatten()
        self.layers = nnx.List(
            [
                Linear(features, width, (None, "embed"), rngs, activation=jax.nn.relu),
                Block(width, rngs, hidden),
                Block(width, rngs, hidden),
                Block(width, rngs, hidden),
                Linear(width, width // 2, ("embed", None), rngs, activation=jax.nn.relu),
            ]
        )
        self.post = Linear(width // 2, classes, (None, "classes"), rngs)


def digits_model(rngs: nnx.Rngs) -> MyModel:
    """What jaxmp calls: rngs -> model (here for the 8x8 digits: 64 features, 10 classes)."""
    return MyModel(64, 10, rngs)
