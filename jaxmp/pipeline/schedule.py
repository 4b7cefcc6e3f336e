"""Pipeline schedules as data: for every tick and stage, one action (forward ``F``, backward ``B`` or
weight-gradient ``W`` of micro-batch ``m`` on chunk ``c``) or idle.

Why a table: the executor (:mod:`jaxmp.pipeline.engine`) only reads it, so the bubble, the stash and the
messages can be counted, drawn and tested without running anything, and a new schedule is a new table
on the same executor. A user can write one: fill :class:`Schedule`'s three ``[ticks, stages]`` arrays
and call :func:`validate`.

A model is cut into chunks ``0..C-1`` of consecutive layers; ``chunk_stage[c]`` is the device along
``pipe`` that runs chunk ``c`` (contiguous: ``c``; circular repeats: ``c % S``; any placement). The
forward of micro-batch ``m`` visits the chunks in order, its backward in reverse. A message sent at the
end of tick ``t`` (an activation to the next chunk's stage, or an input cotangent to the previous one)
is there at the start of tick ``t + 1``, so every action comes strictly after the ones it needs.

``B`` is the whole backward of a chunk, unless the table also has ``W`` actions: then ``B`` computes
only the input cotangent (on the critical path) and ``W`` the weight gradient, which can wait.

Actions print in torch.distributed.pipelining's notation (:func:`action_text`), ``{chunk}{kind}{micro-batch}``:
``2F0`` is chunk 2's forward of micro-batch 0, ``0B3`` a full backward, and under a split ``0I3`` the
input-cotangent backward (jaxmp's ``B``) and ``0W3`` its weight gradient. So a table reads the same here,
in torch's logs and in its per-rank CSV files (:mod:`jaxmp.pipeline.notation` reads and writes those).

Every table is built by list scheduling: each tick, every stage takes the first ready action its
schedule prefers.

- ``gpipe`` (Huang et al. 2019): all forwards (lowest micro-batch first), then all backwards. Bubble
  ``(S-1)/(M+S-1)``; every stage stashes all ``M`` micro-batches (``R*M`` with ``R`` chunks each).
- ``1f1b`` (PipeDream-Flush, Narayanan et al. 2021): a ready backward first; a forward only while stage
  ``s`` holds fewer than ``S - s`` micro-batches. Same bubble as GPipe, at most ``S`` stashed.
- ``interleaved-1f1b`` (Megatron, Narayanan et al. 2021), ``R`` chunks per stage placed circularly:
  forwards in groups of ``S`` micro-batches per chunk, a backward first when ready, at most
  ``2(S - s - 1) + (R - 1)S + 1`` in flight. Bubble ``(S-1)/(R*M+S-1)`` when ``S`` divides ``M``.
- ``zb-h1`` (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): 1F1B's warm-up, and at most ``S``
  micro-batches in flight on every stage (a micro-batch's stash is freed by its ``W``): 1F1B's peak
  stash. Stage 0 runs ``F B W`` in turn; the later stages put off their ``W`` s into the cool-down,
  where 1F1B idles. In ticks (one action each, ``3M`` per stage) the bubble is ``(S-1)/(3M+S-1)``:
  a third of 1F1B's ``3(S-1)`` idle action-slots when ``F``, ``B`` and ``W`` cost the same.
- ``zb-v`` (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"): ``2S`` chunks, two per
  stage in a V (chunk ``c`` on stage ``c`` going down, chunk ``2S-1-c`` coming back up), so stage 0
  holds the first and the last chunk and a micro-batch turns around on stage ``S-1``. Each stage runs
  a forward (its later chunk first) while fewer than ``2S`` of its chunk-micro-batches wait for their
  ``W``, else a ready ``B``, else the oldest ``W``. A chunk is half of 1F1B's, so ``2S`` stashed is
  1F1B's peak in bytes; in ticks (``6M`` per stage, each half of 1F1B's) the bubble is
  ``(S-1)/(6M+S-1)``: in time, half of ZB-H1's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from jaxmp.config import ConfigError

IDLE, FORWARD, BACKWARD, WEIGHT = 0, 1, 2, 3
ARRIVALS = 2  # the most activations (and the most cotangents) the executor receives per stage and tick
KIND_NAMES = {IDLE: "idle", FORWARD: "F", BACKWARD: "B", WEIGHT: "W"}


def action_text(kind: int, microbatch: int, chunk: int, split: bool = False) -> str:
    """One action in torch's notation: ``{chunk}{F|B|I|W}{micro-batch}``; a backward is ``I`` (input
    cotangent only) when ``split`` (the table has ``W`` actions), else ``B`` (the whole backward)."""
    if kind == BACKWARD and split:
        return f"{chunk}I{microbatch}"
    return f"{chunk}{KIND_NAMES.get(kind, f'<kind {kind}>')}{microbatch}"


class Schedule(NamedTuple):
    """Which action each stage runs at each tick: ``kind`` (IDLE/FORWARD/BACKWARD/WEIGHT), micro-batch,
    chunk."""

    stages: int
    microbatches: int
    chunk_stage: tuple[int, ...]  # [C]: the stage (device along pipe) of each chunk
    kind: np.ndarray  # [ticks, stages] int
    microbatch: np.ndarray  # [ticks, stages] int, -1 when idle
    chunk: np.ndarray  # [ticks, stages] int, -1 when idle
    name: str = "gpipe"

    @property
    def ticks(self) -> int:
        return self.kind.shape[0]

    @property
    def chunks(self) -> int:
        return len(self.chunk_stage)

    @property
    def repeats(self) -> int:
        """The most chunks any stage holds (virtual stages per device)."""
        return max(self.chunk_stage.count(s) for s in range(self.stages))

    @property
    def split_backward(self) -> bool:
        """Whether the backward is split into ``B`` (input cotangent) and ``W`` (weight gradient)."""
        return bool((self.kind == WEIGHT).any())

    @property
    def busy(self) -> np.ndarray:
        """``[ticks, stages]`` bool: the stage does real work."""
        return self.kind != IDLE

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-ticks over all stage-ticks."""
        return 1.0 - float(self.busy.mean())

    def text(self, tick: int, stage: int) -> str:
        """The action at ``[tick, stage]`` in torch's notation (:func:`action_text`), ``.`` when idle."""
        kind = int(self.kind[tick, stage])
        if kind == IDLE:
            return "."
        return action_text(kind, int(self.microbatch[tick, stage]), int(self.chunk[tick, stage]), self.split_backward)

    def when(self, kind: int, microbatch: int, chunk: int) -> int:
        """The tick of one action (-1 if the table does not have it)."""
        stage = self.chunk_stage[chunk]
        hits = np.flatnonzero(
            (self.kind[:, stage] == kind) & (self.microbatch[:, stage] == microbatch) & (self.chunk[:, stage] == chunk)
        )
        return int(hits[0]) if len(hits) else -1

    def last_use(self, microbatch: int, chunk: int) -> int:
        """The tick of the last action that reads this micro-batch's stashed input of ``chunk``."""
        return max(self.when(kind, microbatch, chunk) for kind in (FORWARD, BACKWARD, WEIGHT))

    def stashed(self) -> np.ndarray:
        """``[stages]``: the most micro-batch inputs any stage keeps at once (forward done, last use not)."""
        live = np.zeros((self.ticks, self.stages), int)
        for m in range(self.microbatches):
            for c in range(self.chunks):
                f = self.when(FORWARD, m, c)
                live[f : max(self.last_use(m, c), f + 1), self.chunk_stage[c]] += 1
        return live.max(axis=0)


