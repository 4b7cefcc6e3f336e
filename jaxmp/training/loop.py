"""The training loop behind ``python -m jaxmp.train``: set-up checks, steps, evaluation, summary.

Order matters: every check that can fail on user input (flags, mesh, data files, divisibility of
parameters and batch, the metrics path, the checkpoint folder and the checkpoint itself) runs before
the first file is written, so a bad run exits with one line and leaves everything the user had
untouched. Step ``n + 1`` is dispatched before step ``n``'s loss is fetched, so the host never stalls
the device (nanodo's ``Trainer.do_step``); the exceptions are the steps that are saved, evaluated or
profiled, which wait for their own results first.

Failure behaviour: a non-finite loss or gradient norm stops the run at that step (:class:`Diverged`,
exit code 1) before it can be saved, so the newest checkpoint is always a good one; SIGINT (Ctrl-C)
and SIGTERM (what SLURM sends before it kills a job) only set a flag, the loop saves a checkpoint at
the next step boundary if ``--checkpoint-dir`` was given and stops (:class:`Interrupted`, exit code
128 + signal); a second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from jaxmp.config import INT32_MAX, Config, ConfigError, Interrupted, RunStopped, WriteFailed, stop_at_once, validate
from jaxmp.models import check_preset
from jaxmp.models.contract import function_label, own_model_fn
from jaxmp.parallel.mesh import MeshShape, as_mesh, run_mesh, simulate_cpu_devices
from jaxmp.parallel.sharding import print_sharding_report
from jaxmp.pipeline import check_schedule_csv
from jaxmp.pipeline.packing import print_stage_report
from jaxmp.pipeline.plot import check_plot_path, save_schedule_plot
from jaxmp.speech import speaks_python
from jaxmp.training.checkpoint import (
    SET_ASIDE,
    Health,
    Restored,
    Saver,
    check_directory,
    check_resume_or_damage,
    complete_steps,
    restore,
    steps_text,
)
from jaxmp.training.data import Dataset, batch_rows, eval_batches, load_dataset, num_batches
from jaxmp.training.distributed import initialize, is_main_process
from jaxmp.training.memory import check_state_fits, model_subject
from jaxmp.training.metrics import MetricsWriter, carried_records, check_metrics_path, check_tensorboard
from jaxmp.training.profiling import StepProfiler, check_profile
from jaxmp.training.step import Program, TrainState, build_program, put_global

STOP_SYNC_EVERY = 10  # multi-process runs agree on a stop request every this many steps


@speaks_python
def fit(
    model_fn: Callable,
    train,
    test=None,
    *,
    optimizer=None,
    loss: Callable | None = None,
    rules: Mapping | None = None,
    classes: int | None = None,
    config: Config | None = None,
    console=None,
    **options,
) -> Summary:
    """Train a model of your own with everything ``python -m jaxmp.train`` gives the presets.

    Args:
      model_fn: ``rngs -> model``, an NNX model written as a list of layers (``jaxmp.models.contract``).
      train, test: ``(examples, labels)`` host arrays (labels: integer class ids, one per example or one
        per token of int32 token ids; -1 ignores one); ``test`` defaults to
        ``train``. Every process of a multi-process run passes the same arrays and feeds only the rows
        its devices hold.
      optimizer: an optax ``GradientTransformation``; default: the one ``config`` names.
      loss: ``(outputs, labels) -> loss per label`` (per example or per token); default: cross-entropy.
      rules: logical axis name -> mesh axes, over the strategy's table (e.g. ``{"hidden": "tensor"}``).
      config: the run's options; ``options`` override its fields by name (``mesh="data=2,pipe=2"`` or a
        ``jax.sharding.Mesh`` with axes among data, tensor, pipe,
        ``microbatches=4``, ``steps=100``, ``checkpoint_dir=...``, ``resume=True``, ...).

    Returns:
      The :class:`Summary`, final state included.

    Raises:
      ConfigError: invalid input (one sentence, before anything is written).
      Diverged, Interrupted: as :func:`train`.
    """
    mesh = None
    if not isinstance(options.get("mesh", ""), str):  # a jax.sharding.Mesh of the user's own
        mesh = as_mesh(options["mesh"])
        options["mesh"] = str(MeshShape.of(mesh))
    cfg = (config or Config()).replace(**options)
    dataset = Dataset.of(train, test, classes=classes)
    return run(cfg, console, Own(model_fn, optimizer, loss, rules, dataset, mesh))


class Summary(NamedTuple):
    """What a finished run reports."""

    steps: int
    final_loss: float
    eval_loss: float
    eval_accuracy: float
    train_time_s: float
    losses: tuple[float, ...]
    state: TrainState | None = None  # the final train state (parameters as the program holds them)
    sample: str | None = None  # text datasets: what the model wrote (--sample-tokens)
    program: Program | None = None  # the compiled program that trained (its HLO, memory, shardings)
    dataset: Dataset | None = None  # the data it trained on

    @property
    def eval_perplexity(self) -> float:
        return perplexity(self.eval_loss)


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean loss in nats per token (capped where a float64 would overflow)."""
    return math.exp(min(loss, 700.0))


