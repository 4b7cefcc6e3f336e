"""One schema for every option: frozen, keyword-only dataclasses.

Why frozen and hashable: a config can then be a static argument under ``jax.jit`` and can never be
mutated behind a compiled step's back. Validation that needs no devices or data lives here
(``validate``); checks that need the mesh or the dataset run before anything is written, in
``jaxmp.training.loop``. Every invalid value raises :class:`ConfigError` with one sentence naming the value and
what would be valid; the CLI prints that sentence and exits with code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import sys
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """Invalid user input: one sentence that names the bad value and what would be valid."""


def first_line(error: BaseException) -> str:
    """The first line of an exception raised by the user's own code, for a one-line ``ConfigError``."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


class RunStopped(Exception):
    """A run that ended early (diverged, interrupted): one line for the user and the process exit code.

    ``exit_now``: the command line ends the process at once after the line, without waiting for library
    threads that a cut save or start-up left behind (Orbax's wait up to 300 s for signals that will
    never come; a teardown in the middle of compilation can crash)."""

    label = "error"
    exit_code = 1
    exit_now = False


class Interrupted(RunStopped):
    """SIGINT (Ctrl-C) or SIGTERM (what SLURM sends before it kills a job) stopped training at a step
    boundary, after saving if checkpoints were asked for; exit code 128 + signal."""

    label = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StoppedAtOnce(KeyboardInterrupt):
    """SIGINT or SIGTERM at a moment with no step boundary to wait for (start-up, compilation, after the
    last step, a second Ctrl-C): raised from the signal handler, exit code 128 + signal.

    Why a ``KeyboardInterrupt``: it can surface anywhere, and no ``except Exception`` on the way (in JAX,
    Orbax or jaxmp) may swallow it, as none swallows Ctrl-C's own."""

    label = "stopped"
    exit_now = True

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


_signals_end_the_process = False  # set by the ``python -m jaxmp.*`` entry points (jaxmp.cli.run_as_command)


def stop_at_once(message: str, signum: int):
    """From a signal handler: end a ``python -m jaxmp.*`` process right here, with one line and exit code
    128 + signal; a Python caller gets :class:`StoppedAtOnce` instead.

    Why end the process from the handler: an exception raised there can land in a garbage-collector
    callback, where Python prints and drops it and the run goes on; and a teardown in the middle of
    compilation or of a save can crash. Nothing is lost: at these moments nothing is being written but a
    save that was not committed (the next run removes its temporary folder).
    """
    if not _signals_end_the_process:
        raise StoppedAtOnce(message, signum)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a stream busy in the interrupted frame
            stream.flush()
    os.write(2, f"\nstopped: {message}\n".encode())
    os._exit(128 + signum)


class WriteFailed(RunStopped):
    """A checkpoint, the metrics or TensorBoard could not be written (a folder made read-only, a full
    disk): one line naming the path and the cause; everything written before stays as it was."""

    exit_now = True


# The largest value of an int option, and why (``most=`` of a field overrides it).
INT32_MAX = 2**31 - 1
_INT32_WHY = "JAX counts and indexes in int32 here (64-bit types are off)"
SEED_MAX = 2**32 - 1
_SEED_WHY = "JAX's random keys keep a seed's low 32 bits, so a larger seed would repeat a smaller one's parameters"
MAX_CPU_DEVICES = 4096
_CPU_DEVICES_WHY = "each simulated CPU device costs start-up time and memory (100000 take minutes to start)"


def _opt(default, help: str, **kw):
    """A dataclass field whose help text the CLI shows next to its default.

    ``kw``: ``choices`` (a :class:`Choices`), ``give`` (what a text option takes, for the message that
    refuses an empty one) and ``most`` (an int option's ``(largest value, why)``; default: int32; ``None``:
    no fixed bound, checked where its memory is estimated).
    """
    return field(default=default, metadata={"help": help, **kw})


class Choices:
    """The allowed values of an option, read from the table that implements them.

    Why a reference and not a copy: adding a model, strategy, optimizer or schedule means adding it to
    its table only. The table's module is imported when the values are first needed (validation,
    ``--help``), so the schema itself imports nothing heavy and the tables may import the schema.
    """

    def __init__(self, module: str, table: str, *extra: str):
        self.module, self.table, self.extra = module, table, extra

    def __iter__(self):
        yield from self.extra
        yield from getattr(importlib.import_module(self.module), self.table)

    def __contains__(self, value) -> bool:
        return value in tuple(self)


