"""Every built-in schedule, and what it promises, stated once.

A :class:`ScheduleSpec` gives a schedule's chunk placement, the backwards it runs, its micro-batch and
stage constraints, the bound on the micro-batch inputs it stashes per device and its bubble in ticks;
:func:`build_schedule` builds any of them from those fields, and the rest of jaxmp asks the spec, never
the name. ``tests/test_schedule.py`` checks each promise against the tables.

Bubbles are idle time over all time (:func:`.schedule.timed_bubble`: ``F``, ``I`` and ``W`` of a
chunk one unit each, ``B`` two), equal to the idle ticks of a table of one action per tick; they hold
for ``M >= S`` (``S`` dividing ``M`` under ``R > 1``). With ``S`` devices along ``pipe``, ``M``
micro-batches and ``R`` chunks per device:

- ``gpipe`` (Huang et al. 2019): all forwards, then all backwards. Bubble ``(S-1)/(R*M+S-1)``; every
  device stashes all ``R*M`` of its chunk-micro-batches.
- ``1f1b`` (PipeDream-Flush, Narayanan et al. 2021): a ready backward first; a forward only while device
  ``s`` holds fewer than ``S - s`` micro-batches. Same bubble as GPipe, at most ``S`` stashed.
- ``interleaved-1f1b`` (Megatron, Narayanan et al. 2021), ``R`` chunks per device placed circularly:
  forwards in groups of ``S`` micro-batches per chunk, a backward first when ready, at most
  ``2(S - 1) + (R - 1)S + 1`` in flight. Bubble ``(S-1)/(R*M+S-1)`` when ``S`` divides ``M``.
- ``zb-h1`` (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): 1F1B's warm-up, and at most ``S``
  micro-batches in flight on every device (a micro-batch's stash is freed by its ``W``). Device 0 runs
  ``F I W`` in turn; the later ones put off their ``W`` s into the cool-down, where 1F1B idles. Bubble
  ``(S-1)/(3M+S-1)``: a third of 1F1B's ``3(S-1)`` idle slots when ``F``, ``I`` and ``W`` cost the same.
- ``zb-v`` (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"): ``2S`` chunks, two per
  device in a V (chunk ``c`` on device ``c`` going down, chunk ``2S-1-c`` coming back up). A forward
  (the later chunk first) while fewer than ``2S`` chunk-micro-batches wait for their ``W``, else a
  ready ``I``, else the oldest ``W``. ``2S`` stashed (1F1B's peak in bytes: a chunk is half of 1F1B's);
  bubble ``(S-1)/(6M+S-1)``: in time, half of ZB-H1's.
- ``dualpipev`` (DeepSeek-V3 2024; :mod:`jaxmp.pipeline.dualpipev`): ZB-V's V, with a forward and a
  backward of different micro-batches overlapped in one tick in the steady state, ``I``/``W`` splits
  at the ends. At most ``2S+1`` chunk-micro-batches stashed (the report's ``PP+1`` with ``PP = 2S``
  chunks). Bubble ``(S-1)/(3M+S-1)`` for ``M >= 2S`` (:func:`dualpipev_bubble`). jaxmp's executor runs
  ticks in lockstep, a pair's tick as long as both halves, so it idles more than that
  (:func:`.schedule.lockstep_bubble`).
- ``naive``: vanilla model parallelism, one micro-batch: each device busy 2 of ``2S`` ticks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from jaxmp.config import ConfigError
from jaxmp.pipeline import list_scheduling as ls
from jaxmp.pipeline.dualpipev import dualpipev_rows
from jaxmp.pipeline.notation import from_rows
from jaxmp.pipeline.schedule import (
    BACKWARD,
    FORWARD,
    INPUT,
    WEIGHT,
    Schedule,
    contiguous_placement,
    v_placement,
    validate,
)

ANY, ONE_PER_DEVICE, V = "any", "one per device", "v"  # placements
FULL, SPLIT, MIXED = "B", "I and W", "B, I and W"  # backwards


class ScheduleSpec(NamedTuple):
    """One schedule's rules and promises (module docstring)."""

    name: str
    placement: str  # ANY (contiguous, circular with --repeats, or --placement), ONE_PER_DEVICE, V
    backward: str  # FULL, SPLIT or MIXED
    table: Callable[[int, int, tuple[int, ...]], Schedule]  # (S, M, chunk_stage) -> the train table
    stash: Callable[[int, int, int], int]  # (S, M, R) -> the most chunk-micro-batch inputs a device keeps
    bubble: Callable[[int, int, int], float]  # (S, M, R) -> idle fraction in time (.schedule.timed_bubble)
    bubble_holds: Callable[[int, int, int], bool] = lambda s, m, r: m >= s and (r == 1 or m % s == 0)
    microbatches: int | None = None  # the only number of micro-batches it runs (None: any)
    min_devices: int = 1

    @property
    def splits_backward(self) -> bool:
        return self.backward != FULL

    def microbatches_for(self, asked: int) -> int:
        return asked if self.microbatches is None else self.microbatches

    def placement_for(self, devices: int, repeats: int = 1, placement: Sequence[int] | None = None) -> tuple[int, ...]:
        """The chunks' devices: the spec's default, or ``placement`` if the spec lets the user choose."""
        flags = "drop --repeats/--placement"
        if self.placement == V:
            if placement is not None and tuple(placement) != v_placement(devices) or repeats not in (1, 2):
                raise ConfigError(f"--schedule {self.name} places two chunks per device in a V; {flags}.")
            return v_placement(devices)
        chunk_stage = tuple(placement) if placement is not None else contiguous_placement(devices, repeats)
        if self.placement == ONE_PER_DEVICE and len(chunk_stage) != devices:
            raise ConfigError(f"--schedule {self.name} runs one chunk per device; {flags} or use interleaved-1f1b.")
        return chunk_stage


