"""Pipeline schedules as data: for every tick and device along ``pipe`` (a *stage*), the action it
runs, or two overlapped ones, or none.

Why a table: the executor (:mod:`jaxmp.pipeline.engine`) only reads it, so the bubble, the stash and the
messages can be counted, drawn and tested without running anything, and a new schedule is a new table
on the same executor. The built-in tables and what each promises are listed once, in
:mod:`jaxmp.pipeline.registry`; a user can write one by hand (:func:`.notation.from_rows`, or these
arrays and :func:`validate`).

A model is cut into chunks ``0..C-1`` of consecutive layers; ``chunk_stage[c]`` is the stage that runs
chunk ``c``. The forward of micro-batch ``m`` visits the chunks in order, its backward in reverse. A
message sent at the end of tick ``t`` (an activation to the next chunk's stage, or an input cotangent to
the previous one) is there at the start of tick ``t + 1``, so every action comes strictly after the ones
it needs.

The kinds of action, each with one meaning whatever else the table holds, written as in
torch.distributed.pipelining (:func:`action_text`: ``{chunk}{kind}{micro-batch}``, ``2F0``):

- ``F`` (:data:`FORWARD`): the chunk's forward; its residuals are kept for its backward.
- ``B`` (:data:`BACKWARD`): the whole backward: the input cotangent, sent on, and the weight gradient.
- ``I`` (:data:`INPUT`): the input cotangent only (on the critical path); its ``W`` follows later.
- ``W`` (:data:`WEIGHT`): the weight gradient of an earlier ``I``.

One table may mix ``B`` with ``I`` and ``W`` (DualPipeV does). A tick may also hold an *overlapped
pair*: a forward and a backward (``B`` or ``I``) of different micro-batches on the same stage, torch's
``(0F7;7B3)OVERLAP_F_B``; the pair's second action sits in the table's second :class:`Lane`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxmp.config import ConfigError

IDLE, FORWARD, BACKWARD, WEIGHT, INPUT = 0, 1, 2, 3, 4
KINDS = (FORWARD, BACKWARD, INPUT, WEIGHT)
SENDS_BACK = (BACKWARD, INPUT)  # the actions that compute (and send on) a chunk's input cotangent
ARRIVALS = 2  # the most activations (and the most cotangents) the executor receives per stage and tick
LETTERS = {FORWARD: "F", BACKWARD: "B", INPUT: "I", WEIGHT: "W"}  # torch's notation
OVERLAP = "OVERLAP_F_B"  # torch's suffix of an overlapped pair


def action_text(kind: int, microbatch: int, chunk: int) -> str:
    """One action in torch's notation: ``{chunk}{F|B|I|W}{micro-batch}``."""
    return f"{chunk}{LETTERS.get(kind, f'<kind {kind}>')}{microbatch}"


def pair_text(first: str, second: str) -> str:
    """An overlapped pair in torch's notation: ``(0F7;7B3)OVERLAP_F_B``."""
    return f"({first};{second}){OVERLAP}"


class Lane(NamedTuple):
    """One action per tick and stage: ``[ticks, stages]`` arrays (micro-batch and chunk -1 when idle)."""

    kind: np.ndarray
    microbatch: np.ndarray
    chunk: np.ndarray

    @staticmethod
    def idle(ticks: int, stages: int) -> Lane:
        return Lane(*(np.full((ticks, stages), fill, np.int32) for fill in (IDLE, -1, -1)))

    def at(self, t: int, s: int) -> tuple[int, int, int]:
        return int(self.kind[t, s]), int(self.microbatch[t, s]), int(self.chunk[t, s])