class Own(NamedTuple):
    """The parts of a run the user brings (:func:`jaxmp.fit`); ``None``: the preset ``cfg`` names."""

    model_fn: Callable | None = None  # rngs -> an nnx model written as a list of layers
    optimizer: Any = None  # an optax GradientTransformation
    loss: Callable | None = None  # (outputs, labels) -> loss per label
    rules: Mapping | None = None  # logical name -> mesh axes, over the strategy's table
    dataset: Dataset | None = None  # host arrays (jaxmp.training.data.Dataset.of)
    mesh: jax.sharding.Mesh | None = None  # a mesh of the user's own, in place of the --mesh spec

    def program_options(self) -> dict:
        return dict(model_fn=self.model_fn, optimizer=self.optimizer, loss=self.loss, rules=self.rules)

    def model_name(self, cfg: Config) -> str:
        """What the summary calls the model: the preset, or the function of the user's own."""
        if self.model_fn is None:
            return cfg.model.model
        return cfg.model.model_fn or function_label(self.model_fn)

    def describe(self) -> dict:
        """What a checkpoint records of these parts, so a resume with other parts is refused."""
        own = {}
        if self.model_fn is not None:
            own["model"] = {"model": getattr(self.model_fn, "__qualname__", type(self.model_fn).__name__)}
        if self.optimizer is not None:
            own["optimizer"] = "own"
        if self.dataset is not None:
            own["dataset"] = self.dataset.name
        return own


PRESETS = Own()  # no parts of the user's own: everything from the config


class Setup(NamedTuple):
    """Everything validated and built before the first step."""

    cfg: Config
    dataset: Dataset
    program: Program
    steps: int
    restored: Restored | None = None  # the checkpoint a --resume run starts from
    profile: tuple[int, int] | None = None  # first and last step to trace
    own: Own = PRESETS


class Diverged(RunStopped):
    """The loss or gradient norm became NaN or infinite; that step was not saved."""


def prepare(cfg: Config, own: Own = PRESETS) -> Setup:
    """Validate ``cfg`` (and the user's ``own`` parts) against devices, data and checkpoints, compile
    the program; writes nothing.

    Raises:
      ConfigError: any invalid input, with one sentence naming it.
    """
    validate(cfg)
    own = own._replace(model_fn=own_model_fn(cfg, own.model_fn))
    if own.model_fn is None:
        check_preset(cfg.model)
    check_metrics_path(cfg.run.metrics_file)
    check_tensorboard(cfg.run.tensorboard_dir)
    check_plot_path(cfg.run.schedule_plot)
    check_schedule_csv(cfg.pipeline)  # the file and its micro-batches now; its rows against the mesh's pipe later
    check_directory(cfg)
    if cfg.run.cpu_devices:
        simulate_cpu_devices(cfg.run.cpu_devices)
    initialize(cfg.distributed)
    mesh = own.mesh if own.mesh is not None else run_mesh(cfg.run.mesh, cfg.run.cpu_devices)
    dataset = own.dataset if own.dataset is not None else load_dataset(cfg.data, cfg.run.seed)
    if cfg.run.sample_tokens and dataset.vocab is None:
        raise ConfigError(
            f"--sample-tokens needs a text dataset (shakespeare, synthetic-text); {dataset.name} has no vocabulary."
        )
    batch_rows(dataset, cfg.run.batch_size, cfg.run.seed)  # raises if one batch does not fit
    steps = cfg.run.steps or cfg.run.epochs * num_batches(len(dataset.x_train), cfg.run.batch_size)
    if steps > INT32_MAX:
        raise ConfigError(f"--epochs {cfg.run.epochs} is {steps} steps, beyond {INT32_MAX}: the step counter is int32.")
    input_shape = dataset.x_train.shape[1:]
    start = _check_start(cfg, input_shape, dataset.num_classes, steps, own.describe())
    profile = check_profile(cfg, start, steps)
    program = build_program(
        cfg, mesh, input_shape, dataset.num_classes, **own.program_options(), **batch_shape(dataset)
    )
    check_state_fits(program, model_subject(cfg, own.model_fn))  # from shapes: nothing allocated yet
    save_schedule_plot(program.pipeline, cfg.run.schedule_plot)
    restored = None
    if cfg.checkpoint.resuming:
        restored = restore(cfg, program, input_shape, dataset.num_classes, own.describe())
    for function in (program.init, program.train_step, program.eval_step):
        function.compiled  # noqa: B018 (compile now, so no step time includes compilation)
    return Setup(cfg, dataset, program, steps, restored, profile, own)


