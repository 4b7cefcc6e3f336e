"""Rank every mesh of N devices by a roofline step time (behind ``python -m jaxmp.plan``).

For every factorisation ``data * tensor * pipe = N`` (``data * context * tensor * pipe = N`` for a model
with a sequence: ``gpt``), and, with ``pipe > 1``, every candidate number of
micro-batches ``M = f * pipe`` for ``f`` in ``--microbatch-factors``) the train step is compiled ahead of
time (nothing runs) and timed by a roofline whose every input is read off the compiled program:

    t_compute = matmul FLOPs per device / peak FLOP/s        (jaxmp.inspection.flops: dots and convolutions,
                                                              loop trip counts applied)
    t_memory  = bytes read and written per device / HBM bandwidth          (same walk of the HLO)
    t_comm    = sum over collectives of ring bytes sent x executions / link bandwidth
                (jaxmp.inspection.collectives.wire_bytes: all-reduce 2 (g-1)/g x array, others what they move)
    t_step    = max(t_compute, t_memory) + t_comm

Communication is assumed not to overlap computation (XLA may hide some of it, so t_comm is the
pessimistic side). The pipeline bubble needs no extra term: the HLO walk charges every tick of the
executor's loops its costliest branch (idle ticks included), so the FLOPs already hold about
``1 / (1 - bubble)`` times the useful work; the schedule's bubble fraction (GPipe and 1F1B
``(S-1)/(M*R+S-1)``) is printed next to each shape. Hardware
numbers come from :mod:`jaxmp.inspection.hardware` (one table, with sources).

A shape is infeasible when the configuration does not build (a parameter or the batch does not divide
its mesh axes, too few layers for the stages, micro-batches that do not divide the batch: the trainer's
own ``ConfigError`` sentence) or when its peak memory per device (``memory_analysis()``: arguments +
outputs not aliased to them + temporaries) exceeds the device memory. Feasible shapes are ranked by
``t_step``; infeasible ones follow with their reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from jaxmp.config import Config, ConfigError
from jaxmp.inspection.collectives import collectives, wire_bytes
from jaxmp.inspection.compiled import memory_and_flops
from jaxmp.inspection.flops import hlo_cost
from jaxmp.inspection.hardware import GIB, Hardware
from jaxmp.parallel.mesh import AXES, CONTEXT, DATA, PIPE, TENSOR, MeshShape
from jaxmp.speech import speaks_python


class PlanRow(NamedTuple):
    """One candidate shape: feasibility, the measured inputs of the roofline and its terms (seconds)."""

    mesh: MeshShape
    microbatches: int  # 0: infeasible for every candidate
    feasible: bool
    reason: str  # why infeasible; "" when feasible
    peak_bytes: int | None = None
    flops: float | None = None
    memory_bytes: float | None = None
    comm_bytes: int | None = None
    bubble: float = 0.0
    t_compute: float | None = None
    t_memory: float | None = None
    t_comm: float | None = None

    @property
    def t_step(self) -> float | None:
        """The roofline step time of the module docstring (None when infeasible or not compiled)."""
        if self.t_compute is None:
            return None
        return max(self.t_compute, self.t_memory) + self.t_comm


def factorisations(devices: int, axes: tuple[str, ...] = (DATA, TENSOR, PIPE)) -> list[MeshShape]:
    """Every :class:`MeshShape` over ``axes`` (the others size 1) whose sizes multiply to ``devices``:
    the first axis largest first, each later one smallest first."""
    divisors = [d for d in range(1, devices + 1) if devices % d == 0]
    *free, last = axes
    shapes = []
    for sizes in itertools.product(*(divisors[::-1] if i == 0 else divisors for i in range(len(free)))):
        rest, left = divmod(devices, math.prod(sizes))
        if left == 0:
            shapes.append(MeshShape(**dict(zip(free, sizes, strict=True)), **{last: rest}))
    return shapes


def mesh_axes(cfg: Config, own_model: bool) -> tuple[str, ...]:
    """The axes a plan varies: ``context`` too for a preset that has a sequence (``gpt``)."""
    from jaxmp.models import preset

    sequence = not own_model and preset(cfg.model).has_sequence
    return tuple(a for a in AXES if sequence or a != CONTEXT)


def microbatch_candidates(pipe: int, factors: tuple[int, ...]) -> list[int]:
    """``M = f * pipe`` for each factor (GPipe's bubble shrinks as M grows); 1 without a pipeline."""
    return [1] if pipe == 1 else sorted({f * pipe for f in factors})


def evaluate(
    cfg: Config,
    shape: MeshShape,
    microbatches: int,
    input_shape: tuple[int, ...],
    classes: int,
    hw: Hardware,
    **pieces,
) -> PlanRow:
    """Compile ``cfg`` on ``shape`` with ``microbatches`` and apply the roofline; never raises ConfigError.
    ``pieces``: a model, optimizer, loss or rules of your own, as ``build_program`` takes them."""
    from jaxmp.parallel.mesh import build_mesh
    from jaxmp.pipeline import is_pipelined, schedule_for
    from jaxmp.training.step import build_program

    cfg = cfg.replace(mesh=str(shape), microbatches=microbatches)
    mesh = build_mesh(shape)
    try:
        compiled = build_program(cfg, mesh, input_shape, classes, **pieces).train_step.compiled
    except ConfigError as err:
        label = "does not divide" if "divi" in str(err) else "cannot run"
        return PlanRow(shape, microbatches, False, f"{label}: {err}")
    text = compiled.as_text()
    cost = hlo_cost(text)
    peak = memory_and_flops(compiled).peak_bytes
    comm = sum(wire_bytes(c) * c.count for c in collectives(text, mesh))
    piped = shape.pipe > 1 and is_pipelined(cfg.pipeline, shape.pipe)
    bubble = schedule_for(cfg.pipeline, shape.pipe).bubble_fraction if piped else 0.0
    dtype = cfg.model.dtype  # the matmuls' dtype (parameters stay float32)
    row = PlanRow(
        shape,
        microbatches,
        True,
        "",
        peak,
        cost.flops,
        cost.bytes_accessed,
        comm,
        bubble,
        t_compute=cost.flops / hw.flops_for(dtype),
        t_memory=cost.bytes_accessed / hw.memory_bandwidth,
        t_comm=comm / hw.link_bandwidth,
    )
    if peak is not None and peak > hw.memory_bytes:
        reason = f"does not fit: needs {peak / GIB:.3g} GiB per device, {hw.name} has {hw.memory_bytes / GIB:.3g} GiB"
        return row._replace(feasible=False, reason=reason)
    return row


@speaks_python
def plan(
    cfg: Config,
    devices: int,
    hw: Hardware,
    input_shape: tuple[int, ...],
    classes: int,
    factors: tuple[int, ...] = (1, 2, 4),
    *,
    model_fn: Callable | None = None,
    progress: Callable[[str], None] | None = None,
    **pieces,
) -> list[PlanRow]:
    """Every factorisation of ``devices`` x micro-batch candidate, feasible ones by predicted step time first.

    ``model_fn`` (default: ``--model-fn``, else the preset) and ``pieces`` (``optimizer=``, ``loss=``,
    ``rules=``) are a model and parts of your own, as :func:`jaxmp.training.step.build_program` takes them.
    ``progress``: called with a line before each candidate is compiled (each takes seconds).
    """
    from jaxmp.models.contract import own_model_fn

    pieces["model_fn"] = own_model_fn(cfg, model_fn)
    rows = []
    shapes = factorisations(devices, mesh_axes(cfg, pieces["model_fn"] is not None))
    for i, shape in enumerate(shapes, 1):
        for m in microbatch_candidates(shape.pipe, factors):
            if progress:
                progress(f"compiling {shape} with {m} micro-batch(es): mesh {i} of {len(shapes)}")
            row = evaluate(cfg, shape, m, input_shape, classes, hw, **pieces)
            if not row.feasible and row.peak_bytes is None and "micro-batch" not in row.reason:
                rows.append(row._replace(microbatches=0))  # fails whatever M is: one row for the shape
                break
            rows.append(row)
    return sorted(rows, key=lambda r: (not r.feasible, r.t_step if r.t_step is not None else 0.0))


def parse_factors(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)``; raises ConfigError unless every item is a positive integer."""
    try:
        factors = tuple(int(item) for item in text.split(","))
    except ValueError:
        factors = ()
    if not factors or min(factors) < 1:
        raise ConfigError(f"--microbatch-factors {text!r} is not a comma-separated list of positive integers.")
    return factors


def to_json(rows: list[PlanRow], hw: Hardware) -> dict[str, Any]:
    """The ranking as plain JSON types."""
    shapes = [
        {
            **row._asdict(),
            "mesh": dataclasses.asdict(row.mesh),
            "t_step": row.t_step,
            "peak_gib": (row.peak_bytes or 0) / GIB,
        }
        for row in rows
    ]
    return {"hardware": hw._asdict(), "roofline": "max(flops/peak, bytes/hbm_bw) + comm/link_bw", "shapes": shapes}


def duration(seconds: float | None) -> str:
    """Seconds as a person reads them, 3 significant digits in the unit that fits (a tiny model's
    compute term is microseconds: milliseconds with 3 decimals would read 0.000)."""
    if seconds is None:
        return ""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def print_plan(rows: list[PlanRow], hw: Hardware, console) -> None:
    """The ranking as a rich table, then the hardware numbers and their source."""
    from rich.table import Table

    table = Table(title=f"mesh plan on {hw.name}: t_step = max(compute, memory) + comm", title_justify="left")
    axes = [axis for axis in AXES if axis != CONTEXT or any(row.mesh.context > 1 for row in rows)]
    for column in ("rank", *axes, "M", "bubble", "peak/device", "compute", "memory", "comm"):
        table.add_column(column, justify="right")
    table.add_column("t_step", justify="right", style="bold")
    table.add_column("infeasible because", justify="left", overflow="fold")

    for rank, row in enumerate(rows, 1):
        peak = "" if row.peak_bytes is None else f"{row.peak_bytes / 2**20:,.1f} MiB"
        table.add_row(
            str(rank) if row.feasible else "-",
            *(str(getattr(row.mesh, axis)) for axis in axes),
            str(row.microbatches or "any"),
            f"{row.bubble:.0%}" if row.mesh.pipe > 1 and row.flops is not None else "",
            peak,
            duration(row.t_compute),
            duration(row.t_memory),
            duration(row.t_comm),
            duration(row.t_step if row.feasible else None),
            row.reason,
        )
    console.print(table)
    console.print(f"hardware {hw.name}: {hw.source}", highlight=False)