class Schedule(NamedTuple):
    """Which action each stage runs at each tick: ``kind``, micro-batch and chunk; ``paired`` holds the
    backward of an overlapped pair whose forward is in the main arrays (None: no pairs)."""

    stages: int
    microbatches: int
    chunk_stage: tuple[int, ...]  # [C]: the stage (device along pipe) of each chunk
    kind: np.ndarray  # [ticks, stages] int
    microbatch: np.ndarray  # [ticks, stages] int, -1 when idle
    chunk: np.ndarray  # [ticks, stages] int, -1 when idle
    name: str = "gpipe"
    paired: Lane | None = None

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
    def lanes(self) -> tuple[Lane, ...]:
        """The main lane, and the pairs' backwards if the table overlaps any: the executor runs a tick's
        lanes in this order."""
        main = Lane(self.kind, self.microbatch, self.chunk)
        return (main,) if self.paired is None else (main, self.paired)

    @property
    def split_backward(self) -> bool:
        """Whether some backward is split into ``I`` (input cotangent) and ``W`` (weight gradient)."""
        return bool((self.kind == WEIGHT).any())

    @property
    def busy(self) -> np.ndarray:
        """``[ticks, stages]`` bool: the stage does real work (an overlapped pair counts once)."""
        return self.kind != IDLE

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-ticks over all stage-ticks."""
        return 1.0 - float(self.busy.mean())

    def actions(self):
        """Every action: ``(tick, stage, lane, kind, micro-batch, chunk)``, idle slots left out."""
        for i, lane in enumerate(self.lanes):
            for t, s in zip(*np.nonzero(lane.kind != IDLE), strict=True):
                yield (int(t), int(s), i, *lane.at(t, s))

    def text(self, tick: int, stage: int) -> str:
        """The slot ``[tick, stage]`` in torch's notation (:func:`action_text`, :func:`pair_text`), ``.``
        when idle."""
        kind, m, c = Lane(self.kind, self.microbatch, self.chunk).at(tick, stage)
        if kind == IDLE:
            return "."
        first = action_text(kind, m, c)
        if self.paired is None or self.paired.kind[tick, stage] == IDLE:
            return first
        return pair_text(first, action_text(*self.paired.at(tick, stage)))

    def locate(self, kind: int, microbatch: int, chunk: int) -> tuple[int, int]:
        """``(tick, lane)`` of one action (``(-1, 0)`` if the table does not have it)."""
        stage = self.chunk_stage[chunk]
        for i, lane in enumerate(self.lanes):
            column = lane.kind[:, stage] == kind
            hits = np.flatnonzero(column & (lane.microbatch[:, stage] == microbatch) & (lane.chunk[:, stage] == chunk))
            if len(hits):
                return int(hits[0]), i
        return -1, 0

    def when(self, kind: int, microbatch: int, chunk: int) -> int:
        """The tick of one action (-1 if the table does not have it)."""
        return self.locate(kind, microbatch, chunk)[0]

    def sent_back(self, microbatch: int, chunk: int) -> int:
        """The tick of the action that computes chunk ``chunk``'s input cotangent (``B`` or ``I``)."""
        return max(self.when(kind, microbatch, chunk) for kind in SENDS_BACK)

    def last_use(self, microbatch: int, chunk: int) -> int:
        """The tick of the last action that reads this micro-batch's stashed input of ``chunk``."""
        return max(self.when(kind, microbatch, chunk) for kind in KINDS)

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


def message_to(chunk_stage: tuple[int, ...], kind: int, c: int) -> tuple[int, bool] | None:
    """``(destination stage, is a cotangent)`` of the message chunk ``c``'s action sends, if any: a
    forward's output to the next chunk's stage, a backward's input cotangent to the previous one's."""
    if kind == FORWARD and c + 1 < len(chunk_stage):
        return chunk_stage[c + 1], False
    if kind in SENDS_BACK and c > 0:
        return chunk_stage[c - 1], True
    return None


def validate(schedule: Schedule, *, backward: bool = True) -> None:
    """Raise ``ConfigError`` naming the first bad slot: every action once, on its chunk's stage, after
    the actions it needs (forward after the previous chunk's forward; ``B`` or ``I`` after its own
    forward and the next chunk's ``B`` or ``I``; ``W`` after its own ``I``); a pair is a forward and a
    backward of different micro-batches. With ``backward``, every micro-batch runs ``F`` and either
    ``B`` or ``I`` and ``W`` on every chunk."""
    seen: dict[tuple[int, int, int], int] = {}
    for t, s, _, kind, m, c in sorted(schedule.actions()):
        problem = _slot_problem(schedule, seen, t, s, kind, m, c) or _pair_problem(schedule, t, s)
        if problem:
            raise ConfigError(f"schedule {schedule.name}, tick {t}, stage {s}: {problem}.")
        seen[(kind, m, c)] = t
    for m in range(schedule.microbatches):
        for c in range(schedule.chunks):
            split = (INPUT, m, c) in seen or (WEIGHT, m, c) in seen
            needed = (FORWARD, *((INPUT, WEIGHT) if split else (BACKWARD,))) if backward else (FORWARD,)
            for kind in needed:
                if (kind, m, c) not in seen:
                    raise ConfigError(f"schedule {schedule.name} never runs {action_text(kind, m, c)}.")


def _slot_problem(schedule: Schedule, seen, t, s, kind, m, c) -> str:
    mine = action_text(kind, m, c) + " "
    if kind not in KINDS:
        return mine + "is not an action this executor knows (F, B, I, W)"
    if not (0 <= m < schedule.microbatches and 0 <= c < schedule.chunks):
        return mine + "names a micro-batch or chunk that does not exist"
    if schedule.chunk_stage[c] != s:
        return mine + f"runs on the wrong stage (chunk {c} is placed on stage {schedule.chunk_stage[c]})"
    if (kind, m, c) in seen or (kind in SENDS_BACK and any((k, m, c) in seen for k in SENDS_BACK)):
        return mine + "runs twice"
    for kinds, chunk in inputs_of(kind, c, schedule.chunks):
        if all(seen.get((k, m, chunk), t) >= t for k in kinds):
            if chunk == c:
                return mine + f"comes before its own {'forward' if kinds == (FORWARD,) else action_text(INPUT, m, c)}"
            return mine + f"comes before {action_text(kinds[0], m, chunk)} has finished"
    return ""


