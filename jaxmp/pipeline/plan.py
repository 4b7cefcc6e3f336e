"""What the executor knows before it runs: the :class:`Plan` of one pipelined program.

A plan is static: the schedule table, the messages, stash slots and loops it implies
(:mod:`.transfers`), the activation shapes that cross ``pipe`` and the remat policy. Everything here is
numpy or shapes; :mod:`.engine` runs a plan, :mod:`.ticks` and :mod:`.actions` are its parts.

Shapes: M = micro-batches, b = one device's rows of a micro-batch, A = the widest activation between
two chunks (one example, flattened), S = stages, C = chunks, T = ticks, L = lanes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp.parallel.rules import as_axes
from jaxmp.pipeline.packing import Packing
from jaxmp.pipeline.schedule import FORWARD, IDLE, INPUT, SENDS_BACK, WEIGHT, Schedule
from jaxmp.pipeline.transfers import Transfers, work_out_transfers

Head = Callable[[jax.Array, jax.Array, jax.Array], dict]  # (outputs_bxK, labels_b, weights_b) -> sums


class Plan(NamedTuple):
    """Everything static about one pipelined program: the table, the messages it implies, the shapes that
    cross ``pipe``, and how a chunk's forward keeps its residuals. Built by :meth:`build`, by keyword."""

    packing: Packing
    schedule: Schedule
    transfers: Transfers
    boundaries: tuple  # one example's activation (shape, dtype) after every chunk but the last
    outputs: jax.ShapeDtypeStruct  # one example's model output (what the head reads)
    width: int  # A
    message_dtype: jnp.dtype
    batch_axes: tuple[str, ...]  # manual in the shard_map, besides pipe
    inner_rules: dict | None  # the rules table without the manual axes
    policy: object  # jax.checkpoint policy of a chunk's forward: what it keeps for its backward (--remat)
    unroll: bool
    fuse_last: bool  # the last chunk's forward runs its whole backward too (see fuses_last_chunk)
    stash_cotangents: bool  # I stashes what W needs (--weight-pass stash), else W re-pulls it
    boundary_names: tuple | None  # the logical axes the model declares for its activations between layers
    message_axes: tuple[str, ...]  # the mesh axes that split a message's flat dimension (see _message_axes)

    @staticmethod
    def build(
        *,
        packing: Packing,
        schedule: Schedule,
        batch_axes: tuple[str, ...],
        inner_rules: dict | None,
        boundaries: tuple,
        outputs: jax.ShapeDtypeStruct,
        policy,
        unroll: bool,
        stash_cotangents: bool = False,
        boundary_names: tuple | None = None,
    ) -> Plan:
        """The plan of ``schedule``; ``boundaries`` are the activations (one example) between consecutive
        chunks, ``boundary_names`` their logical axes if the model declares them (``BOUNDARY_NAMES``)."""
        width = max([1, *(math.prod(s.shape) for s in boundaries)])
        fuse = fuses_last_chunk(schedule)
        return Plan(
            packing=packing,
            schedule=schedule,
            transfers=work_out_transfers(schedule, no_ops(schedule, fuse), stashes(schedule, fuse)),
            boundaries=boundaries,
            outputs=outputs,
            width=width,
            message_dtype=boundaries[0].dtype if boundaries else jnp.float32,
            batch_axes=batch_axes,
            inner_rules=inner_rules,
            policy=policy,
            unroll=unroll,
            fuse_last=fuse,
            stash_cotangents=stash_cotangents and schedule.split_backward,
            boundary_names=boundary_names,
            message_axes=_message_axes(boundaries, boundary_names, inner_rules, width),
        )


class Checks(NamedTuple):
    """Test-only switches of one execution, kept out of :class:`Plan`: a plan is what runs in production."""

    poison: bool = False  # the stash and the messages start as NaN: a slot read before it is written shows
    masked: bool = True  # False writes every message, needed or not: the poison's negative control

    @property
    def fill(self) -> float:
        """What unwritten stash slots and idle messages hold."""
        return float("nan") if self.poison else 0.0


def split_microbatches(x_Bx: jax.Array, microbatches: int) -> jax.Array:
    """``[B, ...]`` -> ``[b, M, ...]``: micro-batch ``m`` is ``[:, m]``, examples ``m, M + m, 2M + m, ...``.

    Strided, not contiguous, so each micro-batch keeps the batch's sharding: a device's contiguous
    block of examples becomes a contiguous block of every micro-batch. A reshape, not a transpose:
    the batch is never copied, each tick reads its micro-batch's rows in place.
    """
    b = x_Bx.shape[0] // microbatches
    return x_Bx.reshape(b, microbatches, *x_Bx.shape[1:])


def _message_axes(boundaries, names, inner_rules, width: int) -> tuple[str, ...]:
    """The mesh axes that split a flat message ``[b, A]`` along ``A``: those of the boundary's first
    axis after the batch, when the model declares it split (a transformer's tokens under sequence
    parallelism) and every boundary has that one shape, so the flat split is the declared one. Else
    none: messages whole over the automatic axes."""
    if not names or not boundaries or inner_rules is None or len(names) != 1 + len(boundaries[0].shape):
        return ()
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in as_axes(inner_rules.get(names[1])) if not mesh.empty and mesh.shape[a] > 1)
    rest = [as_axes(inner_rules.get(name)) for name in names[2:]]
    same = all(b.shape == boundaries[0].shape for b in boundaries) and math.prod(boundaries[0].shape) == width
    parts = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if not axes or any(rest) or not same or boundaries[0].shape[0] % parts:
        return ()
    return axes


def executor_transfers(schedule: Schedule) -> Transfers:
    """The messages, slots and loops the executor runs ``schedule`` with."""
    return work_out_transfers(schedule, no_ops(schedule, fuses_last_chunk(schedule)))


def stashes(schedule: Schedule, fuse_last: bool) -> np.ndarray | None:
    """``[T, S, L]``: the forwards that keep residuals for their backward (all but the fused last chunk's;
    none without a backward)."""
    if not any(np.isin(lane.kind, SENDS_BACK).any() for lane in schedule.lanes):
        return None
    fused = fuse_last & (schedule.chunk == schedule.chunks - 1)
    return np.stack([(lane.kind == FORWARD) & ~fused for lane in schedule.lanes], axis=-1)


def fuses_last_chunk(schedule: Schedule) -> bool:
    """Whether the last chunk's forward also runs its backward (loss, weight gradient and input cotangent
    in one ``jax.vjp``, no re-run, no residuals kept), the cotangent kept in the input's stash slot until
    the table's ``B`` sends it.

    Only on one stage. With several, the last stage's forward tick would carry a forward and a backward
    while the other stages run one forward, and every stage waits for the slowest at each tick.
    """
    backward = np.isin(schedule.kind, SENDS_BACK).any()
    return schedule.stages == 1 and schedule.paired is None and bool(backward)


def no_ops(schedule: Schedule, fuse_last: bool) -> np.ndarray:
    """``[T, S, L]`` bool: the action does nothing (idle; a backward or ``W`` of a fused last chunk that
    has nothing to send; ``I`` of chunk 0: its ``W`` computes the weight gradient, no cotangent is sent)."""
    last = schedule.chunks - 1

    def no_op(kind, chunk):
        fused = fuse_last & (chunk == last)
        nothing = (kind == IDLE) | (fused & ((kind == WEIGHT) | (np.isin(kind, SENDS_BACK) & (last == 0))))
        return nothing | ((kind == INPUT) & (chunk == 0))

    return np.stack([no_op(lane.kind, lane.chunk) for lane in schedule.lanes], axis=-1)
