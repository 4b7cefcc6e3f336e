"""Tick tables built by list scheduling: each tick, every stage takes the first ready action its
schedule prefers (a *picker*: ``(stage, tick) -> action``).

Why: a schedule's rule ("a backward first when ready; a forward only while fewer than ``S - s`` are in
flight") is a few lines, and the table it gives is exact for any number of stages, micro-batches and
chunks. The pickers of the built-in schedules are here; :mod:`jaxmp.pipeline.registry` says which
schedule uses which, and what each promises.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from jaxmp.config import ConfigError
from jaxmp.pipeline.schedule import (
    ARRIVALS,
    BACKWARD,
    FORWARD,
    IDLE,
    INPUT,
    KINDS,
    SENDS_BACK,
    WEIGHT,
    Schedule,
    inputs_of,
    message_to,
)

IDLE_ACTION = (IDLE, -1, -1)
Picker = Callable[[int, int], tuple[int, int, int]]  # (stage, tick) -> (kind, micro-batch, chunk)


class State(NamedTuple):
    """What list scheduling knows at a tick: when each action ran (-1: not yet), and the messages the
    stages already picked at this tick send."""

    stages: int
    chunk_stage: tuple[int, ...]
    done: dict  # kind -> [M, C] tick
    sending: Counter  # (destination stage, is a cotangent) -> this tick's messages so far

    @staticmethod
    def start(stages: int, microbatches: int, chunk_stage: tuple[int, ...]) -> State:
        done = {kind: np.full((microbatches, len(chunk_stage)), -1) for kind in KINDS}
        return State(stages, chunk_stage, done, Counter())

    @property
    def microbatches(self) -> int:
        return self.done[FORWARD].shape[0]

    def mine(self, s: int) -> list[int]:
        return [c for c, where in enumerate(self.chunk_stage) if where == s]

    def ready(self, kind: int, m: int, c: int, t: int) -> bool:
        """Not run yet, its inputs are there, and its message would not make more than ``ARRIVALS`` of its
        kind reach its stage at the next tick."""
        message = message_to(self.chunk_stage, kind, c)
        ran = self.done[kind][m, c] >= 0 or (kind in SENDS_BACK and any(self.done[k][m, c] >= 0 for k in SENDS_BACK))
        if ran or (message is not None and self.sending[message] >= ARRIVALS):
            return False
        return all(
            any(0 <= self.done[k][m, chunk] < t for k in kinds)
            for kinds, chunk in inputs_of(kind, c, len(self.chunk_stage))
        )

    def waiting(self, s: int, since: int, until: int) -> int:
        """Micro-batches of stage ``s`` whose action ``since`` ran and whose action ``until`` did not."""
        mine = self.mine(s)
        return int(((self.done[since][:, mine] >= 0) & (self.done[until][:, mine] < 0)).sum())

    def first_ready(self, kind: int, order, t: int):
        return next(((kind, m, c) for m, c in order if self.ready(kind, m, c, t)), None)

    def by_microbatch(self, s: int, reverse: bool) -> list[tuple[int, int]]:
        """Lowest micro-batch first; a stage's chunks in order (reversed for the backward)."""
        mine = self.mine(s)[::-1] if reverse else self.mine(s)
        return [(m, c) for m in range(self.microbatches) for c in mine]

    def by_groups(self, s: int, reverse: bool) -> list[tuple[int, int]]:
        """Megatron's interleaved order: groups of ``S`` micro-batches through one chunk, then the next."""
        mine = self.mine(s)[::-1] if reverse else self.mine(s)
        count, size = self.microbatches, self.stages
        return [(m, c) for g in range(0, count, size) for c in mine for m in range(g, min(g + size, count))]