MODELS = Choices("jaxmp.models", "PRESETS")
STRATEGIES = Choices("jaxmp.parallel.rules", "STRATEGY_RULES")
OPTIMIZERS = Choices("jaxmp.training.step", "OPTIMIZERS")
DATASETS = Choices("jaxmp.training.data", "DATASETS")
ACTIVATIONS = Choices("jaxmp.models.layers", "ACTIVATIONS", "default")
SCHEDULES = Choices("jaxmp.pipeline.registry", "SCHEDULES")
REMATS = Choices("jaxmp.pipeline", "REMAT_POLICIES")
WEIGHT_PASSES = Choices("jaxmp.pipeline", "WEIGHT_PASSES")
DTYPES = Choices("jaxmp.models.layers", "COMPUTE_DTYPES")
CONTEXT_STRATEGIES = Choices("jaxmp.models.attention", "CONTEXT_STRATEGIES")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which network to build and how wide it is."""

    model: str = _opt("mlp", "model preset", choices=MODELS)
    model_fn: str | None = _opt(
        None,
        "a model of your own instead of --model: FILE.py:NAME or MODULE:NAME, a callable rngs -> nnx model "
        "written as a list of layers (see the README)",
        give="FILE.py:NAME or MODULE:NAME",
    )
    width: int = _opt(128, "mlp, gpt: residual stream width")
    hidden: int = _opt(512, "mlp, gpt: hidden width of each block's MLP (split over tensor)")
    depth: int = _opt(2, "mlp, gpt: number of residual blocks")
    heads: int = _opt(4, "gpt: attention heads per block (split over tensor)")
    dropout: float = _opt(0.0, "gpt: dropout rate after attention and the MLP, in training")
    sequence_parallel: bool = _opt(
        False,
        "gpt: Megatron sequence parallelism: norms, dropout and residual adds split along the sequence over "
        "tensor; each all-reduce becomes an all-gather and a reduce-scatter (same bytes, 1/t of those activations)",
    )
    context_strategy: str = _opt(
        "all-gather",
        "gpt, when the mesh has a context axis: how attention reads the keys and values of the other parts of "
        "the sequence. all-gather: gather them; ring: pass blocks round the context devices, never all of them "
        "on one; ulysses: an all-to-all from a split of the sequence to a split of the heads",
        choices=CONTEXT_STRATEGIES,
    )
    context_balance: bool = _opt(
        True,
        "gpt, with a context axis: each device holds a chunk from the head of every sequence and one from its "
        "tail, so each does the same causal attention work (--no-context-balance: contiguous chunks)",
    )
    tie_embeddings: bool = _opt(
        False,
        "gpt: the LM head reuses the token embedding table (stored once, its gradient summed over both uses; "
        "under a pipeline the first and last stages each hold it)",
    )
    activation: str = _opt(
        "default",
        "activation; default: each preset's own (jaxmp.models.PRESETS: mlp uses gelu)",
        choices=ACTIVATIONS,
    )
    dtype: str = _opt(
        "float32",
        "compute dtype of activations and matmuls; parameters, gradients and optimizer state stay float32",
        choices=DTYPES,
    )
    strategy: str = _opt(
        "tp",
        "dp: replicate weights, batch over data and tensor; tp: Megatron column/row pairs; "
        "hybrid: conv layers data-parallel over all devices, dense layers tensor-parallel; "
        "column/row: split the dense model's weight by output/input",
        choices=STRATEGIES,
    )
    fsdp: bool = _opt(
        False,
        "FSDP / ZeRO-3: also shard parameters and optimizer state over the mesh axes that split the batch "
        "(where a dimension divides); XLA all-gathers each weight where it is used",
    )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where examples come from."""

    dataset: str = _opt("digits", "dataset", choices=DATASETS)
    data_dir: str | None = _opt(
        None, "folder with IDX files (default for fashion-mnist: /usr/share/datasets/fashion-mnist)", give="a folder"
    )
    synthetic_shape: str = _opt(
        "28x28x1", "synthetic: example shape HxWxC or a feature count", give="HxWxC or a feature count"
    )
    synthetic_classes: int = _opt(10, "synthetic: number of classes")
    synthetic_size: int = _opt(2048, "synthetic: number of training examples", most=None)  # bound: host memory
    seq_len: int = _opt(64, "text datasets: tokens per training window (the model reads seq_len, predicts the next)")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optax optimizer."""

    optimizer: str = _opt("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = _opt(1e-3, "learning rate")
    weight_decay: float = _opt(1e-4, "adamw: decoupled weight decay")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """How layers are spread over the ``pipe`` mesh axis and how micro-batches flow through them."""

    microbatches: int = _opt(1, "split the global batch into this many micro-batches")
    schedule: str = _opt(
        "1f1b",
        "1f1b: a backward as soon as it can, at most S micro-batches stashed; gpipe: all forwards, then all "
        "backwards; interleaved-1f1b: 1f1b over --repeats chunks per device; zb-h1: zero-bubble, weight "
        "gradients fill the bubble; zb-v: zero-bubble over two chunks per device in a V, half zb-h1's bubble "
        "at 1f1b's memory; dualpipev: DeepSeek's V, a forward and a backward overlapped per tick; naive: one "
        "micro-batch (F1..FS, BS..B1)",
        choices=SCHEDULES,
    )
    schedule_csv: str | None = _opt(
        None,
        "run the schedule in this CSV file instead of --schedule: torch.distributed.pipelining's per-rank form, "
        "one row per device along pipe with its actions in order (0F0,0F1,0B0,...; F, B, or I and W; "
        "(0F7;7B3)OVERLAP_F_B a pair); it sets "
        "the chunks and their devices, and its micro-batches must be --microbatches",
        give="a .csv path",
    )
    repeats: int = _opt(1, "circular pipeline: each device holds this many non-adjacent chunks of layers")
    remat: str = _opt(
        "stage",
        "what a pipeline forward keeps for its backward: stage keeps matmul outputs (element-wise work "
        "redone: a fraction of none's stash, and faster), none keeps every residual (no re-run), full "
        "keeps only the chunk's input (backward re-runs it)",
        choices=REMATS,
    )
    weight_pass: str = _opt(
        "recompute",
        "zb-h1's and zb-v's W (weight gradient): recompute pulls the output cotangent back through the "
        "stashed residuals again (1F1B's memory); stash has B keep the cotangents W needs until W (no work "
        "done twice, more memory)",
        choices=WEIGHT_PASSES,
    )
    stage_split: str = _opt(
        "uniform",
        "chunk boundaries: uniform, auto (balanced by FLOPs), auto-memory (balanced by parameter bytes) or "
        "layer counts per chunk, e.g. 1,3 (a stacked layer of depth L counts L)",
        give="uniform, auto, auto-memory or layer counts",
    )
    placement: str | None = _opt(
        None,
        "device along pipe of each layer (consecutive layers on one device form a chunk), e.g. 0,1,1,0, or of "
        "each chunk of --stage-split; default: chunk c on device c mod pipe (a placement sets the chunks: "
        "no --repeats with it)",
        give="devices along pipe, e.g. 0,1,1,0",
    )
    unroll: bool = _opt(
        False,
        "unroll the loop over ticks and each stage's loop over layers: faster on GPUs, where every loop "
        "iteration costs a synchronisation, but compile time then grows with micro-batches and depth",
    )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Mesh, schedule of the run and outputs."""

    mesh: str = _opt(
        "data=-1",
        "mesh shape: AXIS=SIZE for any of data, tensor, pipe, in any order (pipe=2,data=2 is data=2,pipe=2); "
        "a left-out axis is 1; -1 fills",
        give="AXIS=SIZE items, e.g. data=2,tensor=4",
    )
    cpu_devices: int | None = _opt(
        None, "simulate this many CPU devices (set before JAX starts)", most=(MAX_CPU_DEVICES, _CPU_DEVICES_WHY)
    )
    batch_size: int = _opt(64, "global batch size")
    steps: int | None = _opt(None, "train steps (default: --epochs worth)")
    epochs: int = _opt(8, "epochs, used when --steps is not given")
    eval_every: int = _opt(0, "evaluate every N steps (0: only at the end)")
    seed: int = _opt(0, "seed for parameters, shuffling and dropout", most=(SEED_MAX, _SEED_WHY))
    metrics_file: str | None = _opt(None, "write JSON Lines metrics here", give="a file path")
    tensorboard_dir: str | None = _opt(
        None, "also write TensorBoard scalars here (needs the tensorboard extra)", give="a folder"
    )
    profile_steps: str | None = _opt(
        None, "trace train steps A:B (1-based, inclusive) with jax.profiler, for Perfetto or TensorBoard", give="A:B"
    )
    profile_dir: str = _opt("jaxmp-profile", "folder for the --profile-steps trace", give="a folder")
    schedule_plot: str | None = _opt(
        None, "write a PNG picture of the run's pipeline schedule to this path", give="a .png path"
    )
    report: bool = _opt(True, "print the sharding report at start-up")
    sample_tokens: int = _opt(0, "text datasets: after training, print this many tokens the model generates")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints of the sharded train state, and resuming from them."""

    checkpoint_dir: str | None = _opt(
        None, "save checkpoints in this folder (one sub-folder per step)", give="a folder"
    )
    checkpoint_every: int = _opt(0, "save every N steps (0: only at the end and on Ctrl-C)")
    keep: int = _opt(3, "keep the K newest checkpoints")
    resume: bool = _opt(False, "continue from the newest checkpoint in --checkpoint-dir (onto any mesh)")
    resume_from: int | None = _opt(
        None, "continue from the checkpoint of this step; newer ones are moved to DIR/set-aside, never deleted"
    )

    @property
    def resuming(self) -> bool:
        return self.resume or self.resume_from is not None


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Multi-process runs on JAX's runtime (automatic under SLURM, Open MPI and others JAX detects)."""

    coordinator_address: str | None = _opt(
        None, "HOST:PORT of process 0, for launchers JAX does not detect", give="HOST:PORT"
    )
    num_processes: int | None = _opt(None, "number of processes, with --coordinator-address")
    process_id: int | None = _opt(None, "this process's rank in 0..num_processes-1, with --coordinator-address")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def replace(self, **leaves) -> Config:
        """A copy with leaf options changed by name, e.g. ``cfg.replace(model="dense", lr=0.1)``."""
        groups = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in leaves.items():
            group = _group_of(name)
            groups[group] = dataclasses.replace(groups[group], **{name: value})
        return Config(**groups)


