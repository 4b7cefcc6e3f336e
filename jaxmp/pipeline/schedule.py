"""Pipeline schedules as data: for every tick and stage, one action (forward or backward of micro-batch
``m`` on chunk ``c``) or idle.

Why a table: the executor (:mod:`jaxmp.pipeline.engine`) only reads it, so the bubble, the stash and the
messages can be counted, drawn and tested without running anything, and a new schedule (1F1B,
interleaved, zero-bubble) is a new table on the same executor.

A model is cut into chunks ``0..C-1`` of consecutive layers; ``chunk_stage[c]`` is the device along
``pipe`` that runs chunk ``c`` (contiguous: ``c``; circular repeats: ``c % S``; any placement). The
forward of micro-batch ``m`` visits the chunks in order, its backward in reverse. A message sent at the
end of tick ``t`` (an activation to the next chunk's stage, or an input cotangent to the previous one)
is there at the start of tick ``t + 1``, so every action comes strictly after the ones it needs.

GPipe (Huang et al. 2019) is built by list scheduling: each tick every stage takes the ready forward of
the lowest micro-batch, and starts backwards only once all its forwards are done (all forwards, then
all backwards). With one chunk per stage the forward phase takes ``M + S - 1`` ticks and so does the
backward: bubble ``(S-1)/(M+S-1)``. With ``R`` chunks per stage (circular), taking the lowest
micro-batch first sends groups of ``S`` micro-batches round the ring: ``R*M + S - 1`` ticks each way
when ``S`` divides ``M``, bubble ``(S-1)/(R*M+S-1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxmp.config import ConfigError

IDLE, FORWARD, BACKWARD = 0, 1, 2
KIND_NAMES = {IDLE: "idle", FORWARD: "F", BACKWARD: "B"}


class Schedule(NamedTuple):
    """Which action each stage runs at each tick: ``kind`` (IDLE/FORWARD/BACKWARD), micro-batch, chunk."""

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
    def busy(self) -> np.ndarray:
        """``[ticks, stages]`` bool: the stage does real work."""
        return self.kind != IDLE

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-ticks over all stage-ticks."""
        return 1.0 - float(self.busy.mean())

    def when(self, kind: int, microbatch: int, chunk: int) -> int:
        """The tick of one action (-1 if the table does not have it)."""
        stage = self.chunk_stage[chunk]
        hits = np.flatnonzero(
            (self.kind[:, stage] == kind) & (self.microbatch[:, stage] == microbatch) & (self.chunk[:, stage] == chunk)
        )
        return int(hits[0]) if len(hits) else -1

    def stashed(self) -> np.ndarray:
        """``[stages]``: the most micro-batch inputs any stage keeps at once (forward done, backward not)."""
        live = np.zeros((self.ticks, self.stages), int)
        for m in range(self.microbatches):
            for c in range(self.chunks):
                f, b = self.when(FORWARD, m, c), self.when(BACKWARD, m, c)
                live[f : (b if b >= 0 else f + 1), self.chunk_stage[c]] += 1
        return live.max(axis=0)


def contiguous_placement(stages: int, repeats: int = 1) -> tuple[int, ...]:
    """Chunk ``c`` on stage ``c % S``: contiguous for one chunk per stage, circular for more."""
    return tuple(c % stages for c in range(stages * repeats))


def gpipe(
    stages: int, microbatches: int, repeats: int = 1, *, placement: Sequence[int] | None = None, backward: bool = True
) -> Schedule:
    """The GPipe table (module docstring); ``backward=False`` gives the forward-only table of evaluation."""
    for name, value in (("stages", stages), ("microbatches", microbatches), ("repeats", repeats)):
        if value < 1:
            raise ConfigError(f"pipeline {name} must be positive, got {value}.")
    chunk_stage = tuple(placement) if placement is not None else contiguous_placement(stages, repeats)
    schedule = _list_schedule(stages, microbatches, chunk_stage, backward)
    validate(schedule, backward=backward)
    return schedule


def naive(stages: int, repeats: int = 1, *, placement: Sequence[int] | None = None) -> Schedule:
    """Vanilla model parallelism: one micro-batch, F1..FS then BS..B1; each stage busy 2 of 2S ticks."""
    return gpipe(stages, 1, repeats, placement=placement)._replace(name="naive")