def _picked(picker: Callable, kinds: tuple[int, ...]):
    def table(devices: int, microbatches: int, chunk_stage: tuple[int, ...]) -> Schedule:
        state = ls.State.start(devices, microbatches, chunk_stage)
        return ls.list_schedule(state, picker(state), kinds, name="")

    return table


def _dualpipev(devices: int, microbatches: int, chunk_stage: tuple[int, ...]) -> Schedule:
    return from_rows(dualpipev_rows(devices, microbatches))


def _pipe_bubble(busy: int, idle: int):
    """Each device busy ``busy`` ticks per chunk and micro-batch, idle ``idle`` ticks per link of the
    pipeline: ``idle(S-1) / (busy*R*M + idle(S-1))``."""
    return lambda s, m, r: idle * (s - 1) / (busy * r * m + idle * (s - 1))


def _one_f_one_b_stash(s: int, m: int, r: int) -> int:
    """1F1B's ``S``; interleaved, device 0's ``2(S-1) + (R-1)S + 1`` in flight."""
    return s if r == 1 else 2 * (s - 1) + (r - 1) * s + 1


def dualpipev_bubble(s: int, m: int, r: int = 2) -> float:
    """DualPipeV's idle fraction in time, from the DeepSeek-V3 report's bubble ``(PP/2-1)(F&B+B-3W)``.

    Its ``PP`` is the number of chunks, ``2S``; in :data:`.schedule.UNIT_COSTS` (``F = I = W = 1``,
    ``B = 2``, a pair ``F&B = F + B = 3``) each device idles ``(S-1)(3+2-3) = 2(S-1)`` beside its work of
    ``2M`` chunk-micro-batches of ``F + B = 3``: ``2(S-1) / (6M + 2(S-1)) = (S-1)/(3M+S-1)``, zb-h1's
    in its units. Holds once the steady state exists, ``M >= 2S``.
    """
    return (s - 1) / (3 * m + s - 1)


FULL_KINDS, SPLIT_KINDS = (FORWARD, BACKWARD), (FORWARD, INPUT, WEIGHT)


def _spec(name: str, placement: str, backward: str, table, **promises) -> ScheduleSpec:
    return ScheduleSpec(name=name, placement=placement, backward=backward, table=table, **promises)


