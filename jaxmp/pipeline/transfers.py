"""What a schedule table implies for the executor: the messages that cross ``pipe``, the stash slot each
one lands in, and the loops of ticks that share one pattern of collective-permutes.

Why worked out ahead, in numpy: the executor then only reads small integer tables per tick, each stage
keeps exactly as many stashed activations as the schedule has in flight (GPipe: M per chunk; 1F1B: at
most S), and a tick's messages go in as few collective-permutes as can carry them, so the traffic over
``pipe`` is the schedule's, whatever the mix of forwards and backwards in a tick (1F1B's steady state
sends activations one way and cotangents the other in one permute). A tick with an overlapped pair
sends two messages from one device, the forward's and the backward's, in two rounds; ``send_lane``
says which lane's message each device puts in each round.

Conventions (:func:`.schedule.message_to`): a forward message carries chunk ``c``'s output from
``chunk_stage[c]`` to ``chunk_stage[c+1]``; a backward message carries chunk ``c``'s input cotangent to
``chunk_stage[c-1]``.
A message sent at the end of tick ``t`` is written into its slot at the start of tick ``t + 1``, before
that tick's action; a slot is free again after the tick whose action last reads it.

A tick's messages form one *round* (a ``ppermute`` whose pairs send from and to each device at most
once), or more when a stage hears from several at once (some interleaved tables; a V placement, where
a stage hears from both neighbours and, at the turn, from itself). A stage receives at most
``ARRIVALS`` activations and as many cotangents per tick. Ticks are
grouped into loops (:class:`Loop`) of period 1 to ``PERIODS``: ticks at the same position of the period
share the union of their pairs, which must still be a partial permutation; 1F1B's steady state
alternates two patterns, so it runs as one loop of period 2, ZB-H1's (``F``, ``B``, ``W``) as one of
period 3 and ZB-V's (``F F B B W W``) as one of period 6.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxmp.config import ConfigError
from jaxmp.pipeline.schedule import ARRIVALS, FORWARD, IDLE, KINDS, SENDS_BACK, WEIGHT, Schedule, message_to

Pairs = tuple[tuple[int, int], ...]  # (source stage, destination stage) of one ppermute


class Loop(NamedTuple):
    """One ``lax.scan`` of the executor: ``ticks[i, k]`` runs at position ``k`` of iteration ``i``."""

    ticks: np.ndarray  # [iterations, period]
    rounds: tuple[tuple[Pairs, ...], ...]  # per position: the pairs of each round


class Transfers(NamedTuple):
    """Integer tables ``[ticks, stages]`` (``-1``: none) and the loops of the exchange."""

    input_slots: int  # activation stash slots per stage (at least 1)
    grad_slots: int  # cotangent slots per stage (at least 1)
    rounds: int  # the most rounds any tick has
    recv_input: np.ndarray  # [T, S, ARRIVALS, 2]: (round, slot) of each activation arriving
    recv_grad: np.ndarray  # [T, S, ARRIVALS, 2]: (round, slot) of each cotangent arriving
    read_input: np.ndarray  # [T, S, L]: slot each lane's action reads its input from (-1: the micro-batch itself)
    read_grad: np.ndarray  # [T, S, L]: slot B, I or W reads its output cotangent from (-1: the loss)
    send_lane: np.ndarray  # [T, S, rounds]: the lane whose message the device sends in each round
    loops: tuple[Loop, ...]
    residual_slots: int = 0  # per stage: forwards whose residuals wait for their backward
    residual_slot: np.ndarray | None = None  # [T, S, L]: slot F writes or B/I/W reads (0 for other actions)

    @property
    def permutes(self) -> int:
        """``ppermute`` s per step (each moves one ``[b, A]`` message per device that sends)."""
        return sum(len(loop.ticks) * sum(len(r) for r in loop.rounds) for loop in self.loops)


class _Message(NamedTuple):
    source: int
    dest: int
    sent: int  # tick
    use: int  # the last tick that reads it
    key: tuple[int, int]  # (micro-batch, chunk that reads it)
    grad: bool  # a cotangent (else an activation)
    lane: int  # the lane of the action that sends it


def work_out_transfers(
    schedule: Schedule, no_op: np.ndarray | None = None, stashes: np.ndarray | None = None
) -> Transfers:
    """The messages, slots and loops of ``schedule``. ``no_op[t, s, lane]``: the action does nothing
    (idle, or a backward whose work the executor did elsewhere); a tick where every stage does nothing
    and none receives anything is left out of the loops. ``stashes[t, s, lane]``: that forward keeps its
    residuals for its backward, each in a slot of its stage from the forward to its last use."""
    messages = _messages(schedule)
    t_count, s_count = schedule.ticks, schedule.stages
    round_of: dict[_Message, int] = {}  # each message's round in its tick
    rounds_of = [_rounds([m for m in messages if m.sent == t], round_of) for t in range(t_count)]
    recv_input, input_slot, n_in = _assign_slots([m for m in messages if not m.grad], round_of, t_count, s_count)
    recv_grad, grad_slot, n_grad = _assign_slots([m for m in messages if m.grad], round_of, t_count, s_count)
    shape = (t_count, s_count, len(schedule.lanes))
    read_input, read_grad = np.full(shape, -1, np.int32), np.full(shape, -1, np.int32)
    for t, s, lane, kind, m, c in schedule.actions():
        read_input[t, s, lane] = input_slot.get((m, c), -1)
        if kind != FORWARD:
            read_grad[t, s, lane] = grad_slot.get((m, c), -1)
    rounds = max([1, *(len(r) for r in rounds_of)])
    send_lane = np.zeros((t_count, s_count, rounds), np.int32)
    for message in messages:
        send_lane[message.sent, message.source, round_of[message]] = message.lane
    arrives = (recv_input[..., 1] >= 0).any(axis=(1, 2)) | (recv_grad[..., 1] >= 0).any(axis=(1, 2))
    idle = np.stack([lane.kind == IDLE for lane in schedule.lanes], axis=-1) if no_op is None else no_op
    kept = np.flatnonzero(~idle.all(axis=(1, 2)) | arrives)
    loops = _loops([(int(t), rounds_of[t]) for t in kept])
    n_res, res_slot = _residual_slots(schedule, stashes)
    return Transfers(
        n_in, n_grad, rounds, recv_input, recv_grad, read_input, read_grad, send_lane, loops, n_res, res_slot
    )


def _residual_slots(schedule: Schedule, stashes: np.ndarray | None):
    """Interval colouring of the stashing forwards: ``(slots, [T, S, L] slot per action)``; other actions
    get slot 0 (the executor writes back what they read: nothing changes)."""
    if stashes is None or not stashes.any():
        return 0, None
    table = np.full(stashes.shape, -1, np.int32)
    ends: dict[int, list[int]] = {s: [] for s in range(schedule.stages)}
    for t, s, lane in sorted(zip(*np.nonzero(stashes), strict=True)):
        m, c = (int(a[t, s]) for a in schedule.lanes[lane][1:])
        use = schedule.last_use(m, c)
        slot = next((k for k, end in enumerate(ends[s]) if end < t), len(ends[s]))
        if slot == len(ends[s]):
            ends[s].append(use)
        ends[s][slot] = use
        table[t, s, lane] = slot
        for kind in KINDS[1:]:
            tick, where = schedule.locate(kind, m, c)
            if tick >= 0:
                table[tick, s, where] = slot
    table[table < 0] = 0
    return max(len(v) for v in ends.values()), table


def _messages(schedule: Schedule) -> list[_Message]:
    place = schedule.chunk_stage
    out = []
    for m in range(schedule.microbatches):
        for c in range(schedule.chunks):
            f_tick, f_lane = schedule.locate(FORWARD, m, c)
            if to := message_to(place, FORWARD, c):
                use = schedule.last_use(m, c + 1)
                out.append(_Message(place[c], to[0], f_tick, use, (m, c + 1), False, f_lane))
            b_tick, b_lane = max(schedule.locate(kind, m, c) for kind in SENDS_BACK)
            if (to := message_to(place, SENDS_BACK[0], c)) and b_tick >= 0:
                use = max(schedule.sent_back(m, c - 1), schedule.when(WEIGHT, m, c - 1))
                out.append(_Message(place[c], to[0], b_tick, use, (m, c - 1), True, b_lane))
    return out


def _rounds(sent: list[_Message], round_of: dict) -> tuple[Pairs, ...]:
    """One tick's messages as rounds: activations first, each in the first round where its source sends
    nothing yet and its destination hears nothing yet (written into ``round_of``)."""
    rounds: list[list[tuple[int, int]]] = []
    for message in sorted(sent, key=lambda m: m.grad):
        i = next(
            (i for i, r in enumerate(rounds) if all(d != message.dest and s != message.source for s, d in r)),
            len(rounds),
        )
        if i == len(rounds):
            rounds.append([])
        rounds[i].append((message.source, message.dest))
        round_of[message] = i
    return tuple(tuple(sorted(r)) for r in rounds)


def _assign_slots(messages: list[_Message], round_of: dict, ticks: int, stages: int):
    """Interval colouring per stage: each message gets the lowest slot free since before it arrives."""
    recv = np.full((ticks + 1, stages, ARRIVALS, 2), -1, np.int32)
    slot_of: dict[tuple[int, int], int] = {}
    free_after: dict[int, list[int]] = {s: [] for s in range(stages)}  # per slot: last tick it is read
    for message in sorted(messages, key=lambda msg: (msg.sent, msg.dest)):
        arrive, stage = message.sent + 1, message.dest
        ends = free_after[stage]
        slot = next((k for k, end in enumerate(ends) if end < arrive), len(ends))
        if slot == len(ends):
            ends.append(message.use)
        ends[slot] = message.use
        slot_of[message.key] = slot
        free = np.flatnonzero(recv[arrive, stage, :, 0] < 0)
        if not len(free):
            kind = "cotangents" if message.grad else "activations"
            raise ConfigError(
                f"this placement makes more than {ARRIVALS} {kind} reach stage {stage} at tick {arrive}; place "
                f"chunks so that each stage hears from at most {ARRIVALS} others at a time."
            )
        recv[arrive, stage, free[0]] = (round_of[message], slot)
    slots = max([1, *(len(v) for v in free_after.values())])
    return recv[:ticks], slot_of, slots


def _merge(a: tuple[Pairs, ...], b: tuple[Pairs, ...]) -> tuple[Pairs, ...] | None:
    """Round-by-round union of two ticks' rounds, or None if some round would send or hear twice."""
    out = []
    for i in range(max(len(a), len(b))):
        pairs = set(a[i] if i < len(a) else ()) | set(b[i] if i < len(b) else ())
        if len({s for s, _ in pairs}) < len(pairs) or len({d for _, d in pairs}) < len(pairs):
            return None
        out.append(tuple(sorted(pairs)))
    return tuple(out)


