"""Rich tables for ``python -m jaxmp.analyze`` and ``python -m jaxmp.plan`` (presentation only)."""

from __future__ import annotations

from jaxmp.inspection.collectives import origin
from jaxmp.parallel.mesh import PIPE

MIB = 2**20


def _axes(axes: tuple[str, ...]) -> str:
    return "x".join(axes) or "-"


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / MIB:,.2f} MiB"


def print_report(report, console) -> None:
    """Print a :class:`~jaxmp.inspection.step_report.StepReport`: collectives, axis totals, comparison, memory."""
    from rich.table import Table

    mesh = ",".join(f"{k}={v}" for k, v in report.mesh.items())
    title = f"{report.model} / {report.strategy} on {mesh}, batch {report.batch_size}"
    if report.mesh.get(PIPE, 1) > 1 or report.microbatches > 1:
        title += f", {report.microbatches} micro-batches x {report.repeats} repeats"
    table = Table(title=f"collectives per train step: {title}", title_justify="left")
    for column in ("kind", "axes", "shape", "dtype", "bytes", "x/step", "from"):
        table.add_column(column, justify="right" if column in ("bytes", "x/step") else "left")
    for c in report.collectives:
        if c.elements:
            table.add_row(c.kind, _axes(c.axes), str(c.shape), c.dtype, f"{c.bytes:,}", str(c.count), origin(c.op_name))
    console.print(table)

    totals = Table(title="per mesh axis (per step, per device)", title_justify="left")
    for column in ("axes", "collectives", "elements", "bytes", "ring bytes sent"):
        totals.add_column(column, justify="left" if column == "axes" else "right")
    for row in report.axes:
        totals.add_row(
            _axes(row.axes), str(row.collectives), f"{row.elements:,}", f"{row.bytes:,}", f"{row.wire_bytes:,}"
        )
    console.print(totals)
    _print_comparison(report, console)
    _print_memory(report, console)
    for note in report.notes:
        console.print(f"- {note}", highlight=False)


def _print_comparison(report, console) -> None:
    from rich.table import Table

    marks = {"equal": "[green]=[/]", "more": "[red]more[/]", "less": "[yellow]less[/]"}
    table = Table(title="predicted (closed form) vs measured, elements per step", title_justify="left")
    for column in ("kind", "axes", "predicted", "measured", ""):
        table.add_column(column, justify="right" if column in ("predicted", "measured") else "left")
    for row in report.rows:
        predicted = "-" if row.predicted is None else f"{row.predicted:,}"
        table.add_row(row.kind, _axes(row.axes), predicted, f"{row.measured:,}", marks.get(row.status, row.status))
    console.print(table)
    terms = Table(title="closed-form terms", title_justify="left")
    for column in ("term", "kind", "axes", "elements", "formula"):
        terms.add_column(column, justify="right" if column == "elements" else "left")
    for term in report.prediction.terms:
        terms.add_row(term.term, term.kind, _axes(term.axes), f"{term.elements:,}", term.formula)
    console.print(terms)
    if report.layer:
        layer = Table(
            title="textbook layer 1000x500 inside a network (forward + backward with input gradient)",
            title_justify="left",
        )
        for column in ("strategy", "exchange", "kind", "predicted", "measured"):
            layer.add_column(column, justify="right" if column in ("predicted", "measured") else "left")
        for row in report.layer:
            layer.add_row(row.strategy, row.term, row.kind, f"{row.predicted:,}", f"{row.measured:,}")
        total = (sum(r.predicted for r in report.layer), sum(r.measured for r in report.layer))
        layer.add_row("total", "", "", f"{total[0]:,}", f"{total[1]:,}", style="bold")
        console.print(layer)


def _print_memory(report, console) -> None:
    from rich.table import Table

    m = report.memory
    table = Table(title="per device", title_justify="left", show_header=False)
    rows = {
        "parameters": _mib(m.params),
        "optimizer state": _mib(m.optimizer),
        "batch": _mib(m.batch),
        "temporaries (memory_analysis)": _mib(m.temporaries),
        "peak (args + outputs - aliased + temps)": _mib(m.peak),
        "matmul FLOPs (HLO, loops applied)": f"{report.flops:,.0f}",
        "FLOPs (cost_analysis, loop bodies once)": "?" if report.xla_flops is None else f"{report.xla_flops:,.0f}",
        "memory traffic (HLO, loops applied)": _mib(int(report.bytes_accessed)),
    }
    for name, value in rows.items():
        table.add_row(name, value)
    console.print(table)