SCHEDULES: dict[str, ScheduleSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "gpipe", ANY, FULL, _picked(ls.gpipe_picker, FULL_KINDS),
            stash=lambda s, m, r: r * m, bubble=_pipe_bubble(2, 2),
        ),
        _spec(
            "1f1b", ANY, FULL, _picked(ls.one_f_one_b_picker, FULL_KINDS),
            stash=_one_f_one_b_stash, bubble=_pipe_bubble(2, 2),
        ),
        _spec(
            "interleaved-1f1b", ANY, FULL, _picked(ls.one_f_one_b_picker, FULL_KINDS),
            stash=_one_f_one_b_stash, bubble=_pipe_bubble(2, 2),
        ),
        _spec(
            "zb-h1", ONE_PER_DEVICE, SPLIT, _picked(ls.zb_h1_picker, SPLIT_KINDS),
            stash=lambda s, m, r: s, bubble=_pipe_bubble(3, 1),
        ),
        _spec(
            "zb-v", V, SPLIT, _picked(ls.zb_v_picker, SPLIT_KINDS),
            stash=lambda s, m, r: 2 * s, bubble=_pipe_bubble(3, 1),
        ),
        _spec(
            "dualpipev", V, MIXED, _dualpipev,
            stash=lambda s, m, r: 2 * s + 1, bubble=dualpipev_bubble, bubble_holds=lambda s, m, r: m >= 2 * s,
            min_devices=2,
        ),
        _spec(
            "naive", ANY, FULL, _picked(ls.gpipe_picker, FULL_KINDS),
            stash=lambda s, m, r: r, bubble=_pipe_bubble(2, 2), bubble_holds=lambda s, m, r: r == 1,
            microbatches=1,
        ),
    )
}  # fmt: skip


def spec_of(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {name!r}; choose from {', '.join(SCHEDULES)}.")
    return SCHEDULES[name]


def build_schedule(
    name: str,
    stages: int,
    microbatches: int,
    repeats: int = 1,
    *,
    placement: Sequence[int] | None = None,
    backward: bool = True,
) -> Schedule:
    """The table ``name`` (one of :data:`SCHEDULES`) on ``stages`` devices along ``pipe``;
    ``backward=False`` gives the forward-only table of evaluation (the same forwards for every schedule)."""
    spec = spec_of(name)
    for label, value in (("stages", stages), ("microbatches", microbatches), ("repeats", repeats)):
        if value < 1:
            raise ConfigError(f"pipeline {label} must be positive, got {value}.")
    if stages < spec.min_devices:
        raise ConfigError(f"--schedule {name} needs at least {spec.min_devices} devices along pipe, got {stages}.")
    chunk_stage = spec.placement_for(stages, repeats, placement)
    microbatches = spec.microbatches_for(microbatches)
    if backward:
        schedule = spec.table(stages, microbatches, chunk_stage)
    else:
        schedule = _picked(ls.forward_picker, (FORWARD,))(stages, microbatches, chunk_stage)
    schedule = schedule._replace(name=name)
    validate(schedule, backward=backward)
    return schedule


def gpipe(stages: int, microbatches: int, repeats: int = 1, **options) -> Schedule:
    """All forwards, then all backwards (module docstring)."""
    return build_schedule("gpipe", stages, microbatches, repeats, **options)


def one_f_one_b(stages: int, microbatches: int, repeats: int = 1, **options) -> Schedule:
    """1F1B, interleaved when a device holds several chunks (module docstring)."""
    name = "interleaved-1f1b" if repeats > 1 else "1f1b"
    return build_schedule(name, stages, microbatches, repeats, **options)


def zb_h1(stages: int, microbatches: int, **options) -> Schedule:
    """Zero-bubble ZB-H1 (module docstring)."""
    return build_schedule("zb-h1", stages, microbatches, **options)


def zb_v(stages: int, microbatches: int, **options) -> Schedule:
    """Zero-bubble ZB-V: two chunks per device in a V (module docstring)."""
    return build_schedule("zb-v", stages, microbatches, **options)


def dualpipev(stages: int, microbatches: int, **options) -> Schedule:
    """DualPipeV: ZB-V's V with overlapped forward-backward pairs (module docstring)."""
    return build_schedule("dualpipev", stages, microbatches, **options)


def naive(stages: int, repeats: int = 1, **options) -> Schedule:
    """Vanilla model parallelism: one micro-batch, F1..FS then BS..B1; each device busy 2 of 2S ticks."""
    return build_schedule("naive", stages, 1, repeats, **options)
