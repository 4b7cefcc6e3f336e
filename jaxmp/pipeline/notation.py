"""Schedules as text: torch.distributed.pipelining's per-rank action lists, read into tick tables and
written out of them.

torch keeps a schedule as one list per rank (device along ``pipe``) of actions in the order that rank
runs them, each written ``{chunk}{kind}{micro-batch}`` (:func:`.schedule.action_text`): ``F`` forward,
``B`` full backward, ``I`` input-cotangent backward and ``W`` weight gradient (jaxmp's ``B`` and ``W``
under a split). Its CSV form is one row per rank, one action per cell, no header; an empty cell is no
action (torch's dumps use them for idle steps).

Why read that form: a schedule written for torch (or by hand, or by a search) then runs on jaxmp's
executor, and jaxmp's own tables can be written out and compared with torch's. A list has no ticks, so
:func:`from_rows` places them: each device runs its actions in its order, each at the first tick at which
its inputs have arrived. A message takes one tick, so an action at tick ``t`` can use what another
device did at tick ``t - 1`` or before, and what its own device did before ``t``. One exception keeps
the executor's bound: an action whose message would be the third activation (or cotangent) to reach a
device at the next tick waits a tick (:data:`.schedule.ARRIVALS`; never the case for contiguous,
circular or V placements). The built-in tables are all placed this way, so each one written and read
back is the same table.

A list that cannot run is refused in one line that names its first bad action: an unknown kind, a
chunk on two devices, an action twice, a micro-batch missing, an action before its own device's input
(``W`` before its ``I``), or devices waiting on each other in a cycle (a deadlock).

An overlapped pair, torch's ``(0F7;7B3)OVERLAP_F_B``, is one entry: both its actions run in one tick
(:class:`Pair`), placed when the inputs of both have arrived. One list may mix full backwards (``B``)
with split ones (``I`` then ``W``), each micro-batch and chunk taking one or the other.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from jaxmp.config import ConfigError
from jaxmp.pipeline.schedule import (
    ARRIVALS,
    IDLE,
    LETTERS,
    OVERLAP,
    SENDS_BACK,
    Lane,
    Schedule,
    inputs_of,
    message_to,
    pair_text,
    validate,
)

KINDS = {letter: kind for kind, letter in LETTERS.items()}  # torch's letter -> jaxmp's kind
_ACTION = re.compile(r"(\d+)([A-Za-z_]+)(\d+)")
_PAIR = re.compile(rf"\((.*);(.*)\){OVERLAP}")


class Action(NamedTuple):
    """One action of a per-device list: ``str(Action(2, "F", 0)) == "2F0"``."""

    chunk: int
    letter: str  # F, B, I or W
    microbatch: int

    def __str__(self) -> str:
        return f"{self.chunk}{self.letter}{self.microbatch}"

    @property
    def kind(self) -> int:
        return KINDS[self.letter]

    @property
    def halves(self) -> tuple[Action, ...]:
        return (self,)


class Pair(NamedTuple):
    """An overlapped pair, run in one tick: a forward and a backward (``B`` or ``I``) of two micro-batches,
    ``str(Pair(Action(0, "F", 7), Action(7, "B", 3))) == "(0F7;7B3)OVERLAP_F_B"``."""

    forward: Action
    backward: Action

    def __str__(self) -> str:
        return pair_text(str(self.forward), str(self.backward))

    @property
    def halves(self) -> tuple[Action, ...]:
        return (self.forward, self.backward)


Item = Action | Pair  # one entry of a device's list


def parse_action(text: str, where: str = "") -> Item:
    """``"2F0"`` -> ``Action(2, "F", 0)``, ``"(0F7;7B3)OVERLAP_F_B"`` -> a :class:`Pair`; ``ConfigError``
    (prefixed by ``where``) for anything else."""
    text = text.strip()
    pair = _PAIR.fullmatch(text)
    if pair is not None:
        forward, backward = (parse_action(half, where) for half in pair.groups())
        if not isinstance(forward, Action) or forward.letter != "F" or backward.kind not in SENDS_BACK:
            raise ConfigError(f"{where}{text} must overlap a forward with a backward (B or I), as (0F7;7B3){OVERLAP}.")
        return Pair(forward, backward)
    if text.startswith("("):
        raise ConfigError(f"{where}{text} is not an overlapped pair (F;B){OVERLAP} such as (0F7;7B3){OVERLAP}.")
    match = _ACTION.fullmatch(text)
    if match is None:
        raise ConfigError(f"{where}{text!r} is not an action {{chunk}}{{F|I|W|B}}{{micro-batch}} such as 0F1.")
    chunk, letter, microbatch = match.groups()
    if letter not in KINDS:
        raise ConfigError(f"{where}{text} has the unknown action kind {letter!r}; the kinds are F, I, W and B.")
    return Action(int(chunk), letter, int(microbatch))


def to_rows(schedule: Schedule) -> list[list[str]]:
    """Each device's actions in the order it runs them, in torch's notation (idle ticks left out)."""
    return [
        [schedule.text(t, s) for t in range(schedule.ticks) if schedule.kind[t, s] != IDLE]
        for s in range(schedule.stages)
    ]


def to_csv(schedule: Schedule) -> str:
    """``schedule`` in torch's per-rank CSV form: one row per device, its actions in order."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(to_rows(schedule))
    return out.getvalue()