def _longest_loop(ticks, start: int, period: int):
    """The longest loop of ``period`` from ``ticks[start]``: (length, rounds per position)."""
    positions: list[tuple[Pairs, ...]] = []
    length = 0
    for i in range(start, len(ticks)):
        k = (i - start) % period
        merged = ticks[i][1] if k >= len(positions) else _merge(positions[k], ticks[i][1])
        if merged is None:
            break
        if k < len(positions):
            positions[k] = merged
        else:
            positions.append(merged)
        length += 1
    if period > 1:
        length -= length % period
    return length, positions


PERIODS = 6  # the longest repeating pattern of ticks a loop runs (ZB-V's steady state: F, F, B, B, W, W)


def _loops(ticks: list[tuple[int, tuple[Pairs, ...]]]) -> tuple[Loop, ...]:
    """Greedy: from each tick, the loop of period 1 to ``PERIODS`` that covers the most ticks per tick
    it compiles (its period; ties: the longer, then the shorter period), so the number of loops, and
    with it compile time, does not grow with M."""
    loops, i = [], 0
    while i < len(ticks):
        runs = [(_longest_loop(ticks, i, p)[0], p) for p in range(1, PERIODS + 1)]
        _, length, period = max((length / p, length, -p) for length, p in runs if length)
        period = -period
        _, positions = _longest_loop(ticks[: i + length], i, period)  # the unions of exactly the chosen ticks
        grid = np.array([t for t, _ in ticks[i : i + length]], np.int32).reshape(-1, period)
        loops.append(Loop(grid, tuple(positions)))
        i += length
    return tuple(loops)