def leaf_names() -> frozenset[str]:
    """The name of every leaf option (``batch_size``, ``mesh``, ...): the CLI's flags and ``replace``'s keys."""
    return frozenset(f.name for group in dataclasses.fields(Config) for f in dataclasses.fields(group.default_factory))


def _group_of(leaf: str) -> str:
    for group in dataclasses.fields(Config):
        if leaf in {f.name for f in dataclasses.fields(group.default_factory)}:
            return group.name
    raise ConfigError(f"unknown option {leaf!r}.")


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}.")


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_type(name: str, annotation: str, value) -> None:
    """The value has its field's type (a Python caller gets the CLI's error, not a crash later); floats
    are finite."""
    base, _, optional = annotation.partition(" | ")
    flag = "--" + name.replace("_", "-")
    if value is None and optional == "None":
        return
    wanted = _TYPES[base]
    if isinstance(value, bool) != (base == "bool") or not isinstance(value, wanted):
        raise ConfigError(f"{flag} must be {'an' if base == 'int' else 'a'} {base}, got {value!r}.")
    if base == "float" and not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value}.")


def _check_value(f: dataclasses.Field, value) -> None:
    """A text option is not empty (``None`` is how an option is left out, never ``""``); an int option
    is at most its field's ``most``; a choice is one of its table's."""
    flag = "--" + f.name.replace("_", "-")
    choices = f.metadata.get("choices")
    if choices:
        if value not in choices:
            raise ConfigError(f"{flag} {value!r} is not one of {', '.join(choices)}.")
    elif isinstance(value, str) and not value.strip():
        raise ConfigError(f"{flag} is empty; give {f.metadata.get('give', 'a value')} (or leave the flag out).")
    bound = f.metadata.get("most", (INT32_MAX, _INT32_WHY))
    if isinstance(value, int) and not isinstance(value, bool) and bound is not None:
        most, why = bound
        if value > most:
            raise ConfigError(f"{flag} {value} is beyond {most}: {why}.")