def write_csv(schedule: Schedule, path: str | Path) -> None:
    Path(path).write_text(to_csv(schedule))


def read_csv(path: str | Path) -> Schedule:
    """The tick table of the per-device action lists in the CSV file ``path`` (module docstring)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"schedule CSV {path} cannot be read ({type(error).__name__}: {error}).") from None
    return from_csv(text, name=path.name)


def from_csv(text: str, name: str = "csv") -> Schedule:
    """The tick table of per-device action lists in CSV text (module docstring)."""
    rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text))]
    while rows and not any(rows[-1]):
        rows.pop()
    where = f"schedule CSV {name}"
    parsed = [
        [parse_action(cell, f"{where}, device {s}, action {i}: ") for i, cell in enumerate(row) if cell]
        for s, row in enumerate(rows)
    ]
    return from_rows(parsed, name)


def from_rows(rows: Sequence[Sequence[Item]], name: str = "csv") -> Schedule:
    """Place each device's actions (``rows[device]``, in order) at the first tick their inputs have
    arrived; the placement of chunks and the number of micro-batches are read off the lists.

    Raises:
      ConfigError: one line naming the first bad action (module docstring).
    """
    where = f"schedule CSV {name}"
    if not rows:
        raise ConfigError(f"{where} has no rows; give one row of actions per device along pipe.")
    for s, row in enumerate(rows):
        if not row:
            raise ConfigError(f"{where}: device {s} runs no action; every device along pipe needs a chunk.")
    chunk_stage = _placement(rows, where)
    microbatches = 1 + max(a.microbatch for row in rows for item in row for a in item.halves)
    _check_complete(rows, len(chunk_stage), microbatches, where)
    ticks = _place(rows, chunk_stage, where)
    shape = (1 + max(max(row) for row in ticks), len(rows))
    lanes = [Lane.idle(*shape), Lane.idle(*shape)]
    for s, row in enumerate(rows):
        for item, t in zip(row, ticks[s], strict=True):
            for lane, a in zip(lanes, item.halves, strict=False):
                lane.kind[t, s], lane.microbatch[t, s], lane.chunk[t, s] = a.kind, a.microbatch, a.chunk
    paired = lanes[1] if (lanes[1].kind != IDLE).any() else None
    schedule = Schedule(len(rows), microbatches, chunk_stage, *lanes[0], name=name, paired=paired)
    validate(schedule)
    return schedule


def _placement(rows: Sequence[Sequence[Item]], where: str) -> tuple[int, ...]:
    """The device of each chunk: the row of its forwards (of any action, if it has none); an action in
    another row is refused."""
    device: dict[int, int] = {}
    actions = [(s, a) for s, row in enumerate(rows) for item in row for a in item.halves]
    for s, a in sorted(actions, key=lambda pair: pair[1].letter != "F"):  # forwards first, else in order
        if device.setdefault(a.chunk, s) != s:
            raise ConfigError(
                f"{where}: {a} on device {s}, but chunk {a.chunk} runs on device {device[a.chunk]}; "
                "a chunk's layers live on one device."
            )
    missing = sorted(set(range(max(device) + 1)) - set(device))
    if missing:
        raise ConfigError(f"{where}: chunk {missing[0]} never runs (chunks are numbered 0..{max(device)}).")
    return tuple(device[c] for c in range(len(device)))


def _check_complete(rows: Sequence[Sequence[Item]], chunks: int, microbatches: int, where: str) -> None:
    """Every action once: ``F`` and either ``B`` or ``I`` and ``W`` of every micro-batch on every chunk."""
    counts = Counter(a for row in rows for item in row for a in item.halves)
    for s, row in enumerate(rows):
        for a in (a for item in row for a in item.halves):
            if counts[a] > 1:
                raise ConfigError(f"{where}: {a} on device {s} runs {counts[a]} times; each action runs once.")
    for m in range(microbatches):
        for c in range(chunks):
            has = {x: Action(c, x, m) in counts for x in "FBIW"}
            if has["B"] and (has["I"] or has["W"]):
                raise ConfigError(f"{where}: micro-batch {m} runs both {Action(c, 'B', m)} and a split backward.")
            missing = next((x for x in ("FIW" if has["I"] or has["W"] else "FB") if not has[x]), None)
            if missing is not None:
                raise ConfigError(
                    f"{where}: micro-batch {m} is missing {Action(c, missing, m)} (micro-batches are numbered "
                    f"0..{microbatches - 1}; each runs F and either B or I and W on every chunk)."
                )


def _missing_input(a: Action, done: dict, chunks: int, t: float) -> tuple[str, int] | None:
    """``(the letter, chunk)`` of an input of ``a`` not there at tick ``t`` (None: all there)."""
    for kinds, chunk in inputs_of(a.kind, a.chunk, chunks):
        if not any(done.get((k, a.microbatch, chunk), t) < t for k in kinds):
            return LETTERS[kinds[0]], chunk
    return None


def _place(rows: Sequence[Sequence[Item]], chunk_stage: tuple[int, ...], where: str) -> list[list[int]]:
    """The tick of every entry: tick by tick, each device runs its next entry (both actions of a pair) if
    its inputs ran at an earlier tick (and its messages keep within ``ARRIVALS``); a tick in which no
    device can is a deadlock."""
    done: dict[tuple[int, int, int], int] = {}  # (kind, micro-batch, chunk) -> tick
    ticks: list[list[int]] = [[] for _ in rows]
    t = 0
    while any(len(ticks[s]) < len(row) for s, row in enumerate(rows)):
        sending: Counter = Counter()
        ran = []
        for s, row in enumerate(rows):
            if len(ticks[s]) == len(row):
                continue
            halves = row[len(ticks[s])].halves
            messages = [m for m in (message_to(chunk_stage, a.kind, a.chunk) for a in halves) if m is not None]
            ready = all(_missing_input(a, done, len(chunk_stage), t) is None for a in halves)
            if ready and all(sending[m] < ARRIVALS for m in messages):
                sending.update(messages)
                ticks[s].append(t)
                ran.extend(halves)
        if not ran:
            raise ConfigError(_deadlock(rows, ticks, done, chunk_stage, where))
        done.update(((a.kind, a.microbatch, a.chunk), t) for a in ran)
        t += 1
    return ticks


def _deadlock(rows, ticks, done, chunk_stage, where: str) -> str:
    """The line for a list that stops: its first device's next action waits for one that its own device
    runs later (``W`` before its ``I``), or devices wait on each other in a cycle."""
    waits = []  # (device, its next entry, the input it waits for)
    s = next(s for s, row in enumerate(rows) if len(ticks[s]) < len(row))
    while s not in [w[0] for w in waits]:
        head = rows[s][len(ticks[s])]
        a, (letter, chunk) = next(
            (a, miss) for a in head.halves if (miss := _missing_input(a, done, len(chunk_stage), math.inf)) is not None
        )
        missing = Action(chunk, letter, a.microbatch)
        if chunk_stage[chunk] == s:
            return f"{where}: {head} on device {s} comes before {missing}, its input, on the same device."
        waits.append((s, head, missing))
        s = chunk_stage[chunk]
    cycle = waits[[w[0] for w in waits].index(s) :]
    chain = ", ".join(f"device {d} waits at {head} for {missing}" for d, head, missing in cycle)
    return f"{where} deadlocks: {chain}; each waits for an action queued later on the device it waits on."