def contiguous_placement(stages: int, repeats: int = 1) -> tuple[int, ...]:
    """Chunk ``c`` on stage ``c % S``: contiguous for one chunk per stage, circular for more."""
    return tuple(c % stages for c in range(stages * repeats))


def v_placement(stages: int) -> tuple[int, ...]:
    """``zb-v``'s chunks: ``0, 1, ..., S-1, S-1, ..., 1, 0``."""
    return (*range(stages), *reversed(range(stages)))


def build_schedule(
    name: str,
    stages: int,
    microbatches: int,
    repeats: int = 1,
    *,
    placement: Sequence[int] | None = None,
    backward: bool = True,
) -> Schedule:
    """The table ``name`` (one of :data:`SCHEDULES`); ``backward=False`` gives the forward-only table
    of evaluation (the same forwards for every schedule)."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {name!r}; choose from {', '.join(SCHEDULES)}.")
    for label, value in (("stages", stages), ("microbatches", microbatches), ("repeats", repeats)):
        if value < 1:
            raise ConfigError(f"pipeline {label} must be positive, got {value}.")
    default = v_placement(stages) if name == "zb-v" else contiguous_placement(stages, repeats)
    chunk_stage = tuple(placement) if placement is not None else default
    if name == "zb-h1" and len(chunk_stage) != stages:
        raise ConfigError(
            "--schedule zb-h1 runs one chunk per stage; drop --repeats/--placement or use interleaved-1f1b."
        )
    if name == "zb-v" and (chunk_stage != v_placement(stages) or repeats not in (1, 2)):
        raise ConfigError("--schedule zb-v places two chunks per stage in a V; drop --repeats/--placement.")
    microbatches = 1 if name == "naive" else microbatches
    done = {k: np.full((microbatches, len(chunk_stage)), -1) for k in (FORWARD, BACKWARD, WEIGHT)}
    state = _State(stages, chunk_stage, done, Counter())
    if not backward:
        kinds, pick = (FORWARD,), _gpipe_picker(state, backward=False)
    else:
        kinds = (FORWARD, BACKWARD, WEIGHT) if name in ("zb-h1", "zb-v") else (FORWARD, BACKWARD)
        pick = SCHEDULES[name](state)
    schedule = _list_schedule(state, pick, kinds)._replace(name=name)
    validate(schedule, backward=backward)
    return schedule


def gpipe(stages: int, microbatches: int, repeats: int = 1, **options) -> Schedule:
    """All forwards, then all backwards (module docstring)."""
    return build_schedule("gpipe", stages, microbatches, repeats, **options)


def one_f_one_b(stages: int, microbatches: int, repeats: int = 1, **options) -> Schedule:
    """1F1B, interleaved when a stage holds several chunks (module docstring)."""
    name = "interleaved-1f1b" if repeats > 1 else "1f1b"
    return build_schedule(name, stages, microbatches, repeats, **options)


def zb_h1(stages: int, microbatches: int, **options) -> Schedule:
    """Zero-bubble ZB-H1 (module docstring)."""
    return build_schedule("zb-h1", stages, microbatches, **options)


def zb_v(stages: int, microbatches: int, **options) -> Schedule:
    """Zero-bubble ZB-V: two chunks per stage in a V (module docstring)."""
    return build_schedule("zb-v", stages, microbatches, **options)


def naive(stages: int, repeats: int = 1, **options) -> Schedule:
    """Vanilla model parallelism: one micro-batch, F1..FS then BS..B1; each stage busy 2 of 2S ticks."""
    return build_schedule("naive", stages, 1, repeats, **options)


def message_to(chunk_stage: tuple[int, ...], kind: int, c: int) -> tuple[int, bool] | None:
    """``(destination stage, is a cotangent)`` of the message chunk ``c``'s action sends, if any: a
    forward's output to the next chunk's stage, a backward's input cotangent to the previous one's."""
    if kind == FORWARD and c + 1 < len(chunk_stage):
        return chunk_stage[c + 1], False
    if kind == BACKWARD and c > 0:
        return chunk_stage[c - 1], True
    return None


class _State(NamedTuple):
    """What list scheduling knows at a tick: when each action ran (-1: not yet), and the messages the
    stages already picked at this tick send."""

    stages: int
    chunk_stage: tuple[int, ...]
    done: dict  # kind -> [M, C] tick
    sending: Counter  # (destination stage, is a cotangent) -> this tick's messages so far

    @property
    def microbatches(self) -> int:
        return self.done[FORWARD].shape[0]

    def mine(self, s: int) -> list[int]:
        return [c for c, where in enumerate(self.chunk_stage) if where == s]

    def ready(self, kind: int, m: int, c: int, t: int) -> bool:
        """Its inputs are there, and its message would not make more than ``ARRIVALS`` of its kind reach
        its stage at the next tick."""
        message = message_to(self.chunk_stage, kind, c)
        if self.done[kind][m, c] >= 0 or (message is not None and self.sending[message] >= ARRIVALS):
            return False
        if kind == FORWARD:
            return c == 0 or 0 <= self.done[FORWARD][m, c - 1] < t
        if kind == BACKWARD:
            after = c == len(self.chunk_stage) - 1 or 0 <= self.done[BACKWARD][m, c + 1] < t
            return 0 <= self.done[FORWARD][m, c] < t and after
        return 0 <= self.done[BACKWARD][m, c] < t

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


IDLE_ACTION = (IDLE, -1, -1)
Picker = Callable[[int, int], tuple[int, int, int]]  # (stage, tick) -> action


def _list_schedule(state: _State, pick: Picker, kinds: tuple[int, ...]) -> Schedule:
    """Simulate tick by tick: every stage takes the action ``pick`` chooses."""
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
    return Schedule(state.stages, state.microbatches, state.chunk_stage, table[..., 0], table[..., 1], table[..., 2])


def _gpipe_picker(state: _State, backward: bool = True) -> Picker:
    def pick(s, t):
        order = state.by_microbatch(s, False)
        if any(state.done[FORWARD][m, c] < 0 for m, c in order):
            return state.first_ready(FORWARD, order, t) or IDLE_ACTION
        if backward:
            return state.first_ready(BACKWARD, state.by_microbatch(s, True), t) or IDLE_ACTION
        return IDLE_ACTION

    return pick


def _one_f_one_b_picker(state: _State) -> Picker:
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


def _zb_h1_picker(state: _State) -> Picker:
    """A forward first while fewer than ``S - s`` micro-batches wait for their ``B`` (1F1B's warm-up) and
    fewer than ``S`` for their ``W`` (1F1B's peak stash, on every stage); else a ready ``B``; else the
    oldest ``W``. Stage 0 runs ``F B W`` in the steady state; later stages, which 1F1B leaves below that
    peak, put off their ``W`` s into the cool-down, where 1F1B idles."""

    def pick(s, t):
        room = state.waiting(s, FORWARD, BACKWARD) < state.stages - s
        room = room and state.waiting(s, FORWARD, WEIGHT) < state.stages
        action = state.first_ready(FORWARD, state.by_microbatch(s, False), t) if room else None
        action = action or state.first_ready(BACKWARD, state.by_microbatch(s, True), t)
        action = action or state.first_ready(WEIGHT, state.by_microbatch(s, False), t)
        return action or IDLE_ACTION

    return pick


def _zb_v_picker(state: _State) -> Picker:
    """A forward (the later chunk first) while fewer than ``2S`` of the stage's chunk-micro-batches wait
    for their ``W`` (1F1B's peak stash in bytes: a chunk is half of 1F1B's); else a ready ``B``; else the
    oldest ``W`` (module docstring)."""

    def pick(s, t):
        later_first = state.by_microbatch(s, True)
        room = state.waiting(s, FORWARD, WEIGHT) < 2 * state.stages
        action = state.first_ready(FORWARD, later_first, t) if room else None
        action = action or state.first_ready(BACKWARD, later_first, t)
        action = action or state.first_ready(WEIGHT, later_first, t)
        return action or IDLE_ACTION

    return pick


SCHEDULES: dict[str, Callable[[_State], Picker]] = {
    "gpipe": _gpipe_picker,
    "1f1b": _one_f_one_b_picker,
    "interleaved-1f1b": _one_f_one_b_picker,
    "zb-h1": _zb_h1_picker,
    "zb-v": _zb_v_picker,
    "naive": _gpipe_picker,
}


def validate(schedule: Schedule, *, backward: bool = True) -> None:
    """Raise ``ConfigError`` naming the first bad slot: every action once, on its chunk's stage, after
    the actions it needs (forward after the previous chunk's forward; backward after its own forward
    and the next chunk's backward; ``W`` after its own ``B``)."""
    seen: dict[tuple[int, int, int], int] = {}
    split = schedule.split_backward
    for t in range(schedule.ticks):
        for s in range(schedule.stages):
            kind, m, c = (int(a[t, s]) for a in (schedule.kind, schedule.microbatch, schedule.chunk))
            if kind == IDLE:
                continue
            where = f"schedule {schedule.name}, tick {t}, stage {s}: {action_text(kind, m, c, split)}"
            problem = _slot_problem(schedule, seen, t, s, kind, m, c)
            if problem:
                raise ConfigError(f"{where} {problem}.")
            seen[(kind, m, c)] = t
    kinds = (FORWARD, BACKWARD) if backward else (FORWARD,)
    if schedule.split_backward:
        kinds = (*kinds, WEIGHT)
    for kind in kinds:
        for m in range(schedule.microbatches):
            for c in range(schedule.chunks):
                if (kind, m, c) not in seen:
                    raise ConfigError(f"schedule {schedule.name} never runs {action_text(kind, m, c, split)}.")


def _slot_problem(schedule: Schedule, seen, t, s, kind, m, c) -> str:
    split = schedule.split_backward
    if kind not in (FORWARD, BACKWARD, WEIGHT):
        return "is not an action this executor knows (idle, F, B, W)"
    if not (0 <= m < schedule.microbatches and 0 <= c < schedule.chunks):
        return "names a micro-batch or chunk that does not exist"
    if schedule.chunk_stage[c] != s:
        return f"runs on the wrong stage (chunk {c} is placed on stage {schedule.chunk_stage[c]})"
    if (kind, m, c) in seen:
        return f"runs twice (first at tick {seen[(kind, m, c)]})"
    if kind == FORWARD and c > 0 and seen.get((FORWARD, m, c - 1), t) >= t:
        return f"comes before {action_text(FORWARD, m, c - 1)} has finished"
    if kind == BACKWARD and seen.get((FORWARD, m, c), t) >= t:
        return "comes before its own forward"
    if kind == BACKWARD and c + 1 < schedule.chunks and seen.get((BACKWARD, m, c + 1), t) >= t:
        return f"comes before {action_text(BACKWARD, m, c + 1, split)} has finished"
    if kind == WEIGHT and seen.get((BACKWARD, m, c), t) >= t:
        return f"comes before its own {action_text(BACKWARD, m, c, split)}"
    return ""


def render(schedule: Schedule) -> str:
    """A text picture: one row per stage, one column per tick, each action in torch's notation
    (:func:`action_text`: ``0F3``, ``1B0``; ``0I3`` / ``0W3`` under a split backward), ``.`` for idle."""
    cells = [[schedule.text(t, s) for t in range(schedule.ticks)] for s in range(schedule.stages)]
    width = max(len(cell) for row in cells for cell in row)
    return "\n".join(f"stage {s}: " + " ".join(cell.rjust(width) for cell in row) for s, row in enumerate(cells))
