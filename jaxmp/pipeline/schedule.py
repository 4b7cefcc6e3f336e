"""Pipeline schedules as data: a ``[ticks, stages]`` table of which micro-batch and repeat each stage
works on, or ``-1`` for idle (a bubble).

Why a table: the executor (``jaxmp.pipeline.gpipe``) only reads it, so the bubble can be counted,
drawn and tested without running anything, and other schedules can drive the same loop later.

GPipe with circular repeats (Huang et al. 2019; the GSPMD paper's circular pipeline): micro-batches
go through stages in groups of ``S``; a group makes all ``R`` passes around the ring before the next
group enters, so the output of the last stage is always needed by stage 0 on the very next tick and one
ring shift per tick moves every activation. For micro-batch ``m`` (group ``g = m // S``, slot
``j = m % S``), repeat ``r`` and stage ``s``::

    tick(m, r, s) = s + g*S*R + r*S + j

With ``R = 1`` this is plain GPipe, ``tick = m + s``, and the bubble is ``(S-1)/(M+S-1)``; with ``M`` a
multiple of ``S`` it is ``(S-1)/(R*M+S-1)``. A last group smaller than ``S`` idles ``S - M % S`` ticks
per extra repeat, which the table shows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxmp.config import ConfigError


class Schedule(NamedTuple):
    """Which micro-batch (and repeat) each stage runs at each tick; ``-1`` marks an idle slot."""

    stages: int
    microbatches: int
    repeats: int
    microbatch: np.ndarray  # [ticks, stages] int32
    repeat: np.ndarray  # [ticks, stages] int32

    @property
    def ticks(self) -> int:
        return self.microbatch.shape[0]

    @property
    def busy(self) -> np.ndarray:
        """``[ticks, stages]`` bool: the stage does real work."""
        return self.microbatch >= 0

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-ticks over all stage-ticks."""
        return 1.0 - float(self.busy.mean())

    def finishing_ticks(self) -> np.ndarray:
        """``[M]``: the tick at which the last stage finishes the last repeat of each micro-batch."""
        last = (self.microbatch[:, -1], self.repeat[:, -1])
        return np.array(
            [np.flatnonzero((last[0] == m) & (last[1] == self.repeats - 1))[0] for m in range(self.microbatches)]
        )


def gpipe(stages: int, microbatches: int, repeats: int = 1) -> Schedule:
    """The GPipe (``repeats=1``) or circular (``repeats>1``) schedule of the module docstring."""
    for name, value in (("stages", stages), ("microbatches", microbatches), ("repeats", repeats)):
        if value < 1:
            raise ConfigError(f"pipeline {name} must be positive, got {value}.")
    ticks = _tick(microbatches - 1, repeats - 1, stages - 1, stages, repeats) + 1
    microbatch = np.full((ticks, stages), -1, np.int32)
    repeat = np.full((ticks, stages), -1, np.int32)
    for m in range(microbatches):
        for r in range(repeats):
            for s in range(stages):
                t = _tick(m, r, s, stages, repeats)
                microbatch[t, s], repeat[t, s] = m, r
    return Schedule(stages, microbatches, repeats, microbatch, repeat)


def _tick(m: int, r: int, s: int, stages: int, repeats: int) -> int:
    group, slot = divmod(m, stages)
    return s + group * stages * repeats + r * stages + slot


def render(schedule: Schedule) -> str:
    """A text picture: one row per stage, one column per tick, ``m`` (or ``m.r`` with repeats) or ``.``."""
    width = (
        len(f"{schedule.microbatches - 1}.{schedule.repeats - 1}")
        if schedule.repeats > 1
        else len(str(schedule.microbatches - 1))
    )
    rows = []
    for s in range(schedule.stages):
        cells = []
        for t in range(schedule.ticks):
            m, r = schedule.microbatch[t, s], schedule.repeat[t, s]
            text = "." if m < 0 else (f"{m}.{r}" if schedule.repeats > 1 else f"{m}")
            cells.append(text.rjust(width))
        rows.append(f"stage {s}: " + " ".join(cells))
    return "\n".join(rows)