def validate(cfg: Config) -> Config:
    """Check every option that can be checked without devices or data; return ``cfg``."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a jaxmp Config, got {type(cfg).__name__}.")
    for group in (getattr(cfg, f.name) for f in dataclasses.fields(cfg)):
        for f in dataclasses.fields(group):
            value = getattr(group, f.name)
            _check_type(f.name, f.type, value)
            _check_value(f, value)
    for name in ("width", "hidden", "depth", "heads"):
        _positive(name, getattr(cfg.model, name))
    if cfg.model.tie_embeddings and cfg.model.model_fn is not None:
        raise ConfigError(
            "--tie-embeddings applies to the presets; a model of your own ties a parameter by holding the same "
            "nnx.Param in two parts (self.post = Head(table=self.pre.tokens))."
        )
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {cfg.model.dropout}.")
    _positive("seq_len", cfg.data.seq_len)
    if cfg.run.sample_tokens < 0:
        raise ConfigError(f"--sample-tokens must be 0 or positive, got {cfg.run.sample_tokens}.")
    if cfg.model.model_fn is not None:
        where, sep, name = cfg.model.model_fn.rpartition(":")
        if not (sep and where and name.isidentifier()):
            raise ConfigError(f"--model-fn {cfg.model.model_fn!r} is not FILE.py:NAME or MODULE:NAME.")
    for name in ("batch_size", "steps", "epochs", "cpu_devices"):
        _positive(name, getattr(cfg.run, name))
    if cfg.run.seed < 0:
        raise ConfigError(f"--seed must be 0 or positive, got {cfg.run.seed}.")
    _positive("lr", cfg.optim.lr)
    _positive("microbatches", cfg.pipeline.microbatches)
    _positive("repeats", cfg.pipeline.repeats)
    _validate_schedule_csv(cfg.pipeline)
    _validate_schedule_microbatches(cfg.pipeline)
    if cfg.pipeline.placement is not None and cfg.pipeline.repeats != 1:
        raise ConfigError(
            f"--repeats {cfg.pipeline.repeats} does nothing with --placement {cfg.pipeline.placement}: the placement "
            "names every chunk's device (name a device twice for two chunks on it); drop --repeats."
        )
    _positive("synthetic_classes", cfg.data.synthetic_classes)
    _positive("synthetic_size", cfg.data.synthetic_size)
    if cfg.run.eval_every < 0:
        raise ConfigError(f"--eval-every must be 0 or positive, got {cfg.run.eval_every}.")
    if cfg.optim.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be 0 or positive, got {cfg.optim.weight_decay}.")
    _validate_checkpoint(cfg.checkpoint)
    _validate_distributed(cfg.distributed)
    if cfg.run.profile_steps is not None:
        parse_profile_steps(cfg.run.profile_steps)
    return cfg


def _validate_schedule_microbatches(cfg: PipelineConfig) -> None:
    """A schedule that runs one number of micro-batches (``naive``: one) refuses another."""
    from jaxmp.pipeline.registry import SCHEDULES as specs

    spec = specs.get(cfg.schedule)
    if spec is not None and spec.microbatches not in (None, cfg.microbatches):
        runs = "one micro-batch" if spec.microbatches == 1 else f"{spec.microbatches} micro-batches"
        raise ConfigError(
            f"--schedule {cfg.schedule} runs {runs}; drop --microbatches {cfg.microbatches} or use gpipe."
        )


def _validate_schedule_csv(cfg: PipelineConfig) -> None:
    """A CSV schedule names every action and chunk: a schedule, repeats or placement besides it is refused
    (the file itself is read where the pipeline is built, and by ``check_schedule_csv`` at start-up)."""
    if cfg.schedule_csv is None:
        return
    others = {
        "--schedule": cfg.schedule if cfg.schedule != PipelineConfig.schedule else None,
        "--repeats": cfg.repeats if cfg.repeats != 1 else None,
        "--placement": cfg.placement,
    }
    for flag, value in others.items():
        if value is not None:
            raise ConfigError(
                f"--schedule-csv {cfg.schedule_csv} sets the schedule, chunks and placement; drop {flag} {value}."
            )


def _validate_checkpoint(cfg: CheckpointConfig) -> None:
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be 0 or positive, got {cfg.checkpoint_every}.")
    _positive("keep", cfg.keep)
    _positive("resume_from", cfg.resume_from)
    if cfg.checkpoint_dir is None:
        asked = {"--resume": cfg.resume, "--resume-from": cfg.resume_from, "--checkpoint-every": cfg.checkpoint_every}
        for flag, given in asked.items():
            if given:
                raise ConfigError(f"{flag} needs --checkpoint-dir, the folder that holds the checkpoints.")


def _validate_distributed(cfg: DistributedConfig) -> None:
    given = {
        "--coordinator-address": cfg.coordinator_address,
        "--num-processes": cfg.num_processes,
        "--process-id": cfg.process_id,
    }
    if all(v is None for v in given.values()):
        return
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} missing: give all of {', '.join(given)} or none (auto-detect).")
    host, sep, port = cfg.coordinator_address.rpartition(":")
    if not (sep and host and port.isdecimal() and 0 < int(port) < 65536):
        raise ConfigError(f"--coordinator-address {cfg.coordinator_address!r} is not HOST:PORT (e.g. node0:1234).")
    _positive("num_processes", cfg.num_processes)
    if not 0 <= cfg.process_id < cfg.num_processes:
        raise ConfigError(f"--process-id {cfg.process_id} is not in 0..{cfg.num_processes - 1} (--num-processes).")


def parse_profile_steps(text: str) -> tuple[int, int]:
    """``"5:8"`` -> ``(5, 8)``: the first and last train step to trace (1-based, inclusive)."""
    first, sep, last = text.partition(":")
    if sep and first.strip().isdecimal() and last.strip().isdecimal() and 1 <= int(first) <= int(last):
        return int(first), int(last)
    raise ConfigError(f"--profile-steps {text!r} is not A:B with 1 <= A <= B (train steps, e.g. 5:8).")
