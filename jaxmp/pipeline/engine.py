"""The one pipeline executor: any schedule table, any model written as a list of layers.

Shapes: M = micro-batches, b = one device's rows of a micro-batch, A = the widest activation between
two chunks (one example, flattened), S = stages, C = chunks, T = ticks, N = a stage buffer's size.

How: one ``jax.shard_map``, manual over ``pipe`` and over the mesh axes that split the batch (``tensor``
stays automatic unless it splits the batch, so Megatron splits inside a stage still come from the rules
table, and the devices of a tensor group always share a stage). Each device holds its stage's parameter
buffers (:mod:`jaxmp.pipeline.packing`). A ``lax.scan`` per phase of ticks (:mod:`jaxmp.pipeline.transfers`)
runs, each tick (:mod:`.ticks`):

1. receive: the activations and cotangents that arrived (at most ``ARRIVALS`` of each) are written into
   their stash slots;
2. act (:mod:`.actions`): the table's action, or an overlapped pair's two: idle (no work at all), the
   forward of a chunk (under ``jax.vjp``, its closure's residuals kept in a slot until its backward:
   :mod:`.residuals`), or a backward written by hand: the closure rebuilt from the slot and pulled back
   (a re-run only where ``--remat`` keeps less), the parameter cotangent added to a running sum, the
   input cotangent sent on;
3. send: a ``lax.ppermute`` per round, carrying each device's message, whichever way it goes.

The parts, each with one idea: :mod:`.plan` (what is known before running), :mod:`.ticks` (one tick and
the loops), :mod:`.actions` (a chunk's F, B, I and W), :mod:`.residuals` (what a forward keeps).

The first chunk runs ``pre`` on the micro-batch itself and the last runs ``post`` and the loss, so the
loss of micro-batch ``m`` is known on the last stage as soon as its forward ends: a 1F1B table can then
start that backward at once, on this same executor. Weight gradients are summed over the batch axes
once, after the loop.

Why a hand-written backward and not autodiff through the loop: autodiff of ``lax.switch`` on a
predicate that depends on ``axis_index`` under ``shard_map`` gave wrong gradients (jax #40823), and
autodiff fixes the order of the backward (all forwards, then all backwards), which rules out 1F1B and
zero-bubble schedules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxmp.parallel.mesh import PIPE
from jaxmp.parallel.rules import use_rules
from jaxmp.pipeline.actions import StageParams, branches, pin_message, sample_tick
from jaxmp.pipeline.plan import Checks, Head, Plan, split_microbatches
from jaxmp.pipeline.ticks import Carry, loop_body, microbatch_of, tables_for

__all__ = ["Checks", "Plan", "execute", "split_microbatches"]


NO_CHECKS = Checks()


def execute(
    plan: Plan, buffers: dict, x_bMx, y_bMx, w_bMx, key, head: Head, *, train: bool, checks: Checks = NO_CHECKS
):
    """Run ``plan``'s schedule: ``(sums of head outputs, buffer gradients or None)``.

    Args:
      buffers: the per-stage parameter buffers ``[S, tiles..., N]``.
      x_bMx, y_bMx, w_bMx: micro-batched inputs, labels and example weights (global arrays).
      key: the step's dropout key.
      head: ``(outputs, labels, weights) -> dict of scalars`` summed over micro-batches; with
        ``train``, its ``"loss"`` is differentiated.
      checks: tests only: start the stash and messages as NaN, or write every message (:class:`Checks`).
    """
    manual = frozenset({PIPE, *plan.batch_axes})
    batch = plan.batch_axes or None
    buffer_specs = {
        name: P(PIPE, *(a if a in manual else None for a in b.tile_axes), None)
        for name, b in plan.packing.buffers.items()
    }
    body = _device_program(plan, head, train, manual, checks)
    data_spec = P(batch)
    out_specs = (P(), buffer_specs) if train else P()
    mapped = jax.shard_map(
        body,
        in_specs=(buffer_specs, data_spec, data_spec, data_spec, P()),
        out_specs=out_specs,
        axis_names=set(manual),
        check_vma=False,
    )
    return mapped(buffers, x_bMx, y_bMx, w_bMx, jax.random.key_data(key))


def _device_program(plan: Plan, head: Head, train: bool, manual: frozenset[str], checks: Checks):
    """The per-device body of the shard_map (module docstring)."""
    schedule, transfers = plan.schedule, plan.transfers

    def body(buffers, x_bMx, y_bMx, w_bMx, key_data):
        with use_rules(plan.inner_rules):
            access = StageParams.of(plan, _gather_manual_tiles(plan, buffers, manual), manual)
            b = x_bMx.shape[0]
            sample = sample_tick(plan, x_bMx, y_bMx, w_bMx)
            key = jax.random.wrap_key_data(key_data)
            actions, stash = branches(plan, access, head, train, key, sample, checks.fill)
            fill = checks.fill
            message = pin_message(jnp.full((b, plan.width), fill, plan.message_dtype), plan)
            carry = Carry(
                pin_message(jnp.full((transfers.input_slots, b, plan.width), fill, plan.message_dtype), plan),
                pin_message(jnp.full((transfers.grad_slots, b, plan.width), fill, plan.message_dtype), plan),
                tuple(message for _ in range(transfers.rounds)),
                access.zeros() if train else {},
                _zero_sums(head, plan, x_bMx, y_bMx, w_bMx),
                stash.empty(transfers.residual_slots, checks.poison),
            )
            tables = tables_for(plan, schedule, transfers, jax.lax.axis_index(PIPE))
            data = (x_bMx, y_bMx, w_bMx)
            for loop in transfers.loops:
                carry, _ = jax.lax.scan(
                    loop_body(plan, checks, loop, actions, tables, data),
                    carry,
                    loop.ticks,
                    unroll=plan.unroll,
                )
            sums = jax.lax.psum(carry.sums, (PIPE, *plan.batch_axes))
            if not train:
                return sums
            return sums, _reduce_gradients(plan, access.packed(carry.g_params), manual)

    return body


def _zero_sums(head: Head, plan: Plan, x_bMx, y_bMx, w_bMx) -> dict:
    outputs = jax.ShapeDtypeStruct((y_bMx.shape[0], *plan.outputs.shape), plan.outputs.dtype)
    shapes = jax.eval_shape(head, outputs, microbatch_of(y_bMx, 0), microbatch_of(w_bMx, 0))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _gather_manual_tiles(plan: Plan, buffers: dict, manual: frozenset[str]) -> dict:
    """Buffers tiled over a manual axis (FSDP over the batch axes) gathered once per step."""
    local = {}
    for name, value in buffers.items():
        for i, axis in enumerate(plan.packing.buffers[name].tile_axes):
            if axis in manual:
                value = jax.lax.all_gather(value, axis, axis=1 + i, tiled=True)
        local[name] = value
    return local


def _reduce_gradients(plan: Plan, g_params: dict, manual: frozenset[str]) -> dict:
    """Sum each stage's gradients over the batch axes, scattering back the tiles of manual axes."""
    out = {}
    for name, g in g_params.items():
        tiles = plan.packing.buffers[name].tile_axes
        summed = [a for a in plan.batch_axes if a not in tiles]
        if summed:
            g = jax.lax.psum(g, tuple(summed))
        for i, axis in enumerate(tiles):
            if axis in manual:
                g = jax.lax.psum_scatter(g, axis, scatter_dimension=1 + i, tiled=True)
        out[name] = g
    return out
