"""The one pipeline executor: any schedule table, any model written as a list of layers.

Shapes: M = micro-batches, b = one device's rows of a micro-batch, A = the widest activation between
two chunks (one example, flattened), S = stages, C = chunks, T = ticks, N = a stage buffer's size.

How: one ``jax.shard_map``, manual over ``pipe`` and over the mesh axes that split the batch (``tensor``
stays automatic unless it splits the batch, so Megatron splits inside a stage still come from the rules
table, and the devices of a tensor group always share a stage). Each device holds its stage's parameter
buffers (:mod:`jaxmp.pipeline.packing`). A ``lax.scan`` per phase of ticks (:mod:`jaxmp.pipeline.transfers`)
runs, each tick:

1. receive: the activation and the cotangent that arrived are written into their stash slots;
2. act: ``lax.switch`` on the table's action: idle (no work at all), the forward of a chunk, or its
   backward, written by hand: the chunk re-run under ``jax.vjp`` from its stashed input (GPipe's
   re-materialisation), the parameter cotangent added to a running sum, the input cotangent sent on;
3. send: one ``lax.ppermute`` per ring shift that some stage needs this tick, each way.

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

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxmp.models.contract import apply_part
from jaxmp.models.layers import LayerContext
from jaxmp.pipeline.packing import Packing
from jaxmp.pipeline.schedule import BACKWARD, FORWARD, Schedule
from jaxmp.pipeline.transfers import Transfers, plan_transfers
from jaxmp.sharding import use_rules

Head = Callable[[jax.Array, jax.Array, jax.Array], dict]  # (outputs_bxK, labels_b, weights_b) -> sums


class Plan(NamedTuple):
    """Everything static about one pipelined program."""

    packing: Packing
    schedule: Schedule
    transfers: Transfers
    boundaries: tuple  # one example's activation (shape, dtype) after every chunk but the last
    width: int  # A
    message_dtype: jnp.dtype
    batch_axes: tuple[str, ...]  # manual in the shard_map, besides pipe
    inner_rules: dict | None  # the rules table without the manual axes
    policy: object  # jax.checkpoint policy inside a chunk, or None
    unroll: bool
    poison: bool  # tests: stash and messages start as NaN
    masked: bool = True  # tests: False writes every message, needed or not (the poison must then show)


def split_microbatches(x_Bx: jax.Array, microbatches: int) -> jax.Array:
    """``[B, ...]`` -> ``[M, b, ...]``, micro-batch ``m`` taking examples ``m, M + m, 2M + m, ...``.

    Strided, not contiguous, so each micro-batch keeps the batch's sharding: a device's contiguous
    block of examples becomes a contiguous block of every micro-batch.
    """
    b = x_Bx.shape[0] // microbatches
    return jnp.swapaxes(x_Bx.reshape(b, microbatches, *x_Bx.shape[1:]), 0, 1)


def make_plan(
    packing: Packing, schedule: Schedule, batch_axes, inner_rules, *, boundaries, policy, unroll, poison, masked=True
) -> Plan:
    """A :class:`Plan`; ``boundaries`` are the activations (one example) between consecutive chunks."""
    width = max([1, *(math.prod(s.shape) for s in boundaries)])
    dtype = boundaries[0].dtype if boundaries else jnp.float32
    transfers = plan_transfers(schedule)
    return Plan(
        packing, schedule, transfers, boundaries, width, dtype, batch_axes, inner_rules, policy, unroll, poison, masked
    )


class _Carry(NamedTuple):
    inputs: jax.Array  # [slots, b, A] stashed activations
    grads: jax.Array  # [slots, b, A] cotangents waiting for their backward
    sent_f: tuple  # per forward shift: [b, A] the last activation sent
    sent_b: tuple  # per backward shift: [b, A]
    g_params: dict  # running sum of this stage's buffer cotangents
    sums: dict  # running sums of the head's outputs (loss, ...)


class _Tick(NamedTuple):
    """What one tick reads for one action (already picked for this stage)."""

    x: jax.Array  # the micro-batch's inputs [b, ...]
    y: jax.Array
    weights: jax.Array
    h: jax.Array  # the stashed input activation [b, A]
    g: jax.Array  # the output cotangent [b, A]
    ids: jax.Array  # global example ids [b]


def run(plan: Plan, buffers: dict, x_MxB, y_MxB, w_MxB, key, head: Head, *, train: bool):
    """Run ``plan``'s schedule: ``(sums of head outputs, buffer gradients or None)``.

    Args:
      buffers: the per-stage parameter buffers ``[S, tiles..., N]``.
      x_MxB, y_MxB, w_MxB: micro-batched inputs, labels and example weights (global arrays).
      key: the step's dropout key.
      head: ``(outputs, labels, weights) -> dict of scalars`` summed over micro-batches; with
        ``train``, its ``"loss"`` is differentiated.
    """
    manual = frozenset({"pipe", *plan.batch_axes})
    batch = plan.batch_axes or None
    buffer_specs = {
        name: P("pipe", *(a if a in manual else None for a in b.tile_axes), None)
        for name, b in plan.packing.buffers.items()
    }
    body = _device_program(plan, head, train, manual)
    data_spec = P(None, batch)
    out_specs = (P(), buffer_specs) if train else P()
    mapped = jax.shard_map(
        body,
        in_specs=(buffer_specs, data_spec, data_spec, data_spec, P()),
        out_specs=out_specs,
        axis_names=set(manual),
        check_vma=False,
    )
    return mapped(buffers, x_MxB, y_MxB, w_MxB, jax.random.key_data(key))


def _device_program(plan: Plan, head: Head, train: bool, manual: frozenset[str]):
    """The per-device body of the shard_map (module docstring)."""
    schedule, transfers = plan.schedule, plan.transfers

    def body(buffers, x_MxB, y_MxB, w_MxB, key_data):
        with use_rules(plan.inner_rules):
            local = _gather_manual_tiles(plan, buffers, manual)
            stage = jax.lax.axis_index("pipe")
            b = x_MxB.shape[1]
            branches = _branches(plan, local, head, train, jax.random.wrap_key_data(key_data), manual)
            fill = jnp.nan if plan.poison else 0.0
            message = jnp.full((b, plan.width), fill, plan.message_dtype)
            carry = _Carry(
                jnp.full((transfers.input_slots, b, plan.width), fill, plan.message_dtype),
                jnp.full((transfers.grad_slots, b, plan.width), fill, plan.message_dtype),
                tuple(message for _ in transfers.forward_shifts),
                tuple(message for _ in transfers.backward_shifts),
                jax.tree.map(jnp.zeros_like, local) if train else {},
                _zero_sums(head, plan, x_MxB, y_MxB, w_MxB),
            )
            tables = _tables(plan, schedule, transfers, stage)
            data = (x_MxB, y_MxB, w_MxB)
            for start, stop, fwd_on, bwd_on in transfers.phases:
                # only the branches this phase's ticks use are compiled into its loop
                used = sorted({0, *np.unique(tables.branch_np[start:stop]).tolist()})
                remap = jnp.asarray(np.searchsorted(used, np.arange(len(branches))).astype(np.int32))
                phase_branches = [branches[i] for i in used]
                tick = _tick_fn(plan, phase_branches, remap, tables, data, stage, fwd_on, bwd_on)
                carry, _ = jax.lax.scan(tick, carry, jnp.arange(start, stop), unroll=plan.unroll)
            sums = jax.lax.psum(carry.sums, ("pipe", *plan.batch_axes))
            if not train:
                return sums
            return sums, _reduce_gradients(plan, carry.g_params, manual)

    return body


def _zero_sums(head: Head, plan: Plan, x_MxB, y_MxB, w_MxB) -> dict:
    outputs = jax.ShapeDtypeStruct((y_MxB.shape[1], 1), jnp.float32)
    shapes = jax.eval_shape(head, outputs, y_MxB[0], w_MxB[0])
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


class _Tables(NamedTuple):
    branch_np: np.ndarray  # [T, S] branch index per tick and stage (numpy: the phases pick their branches)
    branch: jax.Array  # [T] this stage's branch index per tick
    microbatch: jax.Array  # [T]
    recv_input: jax.Array  # [T, 2]
    recv_grad: jax.Array  # [T, 2]
    read_input: jax.Array  # [T]
    read_grad: jax.Array  # [T]


def _tables(plan: Plan, schedule: Schedule, transfers: Transfers, stage) -> _Tables:
    branch = _branch_table(plan, schedule)

    def mine(table):
        return jnp.asarray(table)[:, stage]

    return _Tables(
        branch,
        mine(branch),
        mine(schedule.microbatch),
        mine(transfers.recv_input),
        mine(transfers.recv_grad),
        mine(transfers.read_input),
        mine(transfers.read_grad),
    )


def _branch_keys(plan: Plan) -> list:
    """One key per chunk: chunks with the same layout (the middle of a stack) share one branch."""
    keys = []
    last = len(plan.packing.chunks) - 1
    for c, chunk in enumerate(plan.packing.chunks):
        pieces = tuple((p.part.name, None if p.rows is None else p.rows[1] - p.rows[0]) for p in chunk.pieces)
        slots = tuple((s.buffer, s.offset, s.tile.shape) for s in chunk.slots)
        keys.append((pieces, slots, c == 0, c == last))
    return keys


def _branch_table(plan: Plan, schedule: Schedule) -> np.ndarray:
    """``[T, S]`` index into the branch list: 0 idle, then a forward and a backward per distinct chunk."""
    keys = _branch_keys(plan)
    distinct = list(dict.fromkeys(keys))
    table = np.zeros(schedule.kind.shape, np.int32)
    for (t, s), kind in np.ndenumerate(schedule.kind):
        if kind in (FORWARD, BACKWARD):
            k = distinct.index(keys[schedule.chunk[t, s]])
            table[t, s] = 1 + 2 * k + (kind == BACKWARD)
    return table


def _branches(plan: Plan, local: dict, head: Head, train: bool, key, manual):
    """``[idle, F(chunk), B(chunk), ...]``, each ``(g_params, sums, tick) -> (g_params, sums, send_f, send_b)``."""
    keys = _branch_keys(plan)
    first_chunk = {k: keys.index(k) for k in dict.fromkeys(keys)}
    fill = jnp.nan if plan.poison else 0.0

    def idle(g_params, sums, tick):
        blank = jnp.full(tick.h.shape, fill, tick.h.dtype)
        return g_params, sums, blank, blank

    branches = [idle]
    for c in first_chunk.values():
        forward, backward = _chunk_actions(plan, c, local, head, train, key, manual)
        branches += [forward, backward]
    return branches


def _chunk_actions(plan: Plan, c: int, local: dict, head: Head, train: bool, key, manual):
    """The forward and backward actions of chunk ``c``."""
    last = c == len(plan.packing.chunks) - 1
    fill = jnp.nan if plan.poison else 0.0

    def chunk_fn(params, h, tick: _Tick):
        """Chunk ``c`` from its input (the micro-batch for chunk 0) to its flat output, or to the head."""
        ctx = LayerContext(train, key, tick.ids)
        if c > 0:
            h = _unflatten(h, plan, c)
        for piece, piece_params in zip(plan.packing.chunks[c].pieces, params, strict=True):
            run_piece = lambda p, h, piece=piece: apply_part(piece.part, p, h, ctx, unroll=plan.unroll)
            if plan.policy is not None:
                run_piece = jax.checkpoint(run_piece, policy=plan.policy, prevent_cse=False)
            h = run_piece(piece_params, h)
        if last:
            return head(h, tick.y, tick.weights)
        return _flatten_pad(h, plan)

    def chunk_input(tick: _Tick):
        return tick.x if c == 0 else tick.h

    def forward(g_params, sums, tick: _Tick):
        out = chunk_fn(plan.packing.chunk_params(c, local, manual), chunk_input(tick), tick)
        blank = jnp.full(tick.h.shape, fill, tick.h.dtype)
        if last:
            return g_params, jax.tree.map(jnp.add, sums, out), blank, blank
        return g_params, sums, out, blank

    def backward(g_params, sums, tick: _Tick):
        blank = jnp.full(tick.h.shape, fill, tick.h.dtype)
        if not train:
            return g_params, sums, blank, blank
        params = plan.packing.chunk_params(c, local, manual)
        if c == 0:  # the micro-batch itself needs no cotangent
            out, pull = jax.vjp(lambda p: chunk_fn(p, tick.x, tick), params)
        else:
            out, pull = jax.vjp(lambda p, h: chunk_fn(p, h, tick), params, tick.h)
        seed = jax.tree.map(jnp.zeros_like, out) | {"loss": jnp.ones_like(out["loss"])} if last else tick.g
        g_pieces, *g_h = pull(seed)
        g_params = plan.packing.add_chunk_grads(c, g_params, g_pieces)
        send_b = g_h[0].astype(tick.h.dtype) if c > 0 else blank
        return g_params, sums, blank, send_b

    return forward, backward


def _tick_fn(plan: Plan, branches, remap, tables: _Tables, data, stage, fwd_on, bwd_on):
    """One tick of one phase: receive, act, send (module docstring)."""
    x_MxB, y_MxB, w_MxB = data
    transfers, stages, m_count = plan.transfers, plan.schedule.stages, plan.schedule.microbatches
    ids_of = _example_ids(plan, x_MxB.shape[1])

    def tick(carry: _Carry, t):
        inputs = _receive(carry.inputs, carry.sent_f, tables.recv_input[t], plan.masked)
        grads = _receive(carry.grads, carry.sent_b, tables.recv_grad[t], plan.masked)
        m = jnp.clip(tables.microbatch[t], 0, m_count - 1)
        step = _Tick(
            x_MxB[m],
            y_MxB[m],
            w_MxB[m],
            inputs[jnp.maximum(tables.read_input[t], 0)],
            grads[jnp.maximum(tables.read_grad[t], 0)],
            ids_of(m),
        )
        g_params, sums, send_f, send_b = jax.lax.switch(
            remap[tables.branch[t]], branches, carry.g_params, carry.sums, step
        )
        sent_f = _send(carry.sent_f, send_f, transfers.forward_shifts, fwd_on, stages)
        sent_b = _send(carry.sent_b, send_b, transfers.backward_shifts, bwd_on, stages)
        return _Carry(inputs, grads, sent_f, sent_b, g_params, sums), None

    return tick


def _receive(stash, sent: tuple, recv, masked: bool):
    """Write the message that arrived on shift ``recv[0]`` into slot ``recv[1]`` (none if ``-1``)."""
    if not sent:
        return stash
    shift, slot = recv[0], recv[1]
    message = sent[0]
    for i in range(1, len(sent)):
        message = jnp.where(shift == i, sent[i], message)
    index = jnp.maximum(slot, 0)
    if masked:
        message = jnp.where(slot >= 0, message, stash[index])
    return stash.at[index].set(message)


def _send(previous: tuple, payload, shifts: tuple[int, ...], active: tuple[bool, ...], stages: int) -> tuple:
    """``payload`` moved by every active ring shift (one collective-permute each); others keep theirs."""
    out = []
    for d, on, old in zip(shifts, active, previous, strict=True):
        if on:
            out.append(jax.lax.ppermute(payload, "pipe", [(s, (s + d) % stages) for s in range(stages)]))
        else:
            out.append(old)
    return tuple(out)


def _example_ids(plan: Plan, b: int):
    """Global ids of this device's ``b`` rows of micro-batch ``m`` (``split_microbatches`` takes every
    M-th): dropout masks follow the global id, so they are the same on any mesh and schedule."""
    m_count = plan.schedule.microbatches

    def ids(m):
        first = jax.lax.axis_index(plan.batch_axes) * b if plan.batch_axes else 0
        return m + m_count * (first + jnp.arange(b, dtype=jnp.int32))

    return ids


def _flatten_pad(h: jax.Array, plan: Plan) -> jax.Array:
    flat = h.reshape(h.shape[0], -1).astype(plan.message_dtype)
    return jnp.pad(flat, ((0, 0), (0, plan.width - flat.shape[1])))


def _unflatten(h_bxA: jax.Array, plan: Plan, c: int) -> jax.Array:
    boundary = plan.boundaries[c - 1]
    return h_bxA[:, : math.prod(boundary.shape)].reshape(h_bxA.shape[0], *boundary.shape).astype(boundary.dtype)
