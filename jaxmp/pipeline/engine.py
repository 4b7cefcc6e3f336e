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
from jaxmp.pipeline.schedule import BACKWARD, FORWARD, IDLE, WEIGHT, Schedule
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
    fuse_last: bool = False  # the last chunk's forward runs its whole backward too (see fuses_last_chunk)


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
    fuse = fuses_last_chunk(schedule)
    transfers = plan_transfers(schedule, _no_ops(schedule, fuse))
    return Plan(
        packing,
        schedule,
        transfers,
        boundaries,
        width,
        dtype,
        batch_axes,
        inner_rules,
        policy,
        unroll,
        poison,
        masked,
        fuse,
    )


def plan_exchange(schedule: Schedule) -> Transfers:
    """The messages, slots and loops the executor runs ``schedule`` with."""
    return plan_transfers(schedule, _no_ops(schedule, fuses_last_chunk(schedule)))


def fuses_last_chunk(schedule: Schedule) -> bool:
    """Whether the last chunk's forward also runs its backward (loss, weight gradient and input cotangent
    in one ``jax.vjp``, no re-run), the cotangent kept in the input's stash slot until the table's ``B``
    sends it.

    Only where that costs no time: on one stage, or where every ``B`` of the last chunk comes right after
    its ``F`` (the 1F1B family). Under GPipe with several stages it would lengthen every forward tick
    of the last stage, which all stages wait for.
    """
    if not (schedule.kind == BACKWARD).any():
        return False
    last = schedule.chunks - 1
    follows = all(
        schedule.when(BACKWARD, m, last) == schedule.when(FORWARD, m, last) + 1 for m in range(schedule.microbatches)
    )
    return schedule.stages == 1 or follows


class _Carry(NamedTuple):
    inputs: jax.Array  # [slots, b, A] stashed activations
    grads: jax.Array  # [slots, b, A] cotangents waiting for their backward
    arrived: tuple  # per round: [b, A] the message the last permute delivered
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
            access = _Params.of(plan, _gather_manual_tiles(plan, buffers, manual), manual)
            stage = jax.lax.axis_index("pipe")
            b = x_MxB.shape[1]
            branches = _branches(plan, access, head, train, jax.random.wrap_key_data(key_data))
            fill = jnp.nan if plan.poison else 0.0
            message = jnp.full((b, plan.width), fill, plan.message_dtype)
            carry = _Carry(
                jnp.full((transfers.input_slots, b, plan.width), fill, plan.message_dtype),
                jnp.full((transfers.grad_slots, b, plan.width), fill, plan.message_dtype),
                tuple(message for _ in range(transfers.rounds)),
                access.zeros() if train else {},
                _zero_sums(head, plan, x_MxB, y_MxB, w_MxB),
            )
            tables = _tables(plan, schedule, transfers, stage)
            data = (x_MxB, y_MxB, w_MxB)
            for loop in transfers.loops:
                carry, _ = jax.lax.scan(
                    _loop_body(plan, loop, branches, tables, data, stage),
                    carry,
                    loop.ticks,
                    unroll=plan.unroll,
                )
            sums = jax.lax.psum(carry.sums, ("pipe", *plan.batch_axes))
            if not train:
                return sums
            return sums, _reduce_gradients(plan, access.packed(carry.g_params), manual)

    return body


class _Params(NamedTuple):
    """How the actions read a chunk's parameters and add up its gradients.

    Stages whose chunks all share one layout (one device, or a stack split evenly) unpack their
    parameters once per step and sum gradients in the layer tree, packed once after the loop. Otherwise
    every action unpacks its chunk from the stage buffers and adds into them slot by slot: the only
    form with one shape on every stage. The packed sums cost a read-modify-write of each slot per
    action, which XLA:CPU does not do in place; the tree form runs as fast as a plain scan.
    """

    packing: Packing
    local: dict  # this device's buffers, manual tiles gathered
    manual: frozenset
    tree: list | None  # the one layout's unpacked parameters, or None

    @staticmethod
    def of(plan: Plan, local: dict, manual: frozenset) -> _Params:
        single = len(set(_branch_keys(plan))) == 1
        tree = plan.packing.chunk_params(0, local, manual) if single else None
        return _Params(plan.packing, local, manual, tree)

    def params(self, c: int) -> list:
        return self.tree if self.tree is not None else self.packing.chunk_params(c, self.local, self.manual)

    def zeros(self):
        return jax.tree.map(jnp.zeros_like, self.tree if self.tree is not None else self.local)

    def add(self, c: int, sums, grads: list):
        if self.tree is not None:
            return jax.tree.map(jnp.add, sums, grads)
        return self.packing.add_chunk_grads(c, sums, grads)

    def packed(self, sums) -> dict:
        if self.tree is None:
            return sums
        return self.packing.add_chunk_grads(0, jax.tree.map(jnp.zeros_like, self.local), sums)


UNROLLED_LAYERS = 8  # on one stage, a chunk's stacked layers are unrolled by default up to this many


