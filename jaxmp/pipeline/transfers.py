"""What a schedule table implies for the executor: the messages that cross ``pipe``, the stash slot each
one lands in, and the phases of ticks that share one pattern of collective-permutes.

Why worked out ahead, in numpy: the executor then only reads small integer tables per tick, each stage
keeps exactly as many stashed activations as the schedule has in flight (GPipe: M per chunk; 1F1B: at
most S), and a tick sends only in the directions some stage needs, so the traffic over ``pipe`` is the
schedule's and not twice it.

Conventions: a forward message carries chunk ``c``'s output from ``chunk_stage[c]`` to
``chunk_stage[c+1]``; a backward message carries chunk ``c``'s input cotangent to ``chunk_stage[c-1]``.
Each travels by a ring shift ``d`` (``(to - from) % S``): one ``ppermute`` per distinct shift.
A message sent at the end of tick ``t`` is written into its slot at the start of tick ``t + 1``, before
that tick's action; a slot is free again after the tick whose action last reads it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxmp.config import ConfigError
from jaxmp.pipeline.schedule import BACKWARD, FORWARD, Schedule


class Transfers(NamedTuple):
    """Integer tables ``[ticks, stages]`` (``-1``: none) and the static shape of the exchange."""

    forward_shifts: tuple[int, ...]  # ring shifts activations travel by
    backward_shifts: tuple[int, ...]  # ring shifts cotangents travel by (towards lower stages: S - d)
    input_slots: int  # activation stash slots per stage (at least 1)
    grad_slots: int  # cotangent slots per stage (at least 1)
    recv_input: np.ndarray  # [T, S, 2]: (index into forward_shifts, slot) of the activation arriving
    recv_grad: np.ndarray  # [T, S, 2]: (index into backward_shifts, slot) of the cotangent arriving
    read_input: np.ndarray  # [T, S]: slot the action reads its input from (-1: the micro-batch itself)
    read_grad: np.ndarray  # [T, S]: slot the backward reads its output cotangent from (-1: the loss)
    phases: tuple[tuple[int, int, tuple[bool, ...], tuple[bool, ...]], ...]  # (start, stop, fwd on, bwd on)


def plan_transfers(schedule: Schedule) -> Transfers:
    """The messages, slots and phases of ``schedule`` (module docstring)."""
    s_count, c_count, t_count = schedule.stages, schedule.chunks, schedule.ticks
    place = schedule.chunk_stage
    fwd = sorted({(place[c + 1] - place[c]) % s_count for c in range(c_count - 1)})
    bwd = sorted({(place[c - 1] - place[c]) % s_count for c in range(1, c_count)})
    inputs, grads = [], []  # (stage, arrival tick, last use tick, kind index, key)
    send_f = np.zeros((t_count, len(fwd)), bool)
    send_b = np.zeros((t_count, len(bwd)), bool)
    for m in range(schedule.microbatches):
        for c in range(c_count):
            f_tick, b_tick = schedule.when(FORWARD, m, c), schedule.when(BACKWARD, m, c)
            if c + 1 < c_count:
                use = schedule.when(BACKWARD, m, c + 1)
                use = use if use >= 0 else schedule.when(FORWARD, m, c + 1)
                shift = fwd.index((place[c + 1] - place[c]) % s_count)
                inputs.append((place[c + 1], f_tick + 1, use, shift, (m, c + 1)))
                send_f[f_tick, shift] = True
            if c > 0 and b_tick >= 0:
                shift = bwd.index((place[c - 1] - place[c]) % s_count)
                grads.append((place[c - 1], b_tick + 1, schedule.when(BACKWARD, m, c - 1), shift, (m, c - 1)))
                send_b[b_tick, shift] = True
    recv_input, input_slot, n_in = _assign_slots(inputs, t_count, s_count)
    recv_grad, grad_slot, n_grad = _assign_slots(grads, t_count, s_count)
    read_input = np.full((t_count, s_count), -1, np.int32)
    read_grad = np.full((t_count, s_count), -1, np.int32)
    for (t, s), kind in np.ndenumerate(schedule.kind):
        key = (int(schedule.microbatch[t, s]), int(schedule.chunk[t, s]))
        if kind in (FORWARD, BACKWARD):
            read_input[t, s] = input_slot.get(key, -1)
        if kind == BACKWARD:
            read_grad[t, s] = grad_slot.get(key, -1)
    phases = _phases(send_f, send_b)
    return Transfers(tuple(fwd), tuple(bwd), n_in, n_grad, recv_input, recv_grad, read_input, read_grad, phases)


def _assign_slots(messages, ticks: int, stages: int):
    """Interval colouring per stage: each message gets the lowest slot free since before it arrives."""
    recv = np.full((ticks + 1, stages, 2), -1, np.int32)
    slot_of: dict[tuple[int, int], int] = {}
    free_after: dict[int, list[int]] = {s: [] for s in range(stages)}  # per slot: last tick it is read
    for stage, arrive, use, shift, key in sorted(messages, key=lambda msg: (msg[1], msg[0])):
        ends = free_after[stage]
        slot = next((k for k, end in enumerate(ends) if end < arrive), len(ends))
        if slot == len(ends):
            ends.append(use)
        ends[slot] = use
        slot_of[key] = slot
        if recv[arrive, stage, 0] >= 0:
            raise ConfigError(
                f"this placement makes two messages reach stage {stage} at tick {arrive}; place chunks so that "
                "each stage hears from one neighbour at a time."
            )
        recv[arrive, stage] = (shift, slot)
    slots = max([1, *(len(v) for v in free_after.values())])
    return recv[:ticks], slot_of, slots


def _phases(send_f: np.ndarray, send_b: np.ndarray):
    """Maximal runs of ticks that send in the same directions (one compiled loop each).

    A tick that sends nothing joins the phase before it (its permutes then carry nothing anyone reads):
    one loop fewer to compile, for one message per direction at the end of the forward and backward
    phases.
    """
    phases: list[list] = []
    for t in range(len(send_f)):
        signature = (tuple(bool(v) for v in send_f[t]), tuple(bool(v) for v in send_b[t]))
        silent = not any(signature[0]) and not any(signature[1])
        if phases and (signature == (phases[-1][2], phases[-1][3]) or silent):
            phases[-1][1] = t + 1
        else:
            phases.append([t, t + 1, *signature])
    return tuple(tuple(p) for p in phases)
