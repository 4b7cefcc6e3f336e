"""One tick of the executor, and the loops of ticks: receive, act, send.

Each tick, every device (1) writes the messages that arrived (at most ``ARRIVALS`` activations and as
many cotangents) into their stash slots, (2) runs its action of each lane in turn (one action, or an
overlapped pair's forward and then its backward; idle does no work), each picked by a switch that
updates its buffers in place (:func:`switch_in_place`), and (3) sends each round's message with one
``lax.ppermute`` (a pair's two messages go in two rounds). Which slot, micro-batch and branch a tick
uses comes from small integer tables (:class:`Tables`) worked out ahead in numpy (:mod:`.transfers`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp.parallel.mesh import PIPE
from jaxmp.pipeline.actions import Outcome, Tick, branch_keys, most_pieces
from jaxmp.pipeline.plan import Checks, Plan
from jaxmp.pipeline.residuals import ResidualStash
from jaxmp.pipeline.schedule import BACKWARD, FORWARD, INPUT, WEIGHT, Schedule
from jaxmp.pipeline.transfers import Transfers


class Carry(NamedTuple):
    inputs: jax.Array  # [slots, b, A] stashed activations
    grads: jax.Array  # [slots, b, A] cotangents waiting for their backward
    arrived: tuple  # per round: [b, A] the message the last permute delivered
    g_params: dict  # running sum of this stage's buffer cotangents
    sums: dict  # running sums of the head's outputs (loss, ...)
    residuals: tuple = ()  # per stash kind [count, residual slots, ...]: forwards' residuals for B and W


class Tables(NamedTuple):
    """This stage's integer tables, per tick (and per lane: the main action, the pair's backward)."""

    branch_np: np.ndarray  # [T, S, L] branch index per tick and stage (numpy: each tick of a loop picks its branches)
    branch: jax.Array  # [T, L] this stage's branch index per tick
    microbatch: jax.Array  # [T, L]
    recv_input: jax.Array  # [T, ARRIVALS, 2]
    recv_grad: jax.Array  # [T, ARRIVALS, 2]
    read_input: jax.Array  # [T, L]
    read_grad: jax.Array  # [T, L]
    residual_slot: jax.Array  # [T, L]
    first_rows: jax.Array  # [T, L, P] per piece of the action's chunk: its first row in its stack
    send_lane: jax.Array  # [T, rounds]: the lane whose message this stage sends in each round


def tables_for(plan: Plan, schedule: Schedule, transfers: Transfers, stage) -> Tables:
    branch = branch_table(plan, schedule)
    residual_slot = transfers.residual_slot
    if residual_slot is None:
        residual_slot = np.zeros(transfers.read_input.shape, np.int32)

    def mine(table):
        return jnp.asarray(table)[:, stage]

    return Tables(
        branch,
        mine(branch),
        mine(np.stack([lane.microbatch for lane in schedule.lanes], axis=-1)),
        mine(transfers.recv_input),
        mine(transfers.recv_grad),
        mine(transfers.read_input),
        mine(transfers.read_grad),
        mine(residual_slot),
        mine(first_rows_table(plan, schedule)),
        mine(transfers.send_lane),
    )


def first_rows_table(plan: Plan, schedule: Schedule) -> np.ndarray:
    """``[T, S, L, P]``: for the chunk of each action, the position in its stack of each piece's first
    layer (0 for a part that is no stack): dropout keys fold it in, so the masks follow the layer, not
    the chunk that runs it."""
    table = np.zeros((*schedule.kind.shape, len(schedule.lanes), most_pieces(plan)), np.int32)
    for t, s, lane, _, _, c in schedule.actions():
        for j, piece in enumerate(plan.packing.chunks[c].pieces):
            table[t, s, lane, j] = piece.rows[0] if piece.rows is not None else 0
    return table


ACTIONS = (FORWARD, BACKWARD, INPUT, WEIGHT)  # the branches of each distinct chunk, in this order


def branch_table(plan: Plan, schedule: Schedule) -> np.ndarray:
    """``[T, S, L]`` index into the branch list: 0 idle, then F, B, I and W per distinct chunk."""
    keys = branch_keys(plan)
    distinct = list(dict.fromkeys(keys))
    table = np.zeros((*schedule.kind.shape, len(schedule.lanes)), np.int32)
    for t, s, lane, kind, _, c in schedule.actions():
        table[t, s, lane] = 1 + len(ACTIONS) * distinct.index(keys[c]) + ACTIONS.index(kind)
    return table


def loop_body(plan: Plan, checks: Checks, loop, branches, tables: Tables, data):
    """One iteration of a loop: its ``period`` ticks, each with its own pairs and its own branches
    (only those its ticks use are compiled in)."""
    ticks = [
        tick_fn(plan, checks, branches, tables, data, loop.ticks[:, k], loop.rounds[k]) for k in range(len(loop.rounds))
    ]

    def body(carry: Carry, row):
        for k, tick in enumerate(ticks):
            carry = tick(carry, row[k])
        return carry, None

    return body


def tick_fn(plan: Plan, checks: Checks, branches, tables: Tables, data, tick_ids: np.ndarray, rounds):
    """One tick: receive, act (each lane in turn: an overlapped pair's forward, then its backward), send
    (module docstring). ``tick_ids`` are the ticks this function runs (a loop's position), ``rounds``
    their permutes' pairs."""
    lanes = range(tables.branch_np.shape[-1])
    used = [np.unique(tables.branch_np[tick_ids, :, lane]).tolist() for lane in lanes]
    recv = np.concatenate([plan.transfers.recv_input[tick_ids], plan.transfers.recv_grad[tick_ids]])
    arrivals = 1 + max((a for a in range(recv.shape[2]) if (recv[:, :, a, 1] >= 0).any()), default=0)
    read = _reader(plan, tables, data)

    def tick(carry: Carry, t):
        inputs, grads = carry.inputs, carry.grads
        for a in range(arrivals):
            inputs = _receive(inputs, carry.arrived, tables.recv_input[t, a], checks.masked)
            grads = _receive(grads, carry.arrived, tables.recv_grad[t, a], checks.masked)
        sends, state = [], None
        for lane in lanes:
            step = read(inputs, grads, carry.residuals, t, lane)
            blank = jnp.full(step.h.shape, checks.fill, step.h.dtype)  # what an idle stage sends
            state = Outcome(carry.g_params, carry.sums, blank, step.h, carry.residuals) if state is None else state
            state = switch_in_place(
                tables.branch[t, lane], {i: branches[i] for i in used[lane]}, state._replace(send=blank), step
            )
            sends.append(state.send)
            if plan.fuse_last:
                inputs = inputs.at[jnp.maximum(tables.read_input[t, lane], 0)].set(state.keep)
        sent = tuple(
            jax.lax.ppermute(_lane_message(sends, tables.send_lane[t, r]), PIPE, list(pairs))
            for r, pairs in enumerate(rounds)
        )
        return Carry(inputs, grads, sent + carry.arrived[len(sent) :], state.g_params, state.sums, state.res)

    return tick


def _reader(plan: Plan, tables: Tables, data):
    """``(inputs, grads, residuals, t, lane) -> Tick``: what the action of ``lane`` at tick ``t`` reads."""
    x_bMx, y_bMx, w_bMx = data
    ids_of = example_ids(plan, x_bMx.shape[0])

    def read(inputs, grads, residuals, t, lane: int) -> Tick:
        m = jnp.clip(tables.microbatch[t, lane], 0, plan.schedule.microbatches - 1)
        return Tick(
            microbatch_of(x_bMx, m),
            microbatch_of(y_bMx, m),
            microbatch_of(w_bMx, m),
            inputs[jnp.maximum(tables.read_input[t, lane], 0)],
            grads[jnp.maximum(tables.read_grad[t, lane], 0)],
            ids_of(m),
            residuals,
            tables.residual_slot[t, lane],
            tables.first_rows[t, lane],
        )

    return read


def _lane_message(sends: list, lane) -> jax.Array:
    """The message of lane ``lane`` (a traced index) among one tick's ``sends``."""
    message = sends[0]
    for i in range(1, len(sends)):
        message = jnp.where(lane == i, sends[i], message)
    return message


def switch_in_place(index, actions: dict, state: Outcome, step: Tick) -> Outcome:
    """Run ``actions[index]`` (``None``: idle) on ``state``, whose ``res`` holds the stash buffers.

    A ``lax.switch`` built of ``while`` loops that run once or not at all. Why not ``lax.switch``: XLA
    copies every buffer a conditional's branch returns unchanged (a forward's gradient sums, every tick)
    and keeps a branch's input and output buffers alive together; a loop updates its carry in place.
    """
    if len(actions) == 1:  # every stage takes this action at this tick
        (action,) = actions.values()
        return state if action is None else _apply_action(action, state, step)
    for i, action in actions.items():
        if action is not None:
            trips = (index == i).astype(jnp.int32)
            loop = (jnp.int32(0), state)
            state = jax.lax.while_loop(lambda loop, trips=trips: loop[0] < trips, _run_once(action, step), loop)[1]
    return state


def _run_once(action, step: Tick):
    """The body of :func:`switch_in_place`'s loop for ``action``."""

    def body(loop):
        k, state = loop
        # Tied to the trip count: else XLA hoists the action's work out of its loop, onto every tick.
        k, tick = jax.lax.optimization_barrier((k, step._replace(res=())))
        return k + 1, _apply_action(action, state, tick)

    return body


def _apply_action(action, state: Outcome, tick: Tick) -> Outcome:
    """``action`` on ``state``, its residuals written into their stash slots."""
    out = action(state.g_params, state.sums, tick._replace(res=state.res))
    return out._replace(res=ResidualStash.write(state.res, out.res or {}))


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


def example_ids(plan: Plan, b: int):
    """Global ids of this device's ``b`` rows of micro-batch ``m`` (``split_microbatches`` takes every
    M-th): dropout masks follow the global id, so they are the same on any mesh and schedule."""
    m_count = plan.schedule.microbatches

    def ids(m):
        first = jax.lax.axis_index(plan.batch_axes) * b if plan.batch_axes else 0
        return m + m_count * (first + jnp.arange(b, dtype=jnp.int32))

    return ids


def microbatch_of(a_bMx: jax.Array, m) -> jax.Array:
    """Micro-batch ``m`` of a :func:`split_microbatches` array: ``[b, ...]``."""
    return jax.lax.dynamic_index_in_dim(a_bMx, m, axis=1, keepdims=False)