def _unrolls_layers(plan: Plan, c: int) -> bool:
    """On one stage (gradient accumulation over micro-batches) a chunk of a few stacked layers runs them
    unrolled inside its tick: there a ``lax.scan`` over layers inside the tick loop costs ~20% of the
    step on XLA:CPU, while compile time grows only up to ``UNROLLED_LAYERS`` copies of a layer (the
    tick loop stays rolled: flat in M). On several stages it measured no faster and compile time would
    grow with the layers per chunk, so only ``--unroll`` unrolls there."""
    rows = sum(p.rows[1] - p.rows[0] for p in plan.packing.chunks[c].pieces if p.rows is not None)
    return plan.unroll or (plan.schedule.stages == 1 and rows <= UNROLLED_LAYERS)


def _no_ops(schedule: Schedule, fuse_last: bool) -> np.ndarray:
    """``[T, S]`` bool: the action does nothing (idle; ``B`` and ``W`` of a fused last chunk that has
    nothing to send; ``B`` of chunk 0 when ``W`` computes its weight gradient)."""
    kind, chunk = schedule.kind, schedule.chunk
    last = schedule.chunks - 1
    fused = fuse_last & (chunk == last)
    no_op = (kind == IDLE) | (fused & ((kind == WEIGHT) | ((kind == BACKWARD) & (last == 0))))
    return no_op | (schedule.split_backward & (kind == BACKWARD) & (chunk == 0))


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
    branch_np: np.ndarray  # [T, S] branch index per tick and stage (numpy: each tick of a loop picks its branches)
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


ACTIONS = (FORWARD, BACKWARD, WEIGHT)


def _branch_table(plan: Plan, schedule: Schedule) -> np.ndarray:
    """``[T, S]`` index into the branch list: 0 idle, then F, B and W per distinct chunk."""
    keys = _branch_keys(plan)
    distinct = list(dict.fromkeys(keys))
    table = np.zeros(schedule.kind.shape, np.int32)
    for (t, s), kind in np.ndenumerate(schedule.kind):
        if kind != IDLE:
            k = distinct.index(keys[schedule.chunk[t, s]])
            table[t, s] = 1 + len(ACTIONS) * k + ACTIONS.index(kind)
    return table


class _Out(NamedTuple):
    """What an action gives back to its tick."""

    g_params: dict
    sums: dict
    send: jax.Array  # [b, A] the activation sent on or the input cotangent sent back (blank if none)
    keep: jax.Array  # [b, A] written back into the input's stash slot (fused last chunk: its cotangent)


def _branches(plan: Plan, access: _Params, head: Head, train: bool, key):
    """``[idle, F, B, W (chunk), ...]``, each ``(g_params, sums, tick) -> _Out``."""
    keys = _branch_keys(plan)
    first_chunk = {k: keys.index(k) for k in dict.fromkeys(keys)}
    fill = jnp.nan if plan.poison else 0.0

    def idle(g_params, sums, tick):
        blank = jnp.full(tick.h.shape, fill, tick.h.dtype)
        return _Out(g_params, sums, blank, tick.h)

    branches = [idle]
    for c in first_chunk.values():
        branches += _chunk_actions(plan, c, access, head, train, key)
    return branches