def batch_shape(dataset: Dataset) -> dict:
    """``build_program``'s ``input_dtype`` and ``label_shape`` for ``dataset``'s examples."""
    return dict(input_dtype=dataset.x_train.dtype, label_shape=dataset.y_train.shape[1:])


def _check_start(cfg: Config, input_shape: tuple[int, ...], classes: int, steps: int, own: dict) -> int:
    """The step a run starts from: 0, or that of the checkpoint ``--resume`` continues (checked early)."""
    if not cfg.checkpoint.resuming:
        return 0
    path, start = check_resume_or_damage(cfg, input_shape, classes, own)
    if start >= steps:
        raise ConfigError(
            f"checkpoint {path} is already at step {start} of the {steps} this run trains; "
            "raise --steps (or --epochs) to train further."
        )
    return start


def evaluate(program: Program, params, dataset: Dataset, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy over every valid label of the test set (padding and ignored labels
    masked out): per example for classification, per token (nats per token) for a language model."""
    loss_sum = correct = count = 0.0
    for x, y, mask in eval_batches(dataset.x_test, dataset.y_test, batch_size):
        out = program.eval_step(params, *program.put_batch(x, y), put_global(mask, program.y_sharding))
        loss_sum += float(out["loss_sum"])
        correct += float(out["correct"])
        count += float(out["count"])
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


class _Tracker:
    """Fetches each step's metrics one step late, records them, and stops a diverged run."""

    def __init__(self, writer: MetricsWriter, on_step, batch_size: int, saver: Saver | None, history=()):
        self.writer, self.on_step, self.batch_size, self.saver = writer, on_step, batch_size, saver
        self.losses: list[float] = []
        # every step's loss and gradient norm, earlier runs' included: the baseline of a save's Health
        self.seen = [(r["loss"], r["grad_norm"]) for r in history if "loss" in r and "grad_norm" in r]
        self.pending = None
        self.start = self.ready = time.perf_counter()
        self.stepped_seconds = 0.0  # the steps' own time: no compilation, evaluation or saving

    def push(self, step: int, metrics) -> None:
        """Record the previous step (its result is needed only now that this one is dispatched)."""
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is not None:
            step, metrics = self.pending
            self.pending = None
            self._record(step, float(metrics["loss"]), float(metrics["grad_norm"]))

    def restart_clock(self) -> None:
        """Do not charge evaluation time to the next step."""
        self.ready = time.perf_counter()

    def _record(self, step: int, loss: float, grad_norm: float) -> None:
        now = time.perf_counter()  # float() above blocked until the step was done
        step_time, self.ready = now - self.ready, now
        self.writer.write({"step": step, "loss": loss, "grad_norm": grad_norm, "step_time_s": step_time})
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.losses.append(loss)
            self.seen.append((loss, grad_norm))
        if self.saver:  # this step judges the checkpoint of the previous one
            self.saver.observe(step, self.health() if finite else Health(loss, grad_norm, loss, grad_norm))
        if not finite:
            raise Diverged(self._diverged_message(step, loss, grad_norm))
        self.stepped_seconds += step_time
        if self.on_step:  # the mean rate so far: one step's time varies with what the host queued ahead
            self.on_step(step, loss, self.examples_per_second)

    def health(self) -> Health:
        """How the newest recorded step stands against the run so far (saved with its checkpoint)."""
        losses, norms = zip(*self.seen, strict=True)
        return Health(losses[-1], norms[-1], min(losses), statistics.median(norms))

    @property
    def examples_per_second(self) -> float:
        return self.batch_size * len(self.losses) / self.stepped_seconds if self.stepped_seconds else 0.0

    def _diverged_message(self, step: int, loss: float, grad_norm: float) -> str:
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        message = f"{what} at step {step}, so the run stopped without saving that step"
        if not self.saver:
            return message + "."
        steady, why_not = self.saver.steady_checkpoint()
        if steady is None:
            why_not = f" ({why_not})" if why_not else ""
            return f"{message}; no checkpoint is worth resuming{why_not}: start again, e.g. with a lower --lr."
        newer = f" ({why_not})" if why_not else ""
        return (
            f"{message}; the newest steady checkpoint is step {steady}{newer}: resume it with "
            f"--resume-from {steady}, e.g. with a lower --lr."
        )


class _StopRequest:
    """SIGINT and SIGTERM at any moment of a run end it in one line, with exit code 128 + signal.

    - During training they set a flag that the loop reads between steps: there the donated state is
      whole, so it is saved (if checkpoints were asked for) and the save committed before the run stops.
    - Before the first step, after the last, and for a second Ctrl-C while a stop is under way, they
      stop at once (:class:`StoppedAtOnce` raised from the handler), saying what was and was not saved.
    """

    def __init__(self):
        self.signum: int | None = None
        self.phase = "start-up"  # then "training", then "finishing"
        self.saver: Saver | None = None
        self._previous = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.phase == "training" and self.signum is None:
            self.signum = signum
            return
        if self.phase == "training" and signum != signal.SIGINT:
            return  # a repeated SIGTERM: the stop it asked for is under way
        stop_at_once(self._at_once(signal.Signals(signum).name), signum)

    def _at_once(self, name: str) -> str:
        when = {"start-up": "before the first step", "training": "again, at once", "finishing": "after the last step"}
        head = f"{name} {when[self.phase]}"
        saver = self.saver
        if saver is None:
            return f"{head}; nothing was written." if self.phase == "start-up" else f"{head}; nothing was saved."
        steps = complete_steps(saver.directory)
        newest = f"the newest checkpoint is {saver.directory}/{steps[-1]}" if steps else "no checkpoint was saved"
        if saver.last_saved is not None and not saver.committed(saver.last_saved):
            cut = f"checkpoint {saver.last_saved} was not committed (the next run removes its temporary folder)"
            return f"{head}; {cut}; {newest}."
        return f"{head}; {newest}."

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def requested(self, step: int, last: bool) -> bool:
        """Whether to stop after ``step``; every process of a multi-process run gives the same answer."""
        if jax.process_count() == 1:
            return self.signum is not None
        if step % STOP_SYNC_EVERY and not last:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(int(self.signum or 0))
        self.signum = self.signum or (int(max(flags)) or None)
        return self.signum is not None


def train(
    setup: Setup,
    writer: MetricsWriter,
    on_step=None,
    saver: Saver | None = None,
    stop: _StopRequest | None = None,
    history=(),
) -> tuple[TrainState, list[float], float]:
    """Run the steps of ``setup`` (from its checkpoint, if any); returns final state, losses, training time.

    ``step_time_s`` of step n is the time between step n - 1's and step n's results becoming ready
    (compilation happened in :func:`prepare`); evaluation time is not charged to any step.

    Raises:
      Diverged: a step's loss or gradient norm was not finite.
      Interrupted: SIGINT or SIGTERM arrived (after the checkpoint of the step reached, if asked for).

    ``stop``: the run's signal handling (default: one for these steps); ``history``: the metrics records
    of the steps before ``setup``'s checkpoint, the baseline of each save's :class:`Health`.
    """
    cfg, program, ds = setup.cfg, setup.program, setup.dataset
    start = setup.restored.step if setup.restored else 0
    rows = batch_rows(ds, cfg.run.batch_size, cfg.run.seed, start)
    state = setup.restored.state if setup.restored else program.init()
    tracker = _Tracker(writer, on_step, cfg.run.batch_size, saver, history)
    profiler = StepProfiler(setup.profile, cfg.run.profile_dir)
    with contextlib.nullcontext(stop) if stop else _StopRequest() as stop:
        stop.phase, stop.saver = "training", saver
        try:
            for step in range(start + 1, setup.steps + 1):
                profiler.before(step)
                x, y = program.put_rows(ds.x_train, ds.y_train, next(rows))
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = program.train_step(state, x, y)
                tracker.push(step, metrics)
                profiler.after(step, metrics)
                _between_steps(setup, step, state, tracker, saver, stop)
        finally:
            profiler.close()
        tracker.flush()
        stop.phase = "finishing"
    return state, tracker.losses, time.perf_counter() - tracker.start


def _between_steps(setup: Setup, step: int, state, tracker: _Tracker, saver: Saver | None, stop) -> None:
    """Evaluate, save and stop when due; each first waits for this step's metrics."""
    cfg, last = setup.cfg, step == setup.steps
    if cfg.run.eval_every and step % cfg.run.eval_every == 0 and not last:
        tracker.flush()
        eval_loss, eval_accuracy = evaluate(setup.program, state.params, setup.dataset, cfg.run.batch_size)
        tracker.writer.write({"step": step, **_eval_record(setup.dataset, eval_loss, eval_accuracy)})
        tracker.restart_clock()
    stopping = stop.requested(step, last)
    if saver and (saver.due(step) or last or stopping):
        tracker.flush()  # raises Diverged before a bad state can be saved
        saver.save(step, state, tracker.health())
        tracker.restart_clock()  # the save's blocking part is not charged to the next step
    if stopping and not last:
        tracker.flush()
        name = signal.Signals(stop.signum).name
        if saver:
            saver.wait()  # announced only once its folder is committed
            message = f"{name} at step {step}: saved checkpoint {saver.directory}/{step}; continue with --resume."
        else:
            message = f"{name} at step {step}: nothing saved (no --checkpoint-dir given)."
        raise Interrupted(message, stop.signum)


def run(cfg: Config, console=None, own: Own = PRESETS) -> Summary:
    """Train and evaluate ``cfg`` (with the user's ``own`` parts); print the sharding report, a progress
    bar and a summary.

    Raises:
      ConfigError: invalid input (before anything is written).
      Diverged, Interrupted: see :func:`train`; the metrics file stays as it was, checkpoints are kept.
    """
    from rich.console import Console

    with _StopRequest() as stop:
        setup = prepare(cfg, own)
        main = is_main_process()
        console = console or Console(quiet=not main)
        _announce_start(console, cfg, setup)
        start = setup.restored.step if setup.restored else 0
        metrics_file = cfg.run.metrics_file if main else None
        history = carried_records(metrics_file, start)
        writer = MetricsWriter(metrics_file, history, cfg.run.tensorboard_dir if main else None)
        saver = None
        if cfg.checkpoint.checkpoint_dir:
            saver = Saver(
                cfg, setup.dataset.x_train.shape[1:], setup.dataset.num_classes, setup.program, own.describe()
            )
            if saver.set_aside:
                aside = f"{saver.directory}/{SET_ASIDE}"
                console.print(f"set aside the newer checkpoints {steps_text(saver.set_aside)} in {aside} (kept)")
        try:
            progress, on_step = _progress_bar(console, setup.steps, start)
            with progress:
                state, losses, seconds = train(setup, writer, on_step, saver, stop, history)
            eval_loss, eval_accuracy = evaluate(setup.program, state.params, setup.dataset, cfg.run.batch_size)
            writer.write({"step": setup.steps, **_eval_record(setup.dataset, eval_loss, eval_accuracy)})
            writer.commit()
        except BaseException as error:
            _close_after(error, writer, saver)
            raise
        writer.close()
        if saver:
            saver.close()
    sample = _sample(setup, state) if cfg.run.sample_tokens else None
    summary = Summary(
        setup.steps,
        losses[-1],
        eval_loss,
        eval_accuracy,
        seconds,
        tuple(losses),
        state,
        sample,
        setup.program,
        setup.dataset,
    )
    _print_summary(console, cfg, setup, summary)
    _announce_outputs(console, cfg, saver)
    return summary


def _announce_start(console, cfg: Config, setup: Setup) -> None:
    """Say where the run starts from and what it wrote while starting (the schedule plot)."""
    if setup.restored:
        mesh = MeshShape.of(setup.program.mesh)
        console.print(f"resumed from step {setup.restored.step} ({setup.restored.path}) on mesh {mesh}")
    if cfg.run.schedule_plot:
        console.print(f"wrote the schedule plot {cfg.run.schedule_plot}")
    if cfg.run.report:
        _print_report(setup, console)


def _close_after(error: BaseException, writer: MetricsWriter, saver: Saver | None) -> None:
    """Close the outputs of a run that stopped: the metrics stay in their ``.partial`` file; a save in
    flight is waited for, unless the stop was at once (a second Ctrl-C, a failed write)."""
    with contextlib.suppress(WriteFailed):  # the error already in flight is the one to report
        writer.close()
        if saver and not getattr(error, "exit_now", False):
            saver.close()


def _announce_outputs(console, cfg: Config, saver: Saver | None) -> None:
    """Name each file or folder the run wrote, once."""
    if cfg.run.metrics_file:
        console.print(f"wrote metrics {cfg.run.metrics_file}")
    if saver:
        steps = ", ".join(map(str, complete_steps(saver.directory)))
        console.print(f"wrote checkpoints {saver.directory} (steps {steps})")
    if cfg.run.tensorboard_dir:
        console.print(f"wrote TensorBoard scalars {cfg.run.tensorboard_dir}")


def _eval_record(dataset: Dataset, eval_loss: float, eval_accuracy: float) -> dict:
    """The metrics of one evaluation; a language model's loss is per token, and its perplexity follows."""
    record = {"eval_loss": eval_loss, "eval_accuracy": eval_accuracy}
    if dataset.vocab is not None:
        record["eval_perplexity"] = perplexity(eval_loss)
    return record


def _sample(setup: Setup, state: TrainState) -> str:
    """``--sample-tokens`` of text the trained model writes after the first held-out window."""
    from jaxmp.training.sampling import generate
    from jaxmp.training.text import decode

    prompt = setup.dataset.x_test[0]
    ids = generate(setup.program, state, prompt, setup.cfg.run.sample_tokens, setup.cfg.run.seed)
    return decode(prompt, setup.dataset.vocab) + "|" + decode(ids, setup.dataset.vocab)


def _print_report(setup: Setup, console) -> None:
    """Parameters (and optimizer state) per device: what ``--fsdp`` divides."""
    program = setup.program
    if program.pipeline is None:
        abstract = program.state_abstract
        print_sharding_report(abstract.params, program.mesh, console, opt_state=abstract.opt_state)
        return
    saved = program.saved_abstract  # the layers by name (the stage buffers hold them packed)
    note = ": each on the devices of its stage only, bytes there (stages and padding below)"
    print_sharding_report(saved.params, program.mesh, console, opt_state=saved.opt_state, note=note)
    print_stage_report(program.pipeline.packing, console)


def _progress_bar(console, total: int, completed: int = 0):
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
    task = progress.add_task("train", total=total, completed=completed, loss=float("nan"), rate=0.0)

    def on_step(step: int, loss: float, rate: float) -> None:
        progress.update(task, completed=step, loss=loss, rate=rate)

    return progress, on_step


def _print_summary(console, cfg: Config, setup: Setup, summary: Summary) -> None:
    from rich.table import Table

    mesh = setup.program.mesh
    mesh_text = str(MeshShape.of(mesh))
    table = Table(title="summary", title_justify="left", show_header=False)
    rows = {
        "model / strategy": f"{setup.own.model_name(cfg)} / {cfg.model.strategy}",
        "mesh": mesh_text,
        "steps": f"{summary.steps}",
        "final train loss": f"{summary.final_loss:.4f}",
        "eval loss": f"{summary.eval_loss:.4f}",
        "eval accuracy": f"{summary.eval_accuracy:.4f}",
        "train time": f"{summary.train_time_s:.2f} s",
    }
    if setup.program.pipeline is not None:
        schedule = setup.program.pipeline.train.schedule
        rows["pipeline"] = (
            f"{schedule.name}, {schedule.microbatches} micro-batches, {len(schedule.chunk_stage)} chunks on "
            f"{schedule.stages} stages, bubble {schedule.bubble_fraction:.3f}"
        )
    if setup.dataset.vocab is not None:
        from jaxmp.training.text import unigram_entropy

        rows["eval loss"] += " nats per token"
        rows["eval accuracy"] += " (next token)"
        rows["eval perplexity"] = f"{summary.eval_perplexity:.3f}"
        rows["unigram entropy"] = f"{unigram_entropy(setup.dataset.y_test):.4f} nats per token (held-out text)"
    for name, value in rows.items():
        table.add_row(name, value)
    console.print(table)
    if summary.sample is not None:
        from rich.panel import Panel

        console.print(Panel(summary.sample, title="sample: the prompt | what the model wrote", title_align="left"))