def inputs_of(kind: int, c: int, chunks: int) -> list[tuple[tuple[int, ...], int]]:
    """What an action of chunk ``c`` reads, as ``(kinds, chunk)``: an action of one of ``kinds`` on
    ``chunk``, of the same micro-batch (a forward the previous chunk's output; ``B`` or ``I`` its own
    forward's residuals and the next chunk's input cotangent; ``W`` its own ``I``'s)."""
    if kind == FORWARD:
        return [((FORWARD,), c - 1)] if c > 0 else []
    if kind == WEIGHT:
        return [((INPUT,), c)]
    return [((FORWARD,), c), *([(SENDS_BACK, c + 1)] if c + 1 < chunks else [])]


def _pair_problem(schedule: Schedule, t: int, s: int) -> str:
    """An overlapped pair is a forward (main lane) and a backward (second lane) of different micro-batches."""
    if schedule.paired is None or schedule.paired.kind[t, s] == IDLE:
        return ""
    (kind, m, _), (second, m2, _) = (x.at(t, s) for x in schedule.lanes)
    if kind != FORWARD or second not in SENDS_BACK:
        return f"{schedule.text(t, s)} pairs other actions than a forward and a backward (B or I)"
    if m == m2:
        return f"{schedule.text(t, s)} overlaps the forward and the backward of one micro-batch"
    return ""


def render(schedule: Schedule) -> str:
    """A text picture: one row per stage, one column per tick, each action in torch's notation
    (:func:`action_text`: ``0F3``, ``1B0``, ``0I3``, ``0W3``), an overlapped pair as ``0F7;7B3``, ``.``
    for idle."""
    cells = [[_short(schedule.text(t, s)) for t in range(schedule.ticks)] for s in range(schedule.stages)]
    width = max(len(cell) for row in cells for cell in row)
    return "\n".join(f"stage {s}: " + " ".join(cell.rjust(width) for cell in row) for s, row in enumerate(cells))


def _short(text: str) -> str:
    """``(0F7;7B3)OVERLAP_F_B`` -> ``0F7;7B3`` (a picture's cell)."""
    return text.removesuffix(OVERLAP).strip("()")


# Time in units of one chunk's forward: ``I`` and ``W`` as long, ``B = I + W``, and an overlapped pair
# the sum of its halves (the executor runs them one after the other; hiding one's communication behind
# the other's compute is the hardware's gain, not counted here).
UNIT_COSTS = {FORWARD: 1.0, INPUT: 1.0, WEIGHT: 1.0, BACKWARD: 2.0}


def _slot_cost(schedule: Schedule, t: int, s: int, costs: dict) -> float:
    return sum(costs[lane.kind[t, s]] for lane in schedule.lanes if lane.kind[t, s] != IDLE)


def timeline(schedule: Schedule, costs: dict | None = None) -> np.ndarray:
    """``[stages]``: when each device finishes, running its actions in the table's order, each as soon as
    the device is free and the action's inputs are done (messages free): the time model of the
    DeepSeek-V3 report and of the zero-bubble papers, in :data:`UNIT_COSTS` by default."""
    costs = UNIT_COSTS if costs is None else costs
    finished: dict[tuple[int, int, int], float] = {}
    free = np.zeros(schedule.stages)
    for t in range(schedule.ticks):
        for s in range(schedule.stages):
            actions = [lane.at(t, s) for lane in schedule.lanes if lane.kind[t, s] != IDLE]
            start = free[s]
            for kind, m, c in actions:
                for kinds, chunk in inputs_of(kind, c, schedule.chunks):
                    start = max(start, max(finished.get((k, m, chunk), 0.0) for k in kinds))
            free[s] = start + _slot_cost(schedule, t, s, costs)
            finished.update(((kind, m, c), free[s]) for kind, m, c in actions)
    return free


def timed_bubble(schedule: Schedule, costs: dict | None = None) -> float:
    """Idle time over all time on all devices, under :func:`timeline`."""
    costs = UNIT_COSTS if costs is None else costs
    work = sum(_slot_cost(schedule, t, s, costs) for t in range(schedule.ticks) for s in range(schedule.stages))
    return 1.0 - work / (schedule.stages * timeline(schedule, costs).max())


def lockstep_bubble(schedule: Schedule, costs: dict | None = None) -> float:
    """Idle time over all time when every tick lasts as long as its slowest device's slot: how jaxmp's
    executor runs a table (each tick ends in a collective-permute that all devices join)."""
    costs = UNIT_COSTS if costs is None else costs
    slots = np.array(
        [[_slot_cost(schedule, t, s, costs) for s in range(schedule.stages)] for t in range(schedule.ticks)]
    )
    return 1.0 - slots.sum() / (schedule.stages * slots.max(axis=1).sum())