def _chunk_actions(plan: Plan, c: int, access: _Params, head: Head, train: bool, key):
    """The F, B and W actions of chunk ``c``.

    ``B`` alone (no ``W`` in the table) is the chunk's whole backward. With ``W`` in the table, ``B``
    gives the input cotangent and ``W`` the weight gradient, each from a re-run of the chunk (XLA drops
    the half of the backward an action does not return). The fused last chunk (:func:`fuses_last_chunk`)
    does all of it in its forward; its ``B`` only sends the kept cotangent, its ``W`` nothing.
    """
    last = c == len(plan.packing.chunks) - 1
    fused = last and plan.fuse_last and train
    split = plan.schedule.split_backward
    fill = jnp.nan if plan.poison else 0.0

    unroll_layers = _unrolls_layers(plan, c)

    def chunk_fn(params, h, tick: _Tick):
        """Chunk ``c`` from its input (the micro-batch for chunk 0) to its flat output, or to the head."""
        ctx = LayerContext(train, key, tick.ids)
        if c > 0:
            h = _unflatten(h, plan, c)
        for piece, piece_params in zip(plan.packing.chunks[c].pieces, params, strict=True):
            run_piece = lambda p, h, piece=piece: apply_part(piece.part, p, h, ctx, unroll=unroll_layers)
            if plan.policy is not None:
                run_piece = jax.checkpoint(run_piece, policy=plan.policy, prevent_cse=False)
            h = run_piece(piece_params, h)
        if last:
            return head(h, tick.y, tick.weights)
        return _flatten_pad(h, plan)

    def params():
        return access.params(c)

    def blank(tick):
        return jnp.full(tick.h.shape, fill, tick.h.dtype)

    def seed(out, tick):
        """The output cotangent: the loss's for the last chunk, the one that arrived otherwise."""
        return jax.tree.map(jnp.zeros_like, out) | {"loss": jnp.ones_like(out["loss"])} if last else tick.g

    def pull(tick, *, wrt_params: bool, wrt_input: bool):
        """``(outputs, parameter cotangents or None, input cotangent or blank)`` of one re-run."""
        p, h = params(), tick.x if c == 0 else tick.h
        wrt_input = wrt_input and c > 0
        if wrt_params and wrt_input:
            out, vjp = jax.vjp(lambda p, h: chunk_fn(p, h, tick), p, h)
            g_p, g_h = vjp(seed(out, tick))
        elif wrt_params:
            out, vjp = jax.vjp(lambda p: chunk_fn(p, h, tick), p)
            (g_p,), g_h = vjp(seed(out, tick)), blank(tick)
        elif wrt_input:
            out, vjp = jax.vjp(lambda h: chunk_fn(p, h, tick), h)
            g_p, (g_h,) = None, vjp(seed(out, tick))
        else:
            return None, None, blank(tick)
        return out, g_p, g_h.astype(tick.h.dtype)

    def add(g_params, g_p):
        return g_params if g_p is None else access.add(c, g_params, g_p)

    def forward(g_params, sums, tick: _Tick):
        if fused:
            out, g_p, g_h = pull(tick, wrt_params=True, wrt_input=True)
            keep = g_h if c > 0 else tick.h
            return _Out(add(g_params, g_p), jax.tree.map(jnp.add, sums, out), blank(tick), keep)
        out = chunk_fn(params(), tick.x if c == 0 else tick.h, tick)
        if last:
            return _Out(g_params, jax.tree.map(jnp.add, sums, out), blank(tick), tick.h)
        return _Out(g_params, sums, out, tick.h)

    def backward(g_params, sums, tick: _Tick):
        if fused or not train:  # fused: the forward left the cotangent in the input's slot
            return _Out(g_params, sums, tick.h if fused else blank(tick), tick.h)
        _, g_p, g_h = pull(tick, wrt_params=not split, wrt_input=True)
        return _Out(add(g_params, g_p), sums, g_h, tick.h)

    def weight(g_params, sums, tick: _Tick):
        if fused or not train:
            return _Out(g_params, sums, blank(tick), tick.h)
        _, g_p, _ = pull(tick, wrt_params=True, wrt_input=False)
        return _Out(add(g_params, g_p), sums, blank(tick), tick.h)

    return [forward, backward, weight]


def _loop_body(plan: Plan, loop, branches, tables: _Tables, data, stage):
    """One iteration of a loop: its ``period`` ticks, each with its own pairs and its own branches
    (only those its ticks use are compiled in)."""
    ticks = [
        _tick_fn(plan, branches, tables, data, stage, loop.ticks[:, k], loop.rounds[k]) for k in range(len(loop.rounds))
    ]

    def body(carry: _Carry, row):
        for k, tick in enumerate(ticks):
            carry = tick(carry, row[k])
        return carry, None

    return body


def _tick_fn(plan: Plan, branches, tables: _Tables, data, stage, tick_ids: np.ndarray, rounds):
    """One tick: receive, act, send (module docstring)."""
    x_MxB, y_MxB, w_MxB = data
    m_count = plan.schedule.microbatches
    ids_of = _example_ids(plan, x_MxB.shape[1])
    used = np.unique(tables.branch_np[tick_ids]).tolist()
    remap = jnp.asarray(np.searchsorted(used, np.arange(len(branches))).astype(np.int32))
    mine = [branches[i] for i in used]

    def tick(carry: _Carry, t):
        inputs = _receive(carry.inputs, carry.arrived, tables.recv_input[t], plan.masked)
        grads = _receive(carry.grads, carry.arrived, tables.recv_grad[t], plan.masked)
        m = jnp.clip(tables.microbatch[t], 0, m_count - 1)
        step = _Tick(
            x_MxB[m],
            y_MxB[m],
            w_MxB[m],
            inputs[jnp.maximum(tables.read_input[t], 0)],
            grads[jnp.maximum(tables.read_grad[t], 0)],
            ids_of(m),
        )
        if len(mine) == 1:
            out = mine[0](carry.g_params, carry.sums, step)
        else:
            out = jax.lax.switch(remap[tables.branch[t]], mine, carry.g_params, carry.sums, step)
        if plan.fuse_last:
            inputs = inputs.at[jnp.maximum(tables.read_input[t], 0)].set(out.keep)
        sent = tuple(jax.lax.ppermute(out.send, "pipe", list(pairs)) for pairs in rounds)
        arrived = sent + carry.arrived[len(sent) :]
        return _Carry(inputs, grads, arrived, out.g_params, out.sums)

    return tick


def _receive(stash, arrived: tuple, recv, masked: bool):
    """Write the message of round ``recv[0]`` into slot ``recv[1]`` (none if ``-1``)."""
    round_, slot = recv[0], recv[1]
    message = arrived[0]
    for i in range(1, len(arrived)):
        message = jnp.where(round_ == i, arrived[i], message)
    index = jnp.maximum(slot, 0)
    if masked:
        message = jnp.where(slot >= 0, message, stash[index])
    return stash.at[index].set(message)


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