def list_schedule(state: State, pick: Picker, kinds: tuple[int, ...], name: str) -> Schedule:
    """Simulate tick by tick: every stage takes the action ``pick`` chooses, until each micro-batch ran
    each of ``kinds`` on every chunk."""
    rows: list[list[tuple[int, int, int]]] = []
    total, finished = state.microbatches * len(state.chunk_stage) * len(kinds), 0
    while finished < total:
        t = len(rows)
        state.sending.clear()
        row = []
        for s in range(state.stages):
            kind, m, c = pick(s, t)
            row.append((kind, m, c))
            message = message_to(state.chunk_stage, kind, c)
            if message is not None:
                state.sending[message] += 1
        for kind, m, c in row:
            if kind != IDLE:
                state.done[kind][m, c] = t
                finished += 1
        rows.append(row)
        if t > 4 * total + 4 * state.stages:
            raise ConfigError("this schedule cannot run this chunk placement (a chunk never becomes ready); try gpipe.")
    table = np.array(rows, dtype=np.int32).reshape(len(rows), state.stages, 3)
    kind, microbatch, chunk = table[..., 0], table[..., 1], table[..., 2]
    return Schedule(state.stages, state.microbatches, state.chunk_stage, kind, microbatch, chunk, name=name)


def gpipe_picker(state: State, backward: bool = True) -> Picker:
    """All forwards (lowest micro-batch first), then all backwards."""

    def pick(s, t):
        order = state.by_microbatch(s, False)
        if any(state.done[FORWARD][m, c] < 0 for m, c in order):
            return state.first_ready(FORWARD, order, t) or IDLE_ACTION
        if backward:
            return state.first_ready(BACKWARD, state.by_microbatch(s, True), t) or IDLE_ACTION
        return IDLE_ACTION

    return pick


def forward_picker(state: State) -> Picker:
    """Evaluation: the forwards alone, in GPipe's order (the same for every schedule)."""
    return gpipe_picker(state, backward=False)


def one_f_one_b_picker(state: State) -> Picker:
    """Megatron's order, run in order: warm-up forwards, then one forward and one backward, then the
    remaining backwards; a stage waits (idle) until its next action is ready."""
    sequences = []
    for s in range(state.stages):
        forwards, backwards = state.by_groups(s, False), state.by_groups(s, True)
        repeats = len(state.mine(s))
        warmup = (state.stages - s - 1) * (2 if repeats > 1 else 1) + (repeats - 1) * state.stages
        warmup = min(warmup, len(forwards))
        sequence = [(FORWARD, *a) for a in forwards[:warmup]]
        for i, b in enumerate(backwards):
            if warmup + i < len(forwards):
                sequence.append((FORWARD, *forwards[warmup + i]))
            sequence.append((BACKWARD, *b))
        sequences.append(sequence)

    def pick(s, t):
        for kind, m, c in sequences[s]:
            if state.done[kind][m, c] < 0:
                return (kind, m, c) if state.ready(kind, m, c, t) else IDLE_ACTION
        return IDLE_ACTION

    return pick


def zb_h1_picker(state: State) -> Picker:
    """A forward first while fewer than ``S - s`` micro-batches wait for their ``I`` (1F1B's warm-up) and
    fewer than ``S`` for their ``W`` (1F1B's peak stash, on every stage); else a ready ``I``; else the
    oldest ``W``. Stage 0 runs ``F I W`` in the steady state; later stages, which 1F1B leaves below that
    peak, put off their ``W`` s into the cool-down, where 1F1B idles."""

    def pick(s, t):
        room = state.waiting(s, FORWARD, INPUT) < state.stages - s
        room = room and state.waiting(s, FORWARD, WEIGHT) < state.stages
        action = state.first_ready(FORWARD, state.by_microbatch(s, False), t) if room else None
        action = action or state.first_ready(INPUT, state.by_microbatch(s, True), t)
        action = action or state.first_ready(WEIGHT, state.by_microbatch(s, False), t)
        return action or IDLE_ACTION

    return pick


def zb_v_picker(state: State) -> Picker:
    """A forward (the later chunk first) while fewer than ``2S`` of the stage's chunk-micro-batches wait
    for their ``W`` (1F1B's peak stash in bytes: a chunk is half of 1F1B's); else a ready ``I``; else the
    oldest ``W``."""

    def pick(s, t):
        later_first = state.by_microbatch(s, True)
        room = state.waiting(s, FORWARD, WEIGHT) < 2 * state.stages
        action = state.first_ready(FORWARD, later_first, t) if room else None
        action = action or state.first_ready(INPUT, later_first, t)
        action = action or state.first_ready(WEIGHT, later_first, t)
        return action or IDLE_ACTION

    return pick
