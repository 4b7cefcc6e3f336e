"""The training loop behind ``python -m jaxmp.train``: set-up checks, steps, evaluation, summary.

Order matters: every check that can fail on user input (flags, mesh, data files, divisibility of
parameters and batch, the metrics path) runs before the first file is written, so a bad run exits
with one line and leaves everything the user had untouched. Step ``n + 1`` is dispatched before step
``n``'s loss is fetched, so the host never stalls the device (nanodo's ``Trainer.do_step``).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax

from jaxmp.config import Config, validate
from jaxmp.data import Dataset, eval_batches, load_dataset, num_batches, train_batches
from jaxmp.mesh import mesh_from_spec, simulate_cpu_devices
from jaxmp.metrics import MetricsWriter, check_metrics_path
from jaxmp.models import check_strategy
from jaxmp.sharding import print_sharding_report
from jaxmp.step import Program, TrainState, build_program


class Summary(NamedTuple):
    """What a finished run reports."""

    steps: int
    final_loss: float
    eval_loss: float
    eval_accuracy: float
    train_time_s: float
    losses: tuple[float, ...]


class Setup(NamedTuple):
    """Everything validated and built before the first step."""

    cfg: Config
    dataset: Dataset
    program: Program
    steps: int


def prepare(cfg: Config) -> Setup:
    """Validate ``cfg`` against devices and data and compile the program; writes nothing.

    Raises:
      ConfigError: any invalid input, with one sentence naming it.
    """
    validate(cfg)
    check_strategy(cfg.model)
    check_metrics_path(cfg.run.metrics_file)
    if cfg.run.cpu_devices:
        simulate_cpu_devices(cfg.run.cpu_devices)
    mesh = mesh_from_spec(cfg.run.mesh)
    dataset = load_dataset(cfg.data, cfg.run.seed)
    train_batches(dataset, cfg.run.batch_size, cfg.run.seed)  # raises if one batch does not fit
    steps = cfg.run.steps or cfg.run.epochs * num_batches(len(dataset.x_train), cfg.run.batch_size)
    program = build_program(cfg, mesh, dataset.x_train.shape[1:], dataset.num_classes)
    for function in (program.init, program.train_step, program.eval_step):
        function.compiled  # noqa: B018 (compile now, so no step time includes compilation)
    return Setup(cfg, dataset, program, steps)


def evaluate(program: Program, params, dataset: Dataset, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy over the whole test set (padding masked out)."""
    loss_sum = correct = 0.0
    for x, y, mask in eval_batches(dataset.x_test, dataset.y_test, batch_size):
        out = program.eval_step(params, *program.put_batch(x, y), jax.device_put(mask, program.y_sharding))
        loss_sum += float(out["loss_sum"])
        correct += float(out["correct"])
    n = len(dataset.y_test)
    return loss_sum / n, correct / n


def train(setup: Setup, writer: MetricsWriter, on_step=None) -> tuple[TrainState, list[float], float]:
    """Run ``setup.steps`` train steps; returns the final state, the losses and the training time.

    ``step_time_s`` of step n is the time between step n - 1's and step n's results becoming ready
    (compilation happened in :func:`prepare`); evaluation time is not charged to any step.
    """
    cfg, program = setup.cfg, setup.program
    batches = train_batches(setup.dataset, cfg.run.batch_size, cfg.run.seed)
    state = program.init()
    losses: list[float] = []
    clock = {"start": time.perf_counter()}
    clock["ready"] = clock["start"]

    def record(loss_array) -> None:
        loss = float(loss_array)  # blocks until that step is done
        now = time.perf_counter()
        step_time, clock["ready"] = now - clock["ready"], now
        losses.append(loss)
        writer.write({"step": len(losses), "loss": loss, "step_time_s": step_time})
        if on_step:
            on_step(len(losses), loss, cfg.run.batch_size / step_time)

    pending = None
    for step in range(1, setup.steps + 1):
        x, y = next(batches)
        state, metrics = program.train_step(state, *program.put_batch(x, y))
        if pending is not None:  # fetch step n - 1 only after step n is dispatched
            record(pending)
        pending = metrics["loss"]
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < setup.steps:
            record(pending)
            pending = None
            eval_loss, eval_accuracy = evaluate(program, state.params, setup.dataset, cfg.run.batch_size)
            writer.write({"step": step, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy})
            clock["ready"] = time.perf_counter()
    if pending is not None:
        record(pending)
    return state, losses, time.perf_counter() - clock["start"]


def run(cfg: Config, console=None) -> Summary:
    """Train and evaluate ``cfg``; print the sharding report, a progress bar and a summary."""
    from rich.console import Console

    console = console or Console()
    setup = prepare(cfg)
    if cfg.run.report:
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            jax.eval_shape(setup.program.init).params,
            setup.program.state_shardings.params,
        )
        print_sharding_report(abstract, setup.program.mesh, console)
    writer = MetricsWriter(cfg.run.metrics_file)
    try:
        progress, on_step = _progress_bar(console, setup.steps)
        with progress:
            state, losses, seconds = train(setup, writer, on_step)
        eval_loss, eval_accuracy = evaluate(setup.program, state.params, setup.dataset, cfg.run.batch_size)
        writer.write({"step": setup.steps, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy})
        writer.commit()
    finally:
        writer.close()
    summary = Summary(setup.steps, losses[-1], eval_loss, eval_accuracy, seconds, tuple(losses))
    _print_summary(console, cfg, setup.program.mesh, summary)
    return summary


def _progress_bar(console, total: int):
    """A rich progress bar; returns the per-step callback and the Progress to close."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:,.0f} ex/s"),
        console=console,
        transient=False,
    )
    task = progress.add_task("train", total=total, loss=float("nan"), rate=0.0)

    def on_step(step: int, loss: float, rate: float) -> None:
        progress.update(task, completed=step, loss=loss, rate=rate)

    return progress, on_step


def _print_summary(console, cfg: Config, mesh: jax.sharding.Mesh, summary: Summary) -> None:
    from rich.table import Table

    mesh_text = ",".join(f"{name}={size}" for name, size in mesh.shape.items())
    table = Table(title="summary", title_justify="left", show_header=False)
    rows = {
        "model / strategy": f"{cfg.model.model} / {cfg.model.strategy}",
        "mesh": mesh_text,
        "steps": f"{summary.steps}",
        "final train loss": f"{summary.final_loss:.4f}",
        "eval loss": f"{summary.eval_loss:.4f}",
        "eval accuracy": f"{summary.eval_accuracy:.4f}",
        "train time": f"{summary.train_time_s:.2f} s",
    }
    for name, value in rows.items():
        table.add_row(name, value)
    console.print(table)
