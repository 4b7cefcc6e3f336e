"""What a chunk's forward stashes: closure leaves matched to the values its backward has by the traced
program's structure (a jaxpr output that is one of its inputs), the rest kept as residuals."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp.pipeline.residuals import ClosureLayout, closure_from, find_residuals


def layer(w, x):
    return jnp.tanh(x @ w)


def closure(known):
    w, x = known
    return jax.vjp(layer, w, x)


KNOWN = [jax.ShapeDtypeStruct((4, 3), jnp.float32), jax.ShapeDtypeStruct((2, 4), jnp.float32)]


def test_inputs_the_closure_keeps_are_found_and_the_rest_stashed():
    treedef, where, stashed, out = find_residuals(closure, KNOWN)
    assert sorted(w for w in where if w >= 0) == [0, 1]  # w and x, read back from the known values
    assert stashed and {(s.shape, s.dtype) for s in stashed} == {((2, 3), jnp.dtype(jnp.float32))}  # tanh's: residuals
    assert (out.shape, out.dtype) == ((2, 3), jnp.float32)
    # the closure rebuilt from the known values and the stash pulls back what the original does
    w, x = np.arange(12.0, dtype=np.float32).reshape(4, 3) / 10, np.ones((2, 4), np.float32)
    y, vjp = jax.vjp(layer, w, x)
    stash = [leaf for leaf, at in zip(jax.tree.leaves(vjp), where, strict=True) if at < 0]
    rebuilt = closure_from(ClosureLayout(treedef, where, tuple(stashed), out), [w, x], stash)
    for a, b in zip(rebuilt(jnp.ones_like(y)), vjp(jnp.ones_like(y)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_value_of_an_inputs_shape_but_computed_is_stashed():
    """The negative control: ``2x`` has ``x``'s shape and dtype, and the closure keeps it for the matmul's
    weight gradient; matching by shape would read ``x`` back in its place, matching by structure stashes
    it."""

    def doubling(known):
        w, x = known
        return jax.vjp(lambda w, x: layer(w, 2.0 * x), w, x)

    _, where, stashed, _ = find_residuals(doubling, KNOWN)
    assert 1 not in where and 0 in where
    assert ((2, 4), jnp.dtype(jnp.float32)) in [(s.shape, s.dtype) for s in stashed]