def _list_schedule(stages: int, microbatches: int, chunk_stage: tuple[int, ...], backward: bool) -> Schedule:
    """Simulate tick by tick: every stage takes its best ready action (forwards first, lowest m first)."""
    chunks = len(chunk_stage)
    done_f = np.full((microbatches, chunks), -1)
    done_b = np.full((microbatches, chunks), -1)
    left_f = [microbatches * chunk_stage.count(s) for s in range(stages)]
    rows: list[list[tuple[int, int, int]]] = []
    total = microbatches * chunks * (2 if backward else 1)
    finished = 0
    while finished < total:
        t = len(rows)
        row = []
        for s in range(stages):
            action = _pick(s, t, chunk_stage, done_f, done_b, left_f[s] > 0, backward)
            row.append(action)
        for s, (kind, m, c) in enumerate(row):
            if kind == FORWARD:
                done_f[m, c], left_f[s], finished = t, left_f[s] - 1, finished + 1
            elif kind == BACKWARD:
                done_b[m, c], finished = t, finished + 1
        rows.append(row)
        if t > 4 * total + 4 * stages:
            raise ConfigError("the pipeline placement leaves a chunk that can never run.")
    table = np.array(rows, dtype=np.int32).reshape(len(rows), stages, 3)
    return Schedule(stages, microbatches, chunk_stage, table[..., 0], table[..., 1], table[..., 2])


def _pick(s, t, chunk_stage, done_f, done_b, forwards_left: bool, backward: bool) -> tuple[int, int, int]:
    microbatches, chunks = done_f.shape
    mine = [c for c in range(chunks) if chunk_stage[c] == s]
    if forwards_left:
        for m in range(microbatches):
            for c in mine:
                if done_f[m, c] < 0 and (c == 0 or 0 <= done_f[m, c - 1] < t):
                    return (FORWARD, m, c)
        return (IDLE, -1, -1)
    if backward:
        for m in range(microbatches):
            for c in reversed(mine):
                ready = 0 <= done_f[m, c] < t and (c == chunks - 1 or 0 <= done_b[m, c + 1] < t)
                if done_b[m, c] < 0 and ready:
                    return (BACKWARD, m, c)
    return (IDLE, -1, -1)


def validate(schedule: Schedule, *, backward: bool = True) -> None:
    """Raise ``ConfigError`` naming the first bad slot: every action once, on its chunk's stage, after
    the actions it needs (forward after the previous chunk's forward; backward after its own forward
    and the next chunk's backward)."""
    seen: dict[tuple[int, int, int], int] = {}
    for t in range(schedule.ticks):
        for s in range(schedule.stages):
            kind, m, c = (int(a[t, s]) for a in (schedule.kind, schedule.microbatch, schedule.chunk))
            if kind == IDLE:
                continue
            where = f"schedule {schedule.name}, tick {t}, stage {s}: {KIND_NAMES.get(kind, kind)}(m={m}, chunk={c})"
            problem = _slot_problem(schedule, seen, t, s, kind, m, c)
            if problem:
                raise ConfigError(f"{where} {problem}.")
            seen[(kind, m, c)] = t
    kinds = (FORWARD, BACKWARD) if backward else (FORWARD,)
    for kind in kinds:
        for m in range(schedule.microbatches):
            for c in range(schedule.chunks):
                if (kind, m, c) not in seen:
                    raise ConfigError(f"schedule {schedule.name} never runs {KIND_NAMES[kind]}(m={m}, chunk={c}).")


def _slot_problem(schedule: Schedule, seen, t, s, kind, m, c) -> str:
    if kind not in (FORWARD, BACKWARD):
        return "is not an action this executor knows (idle, F, B)"
    if not (0 <= m < schedule.microbatches and 0 <= c < schedule.chunks):
        return "names a micro-batch or chunk that does not exist"
    if schedule.chunk_stage[c] != s:
        return f"runs on the wrong stage (chunk {c} is placed on stage {schedule.chunk_stage[c]})"
    if (kind, m, c) in seen:
        return f"runs twice (first at tick {seen[(kind, m, c)]})"
    if kind == FORWARD and c > 0 and seen.get((FORWARD, m, c - 1), t) >= t:
        return f"comes before F(m={m}, chunk={c - 1}) has finished"
    if kind == BACKWARD and seen.get((FORWARD, m, c), t) >= t:
        return "comes before its own forward"
    if kind == BACKWARD and c + 1 < schedule.chunks and seen.get((BACKWARD, m, c + 1), t) >= t:
        return f"comes before B(m={m}, chunk={c + 1}) has finished"
    return ""


def render(schedule: Schedule) -> str:
    """A text picture: one row per stage, one column per tick: ``F0`` / ``B0`` (``F0.1``: chunk 1's
    forward of micro-batch 0, when a stage holds several chunks) or ``.`` for idle."""
    several = schedule.repeats > 1
    cells = np.full(schedule.kind.shape, ".", dtype=object)
    for (t, s), kind in np.ndenumerate(schedule.kind):
        if kind != IDLE:
            m, c = schedule.microbatch[t, s], schedule.chunk[t, s]
            cells[t, s] = f"{KIND_NAMES[kind]}{m}" + (f".{c}" if several else "")
    width = max(len(str(x)) for x in cells.flat)
    return "\n".join(
        f"stage {s}: " + " ".join(str(x).rjust(width) for x in cells[:, s]) for s in range(schedule.stages)
    )
