"""B and W of a split backward share its work: together they give the pullback's outputs, ``W`` does
only the weight matmuls (the input-cotangent chain comes from ``B``'s boundary), and nested ``jit`` and
``checkpoint`` calls, one traced function called twice among them, are inlined correctly."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp.pipeline.backward_split import split_backward

LAYERS = 3


def mlp(params, h):
    for w_up, w_down in params:  # the same jitted dot in every layer: one jaxpr, three call sites
        a = jax.nn.gelu(jax.jit(jnp.dot)(h, w_up))
        h = h + jax.checkpoint(lambda a, w: a @ w)(a, w_down)
    return jnp.sum(jnp.tanh(h))


def dots(fn, *args) -> int:
    """``dot_general`` equations in ``fn``'s jaxpr, nested calls included."""

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            total += eqn.primitive.name == "dot_general"
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    total += count(inner)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_b_and_w_give_the_pullback_and_w_does_only_weight_matmuls():
    rng = np.random.default_rng(0)
    params = [(rng.standard_normal((8, 16)), rng.standard_normal((16, 8))) for _ in range(LAYERS)]
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    h = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    _, pullback = jax.vjp(mlp, params, h)
    args, closure = jax.tree.flatten(pullback)  # as the executor: the residuals are the inputs

    def backward(*residuals):
        g_params, g_h = jax.tree.unflatten(closure, residuals)(jnp.ones(()))
        return [*jax.tree.leaves(g_params), g_h]

    halves = split_backward(backward, args, weight_outputs=2 * LAYERS)
    (g_h,), boundary = halves.input_pass(*args)
    g_params = halves.weight_pass(*args, boundary_values=boundary)
    for got, want in zip([*g_params, g_h], backward(*args), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert [b.shape for b in halves.boundary] == [tuple(b.shape) for b in boundary]
    # W: one matmul per weight; B and W together: the pullback's matmuls, none done twice (a W that
    # pulled the cotangent back again would redo all but the first layer's input-cotangent chain)
    in_w = dots(lambda *a: halves.weight_pass(*a, boundary_values=boundary), *args)
    in_b = dots(lambda *a: halves.input_pass(*a), *args)
    assert in_w == 2 * LAYERS
    assert in_b + in_w == dots(backward, *args) == 4 * LAYERS
