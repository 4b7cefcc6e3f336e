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
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxmp.config import ConfigError
from jaxmp.pipeline.schedule import (
    ARRIVALS,
    BACKWARD,
    FORWARD,
    IDLE,
    WEIGHT,
    Schedule,
    message_to,
    validate,
)

KINDS = {"F": FORWARD, "B": BACKWARD, "I": BACKWARD, "W": WEIGHT}  # torch's letter -> jaxmp's kind
_ACTION = re.compile(r"(\d+)([A-Za-z_]+)(\d+)")


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


def parse_action(text: str, where: str = "") -> Action:
    """``"2F0"`` -> ``Action(2, "F", 0)``; ``ConfigError`` (prefixed by ``where``) for anything else,
    overlapped pairs such as ``(0F7;7B3)OVERLAP_F_B`` included."""
    text = text.strip()
    if text.startswith("("):
        raise ConfigError(f"{where}{text} is an overlapped pair; overlapped actions are not supported yet.")
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


def from_rows(rows: Sequence[Sequence[Action]], name: str = "csv") -> Schedule:
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
    microbatches = 1 + max(a.microbatch for row in rows for a in row)
    _check_complete(rows, len(chunk_stage), microbatches, where)
    ticks = _place(rows, chunk_stage, where)
    shape = (1 + max(max(row) for row in ticks), len(rows))
    kind, microbatch, chunk = np.full(shape, IDLE, np.int32), np.full(shape, -1, np.int32), np.full(shape, -1, np.int32)
    for s, row in enumerate(rows):
        for a, t in zip(row, ticks[s], strict=True):
            kind[t, s], microbatch[t, s], chunk[t, s] = a.kind, a.microbatch, a.chunk
    schedule = Schedule(len(rows), microbatches, chunk_stage, kind, microbatch, chunk, name=name)
    validate(schedule)
    return schedule


def _placement(rows: Sequence[Sequence[Action]], where: str) -> tuple[int, ...]:
    """The device of each chunk: the row of its forwards (of any action, if it has none); an action in
    another row is refused."""
    device: dict[int, int] = {}
    actions = [(s, a) for s, row in enumerate(rows) for a in row]
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


def _check_complete(rows: Sequence[Sequence[Action]], chunks: int, microbatches: int, where: str) -> None:
    """Every action once: ``F`` and either ``B`` or ``I`` and ``W`` of every micro-batch on every chunk."""
    letters = {a.letter for row in rows for a in row}
    if "B" in letters and letters & {"I", "W"}:
        first = {x: next(a for row in rows for a in row if a.letter in x) for x in ("B", "IW")}
        raise ConfigError(
            f"{where} mixes full backwards ({first['B']}) with split ones ({first['IW']}); "
            "one table of both is not supported yet."
        )
    counts = Counter(a for row in rows for a in row)
    for s, row in enumerate(rows):
        for a in row:
            if counts[a] > 1:
                raise ConfigError(f"{where}: {a} on device {s} runs {counts[a]} times; each action runs once.")
    needed = ("F", "I", "W") if letters & {"I", "W"} else ("F", "B")
    for m in range(microbatches):
        for c in range(chunks):
            for letter in needed:
                if Action(c, letter, m) not in counts:
                    raise ConfigError(
                        f"{where}: micro-batch {m} is missing {Action(c, letter, m)} (micro-batches are numbered "
                        f"0..{microbatches - 1}; each runs F, {'I and W' if 'W' in needed else 'B'} on every chunk)."
                    )


def _inputs(a: Action, chunks: int) -> list[Action]:
    """The actions whose results ``a`` reads."""
    if a.letter == "F":
        return [Action(a.chunk - 1, "F", a.microbatch)] if a.chunk > 0 else []
    if a.letter == "W":
        return [Action(a.chunk, "I", a.microbatch)]
    later = [Action(a.chunk + 1, a.letter, a.microbatch)] if a.chunk + 1 < chunks else []
    return [Action(a.chunk, "F", a.microbatch), *later]


def _place(rows: Sequence[Sequence[Action]], chunk_stage: tuple[int, ...], where: str) -> list[list[int]]:
    """The tick of every action: tick by tick, each device runs its next action if its inputs ran at an
    earlier tick (and its message keeps within ``ARRIVALS``); a tick in which no device can is a deadlock."""
    done: dict[Action, int] = {}
    ticks: list[list[int]] = [[] for _ in rows]
    t = 0
    while any(len(ticks[s]) < len(row) for s, row in enumerate(rows)):
        sending: Counter = Counter()
        ran = []
        for s, row in enumerate(rows):
            if len(ticks[s]) == len(row):
                continue
            a = row[len(ticks[s])]
            message = message_to(chunk_stage, a.kind, a.chunk)
            ready = all(done.get(x, t) < t for x in _inputs(a, len(chunk_stage)))
            if ready and (message is None or sending[message] < ARRIVALS):
                sending[message] += 1
                ticks[s].append(t)
                ran.append(a)
        if not ran:
            raise ConfigError(_deadlock(rows, ticks, done, chunk_stage, where))
        done.update((a, t) for a in ran)
        t += 1
    return ticks


def _deadlock(rows, ticks, done, chunk_stage, where: str) -> str:
    """The line for a list that stops: its first device's next action waits for one that its own device
    runs later (``W`` before its ``I``), or devices wait on each other in a cycle."""
    waits = []  # (device, its next action, the input it waits for)
    s = next(s for s, row in enumerate(rows) if len(ticks[s]) < len(row))
    while s not in [w[0] for w in waits]:
        head = rows[s][len(ticks[s])]
        missing = next(x for x in _inputs(head, len(chunk_stage)) if x not in done)
        if chunk_stage[missing.chunk] == s:
            return f"{where}: {head} on device {s} comes before {missing}, its input, on the same device."
        waits.append((s, head, missing))
        s = chunk_stage[missing.chunk]
    cycle = waits[[w[0] for w in waits].index(s) :]
    chain = ", ".join(f"device {d} waits at {head} for {missing}" for d, head, missing in cycle)
    return f"{where} deadlocks: {chain}; each waits for an action queued later on the device it waits on."
