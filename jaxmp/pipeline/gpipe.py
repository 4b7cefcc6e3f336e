"""GPipe in one SPMD program: a ``lax.scan`` over ticks, every stage at once under ``jax.vmap``.

Shapes: M = micro-batches, b = micro-batch size, S = stages, R = repeats, L = layers per chunk,
T = ticks, ``...`` = activation feature dims.

How (the GSPMD paper's "vmap + shifting buffer", as Praxis and MaxText do it): the stacked layer
parameters are viewed as ``[R, S, L, ...]`` with the stage axis sharded over ``pipe``; each tick, every
stage applies its ``L`` layers to its slot of an ``[S, b, ...]`` buffer under
``jax.vmap(..., spmd_axis_name="pipe")``, and the buffer then rotates by one stage (``jnp.roll``, which
XLA turns into a collective-permute). Stage 0 takes a fresh micro-batch on a repeat-0 tick and the
rotated output of the last stage otherwise. Autodiff through the scan gives GPipe's backward (all
forwards, then all backwards). Idle slots compute on zeros, never on whatever the buffer held, so a
bubble cannot leak into values or gradients (the tests fill the buffer with NaN to prove it).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp.pipeline.schedule import Schedule
from jaxmp.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    # save matmul results, recompute the cheap element-wise work in the backward pass
    "stage": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # GPipe's re-materialisation: keep only each tick's stage inputs, recompute everything else
    "full": jax.checkpoint_policies.nothing_saveable,
}


def split_microbatches(x_Bx: jax.Array, microbatches: int) -> jax.Array:
    """``[B, ...]`` -> ``[M, b, ...]``, micro-batch ``m`` taking examples ``m, M + m, 2M + m, ...``.

    Strided, not contiguous, so each micro-batch keeps the batch's ``data`` sharding: a device's
    contiguous block of examples becomes a contiguous block of every micro-batch.
    """
    b = x_Bx.shape[0] // microbatches
    return jnp.swapaxes(x_Bx.reshape(b, microbatches, *x_Bx.shape[1:]), 0, 1)


def merge_microbatches(x_Mxbx: jax.Array) -> jax.Array:
    """Inverse of :func:`split_microbatches`."""
    m, b = x_Mxbx.shape[:2]
    return jnp.swapaxes(x_Mxbx, 0, 1).reshape(m * b, *x_Mxbx.shape[2:])


def stage_view(stacked, schedule: Schedule):
    """Stacked layer params ``[R*S*L, ...]`` -> ``[R, S, L, ...]`` (layer ``r*S*L + s*L + l``)."""
    s, r = schedule.stages, schedule.repeats

    def view(a):
        return a.reshape(r, s, a.shape[0] // (r * s), *a.shape[1:])

    return jax.tree.map(view, stacked)


@jax.custom_vjp
def rotate_stages(x_Sx: jax.Array) -> jax.Array:
    """Shift every stage's slot to the next stage (the last wraps to stage 0): one collective-permute.

    A custom VJP so the backward pass is the opposite rotation, again one collective-permute; the
    transpose of ``jnp.roll`` (a slice and a pad) would cost two.
    """
    return jnp.roll(x_Sx, 1, axis=0)


def _rotate_forward(x_Sx):
    return rotate_stages(x_Sx), None


def _rotate_backward(_, g_Sx):
    return (jnp.roll(g_Sx, -1, axis=0),)


rotate_stages.defvjp(_rotate_forward, _rotate_backward)


def run_pipeline(
    layer_fn: Callable,
    stacked,
    x_Mxbx: jax.Array,
    schedule: Schedule,
    *,
    remat: str = "none",
    activation_names: tuple[str | None, ...] = ("batch", None),
    poison: bool = False,
) -> jax.Array:
    """Apply ``R*S*L`` stacked layers to every micro-batch, pipelined over the ``pipe`` mesh axis.

    Args:
      layer_fn: ``(params of one layer, x_bx) -> x_bx``; activations keep their shape.
      stacked: layer params with a leading ``R*S*L`` axis, in layer order.
      x_Mxbx: the micro-batches.
      schedule: which micro-batch each stage runs at each tick.
      remat: ``none``, ``stage`` or ``full`` (see ``REMAT_POLICIES``); applied to the tick body only.
      activation_names: logical axes of one micro-batch's activation (for sharding constraints).
      poison: fill the initial buffer with NaN (tests: bubbles must not reach the result).

    Returns:
      ``[M, b, ...]``: every micro-batch after all layers, in micro-batch order.
    """
    params_RxSxL = stage_view(stacked, schedule)
    buffer_names = ("stage", *activation_names)
    microbatch = jnp.asarray(schedule.microbatch)
    repeat = jnp.asarray(np.maximum(schedule.repeat, 0))
    fresh = schedule.repeat[:, 0] == 0
    # fresh micro-batches in stage 0's slot of a pipe-sharded [T, S, b, ...] array: the cotangent then stays
    # on stage 0 inside the loop and is gathered once after it, not broadcast every tick
    injected_Tx = x_Mxbx[np.where(fresh, schedule.microbatch[:, 0], 0)]
    first_S = (jnp.arange(schedule.stages) == 0).reshape(1, -1, *[1] * (x_Mxbx.ndim - 1))
    injected_TxSxBx = constrain(jnp.where(first_S, injected_Tx[:, None], 0.0), (None, *buffer_names))

    def run_chunk(params_RxL, r, x_bx, busy):
        params_L = jax.tree.map(lambda a: a[r], params_RxL)
        x_bx = jnp.where(busy, x_bx, jnp.zeros_like(x_bx))  # idle slots compute on zeros

        def one_layer(h, layer_params):
            return layer_fn(layer_params, h), None

        return jax.lax.scan(one_layer, x_bx, params_L)[0]

    run_stages = jax.vmap(run_chunk, in_axes=(1, 0, 0, 0), spmd_axis_name="pipe")

    def tick(previous_SxBx, per_tick):
        injected_SxBx, fresh_t, microbatch_S, repeat_S = per_tick
        inputs_SxBx = rotate_stages(previous_SxBx)  # stage s <- s-1, stage 0 <- S-1
        # stage 0 takes the fresh micro-batch: an element-wise select, so no stage's slot leaves its device
        take_fresh = jnp.logical_and(fresh_t, first_S[0])
        inputs_SxBx = constrain(jnp.where(take_fresh, injected_SxBx, inputs_SxBx), buffer_names)
        outputs_SxBx = constrain(run_stages(params_RxSxL, repeat_S, inputs_SxBx, microbatch_S >= 0), buffer_names)
        return outputs_SxBx, outputs_SxBx

    if REMAT_POLICIES.get(remat, "missing") == "missing":
        raise ValueError(f"remat {remat!r} is not one of {', '.join(REMAT_POLICIES)}")
    if remat != "none":
        tick = jax.checkpoint(tick, policy=REMAT_POLICIES[remat], prevent_cse=False)
    fill = jnp.nan if poison else 0.0
    initial = constrain(jnp.full((schedule.stages, *x_Mxbx.shape[1:]), fill, x_Mxbx.dtype), buffer_names)
    per_tick = (injected_TxSxBx, jnp.asarray(fresh), microbatch, repeat)
    _, outputs_TxSxBx = jax.lax.scan(tick, initial, per_tick)
    return outputs_TxSxBx[schedule.finishing_ticks(), -1]
