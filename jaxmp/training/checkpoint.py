"""Orbax checkpoints of the sharded train state: saved shard by shard, restored onto any mesh.

What a checkpoint holds (one folder per step, ``DIR/<step>``): ``state`` (params, optimizer state,
step counter and the dropout key's raw bits, each array written by the processes that hold its
shards, never gathered on one device) and ``meta`` (JSON: the model, optimizer, data and batch the
state belongs to, and the data position, i.e. the number of batches consumed).

Why restore needs only the *target* shardings: Orbax reads each device's slice of every array from
the stored chunks (``ShapeDtypeStruct(sharding=...)`` targets), so a state saved on
``data=2,tensor=2,pipe=2`` lands directly on ``data=4,tensor=2`` or ``pipe=4``. That works because
the saved parameter tree never depends on the mesh: a pipelined run packs each stage's parameters into
its own buffers, and ``Program.to_saved`` / ``from_saved`` convert them to and from the model's own
layer order, so a run saved on ``pipe=2`` resumes on ``pipe=4``, on another split or on one device.

Why nothing is ever lost: Orbax writes ``DIR/<step>.orbax-checkpoint-tmp-*`` and renames it when
every shard is on disk, so a run killed mid-save leaves a temporary folder that restore ignores (and
the next run removes). Older checkpoints are deleted (``--keep``) only after a newer one has been
committed, and the loop saves a step only after its loss and gradient norm came back finite. Every
check of a checkpoint against the run (model, shapes, dtypes, batch size) happens in
:func:`restore` before training starts and raises one-sentence :class:`ConfigError`.

Why damage is caught: ``meta`` holds a digest of every array (:mod:`jaxmp.training.digest`, the same
on any mesh), computed from the state as it was saved; :func:`restore` recomputes it on the arrays it
read and refuses a checkpoint whose data changed on disk, naming the array. A damaged or incomplete
checkpoint is never used silently: the error names the newest older checkpoint that restores intact,
and ``--resume-from STEP`` resumes it, moving the newer ones to ``DIR/set-aside`` (never deleting them).
Saving checks the folder is writable and has room first, so a folder made read-only or a full disk ends
the run in one line (:class:`WriteFailed`) instead of in Orbax's background threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxmp.config import Config, ConfigError, WriteFailed
from jaxmp.models import activation_of, preset
from jaxmp.parallel.sharding import path_name
from jaxmp.training.digest import digests, first_mismatch
from jaxmp.training.memory import format_bytes
from jaxmp.training.metrics import check_output_dir
from jaxmp.training.step import Program, TrainState

FORMAT = 1  # bump when the layout of ``state`` or ``meta`` changes (``digests`` and ``health`` are optional)
SET_ASIDE = "set-aside"  # where --resume-from moves the checkpoints newer than the one it resumes


class DamagedCheckpoint(ConfigError):
    """A checkpoint whose files are missing, unreadable, or changed since it was saved."""


def signature(cfg: Config, input_shape: tuple[int, ...], classes: int, own: dict | None = None) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that restores it (JSON-ready); ``own`` replaces
    the description of the parts the user brought (``jaxmp.training.loop.Own.describe``)."""
    own = own or {}
    model = own.get("model")
    if model is None:
        model = {"model": cfg.model.model, "activation": activation_of(cfg.model)}
        model.update({name: getattr(cfg.model, name) for name in preset(cfg.model).options})
    return {
        "format": FORMAT,
        "model": model,
        "optimizer": own.get("optimizer", cfg.optim.optimizer),
        "data": {"dataset": own.get("dataset", cfg.data.dataset), "input_shape": list(input_shape), "classes": classes},
        "batch": {"batch_size": cfg.run.batch_size, "seed": cfg.run.seed},
    }


def complete_steps(directory: str) -> list[int]:
    """The steps with a committed checkpoint in ``directory`` (temporary folders of cut saves skipped)."""
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        if name.isdecimal() and os.path.isdir(os.path.join(directory, name)):
            steps.append(int(name))
    return sorted(steps)


def check_directory(cfg: Config) -> None:
    """Raise ``ConfigError`` if ``--checkpoint-dir`` cannot be used as asked; writes nothing.

    Without ``--resume`` the folder must hold no checkpoint (a new run would mix with, then delete,
    the old ones); with it, there must be one to resume from.
    """
    directory, resume, chosen = cfg.checkpoint.checkpoint_dir, cfg.checkpoint.resuming, cfg.checkpoint.resume_from
    if directory is None:
        return
    check_output_dir("--checkpoint-dir", directory)
    flag = f"--checkpoint-dir {directory}"
    steps = complete_steps(directory)
    if resume and not steps:
        raise ConfigError(f"--resume: {flag} holds no complete checkpoint to resume from.")
    if chosen is not None and chosen not in steps:
        raise ConfigError(f"--resume-from {chosen}: {flag} holds checkpoints of steps {steps_text(steps)} only.")
    if not resume and steps:
        raise ConfigError(
            f"{flag} already holds checkpoints up to step {steps[-1]}; add --resume to continue that run "
            "or choose an empty folder."
        )


class Restored(NamedTuple):
    """A train state read from a checkpoint, already on the run's mesh."""

    state: TrainState
    step: int
    path: str


def check_resume(cfg: Config, input_shape: tuple[int, ...], classes: int, own: dict | None = None) -> tuple[str, int]:
    """The newest checkpoint's folder and step, after checking its description against the run.

    Reads one small JSON file, so a mismatch is reported before anything is compiled.

    Raises:
      ConfigError: the description is unreadable, or the checkpoint was saved for another model,
        optimizer, data, batch size or seed.
    """
    directory = os.path.abspath(cfg.checkpoint.checkpoint_dir)
    step = cfg.checkpoint.resume_from or complete_steps(directory)[-1]
    path = os.path.join(directory, str(step))
    _compare(_read_meta(path), signature(cfg, input_shape, classes, own), path)
    return path, step


def restore(
    cfg: Config, program: Program, input_shape: tuple[int, ...], classes: int, own: dict | None = None
) -> Restored:
    """Restore the newest checkpoint of ``--checkpoint-dir`` (or ``--resume-from``'s) onto ``program``'s
    shardings, verified against the digests it was saved with.

    Raises:
      DamagedCheckpoint: unreadable or missing files, or an array that no longer matches its digest; the
        message names the newest older checkpoint that restores intact and how to resume it.
      ConfigError: see :func:`check_resume`; also an array of another shape or dtype; one sentence.
    """
    wanted = signature(cfg, input_shape, classes, own)
    path, step = check_resume_or_damage(cfg, input_shape, classes, own)
    try:
        state = _restore_verified(path, program, wanted)
    except DamagedCheckpoint as damage:
        advice = _fallback_advice(os.path.dirname(path), step, program, wanted)
        raise DamagedCheckpoint(f"{str(damage).rstrip('.')}. {advice}") from None
    return Restored(state, step, path)


def check_resume_or_damage(cfg: Config, input_shape, classes: int, own: dict | None = None) -> tuple[str, int]:
    """:func:`check_resume`, except that a damaged description is left for :func:`restore` to report
    with its fallback (which needs the compiled program)."""
    try:
        return check_resume(cfg, input_shape, classes, own)
    except DamagedCheckpoint:
        directory = os.path.abspath(cfg.checkpoint.checkpoint_dir)
        step = cfg.checkpoint.resume_from or complete_steps(directory)[-1]
        return os.path.join(directory, str(step)), step


def _restore_verified(path: str, program: Program, wanted: dict[str, Any]) -> TrainState:
    """The state of the checkpoint at ``path`` on ``program``'s shardings, its arrays checked against the
    digests written when it was saved."""
    import orbax.checkpoint as ocp

    meta = _read_meta(path)
    _compare(meta, wanted, path)
    target = _abstract_item(program)
    with _quiet_missing_metadata():
        _check_arrays(path, target)
    try:
        with _quiet_missing_metadata(), ocp.StandardCheckpointer() as checkpointer:
            item = checkpointer.restore(os.path.join(path, "state"), target)
    except Exception as err:  # noqa: BLE001 (TensorStore raises bare Exception for damaged data)
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read ({_first_line(err)}).") from None
    stored = meta.get("digests")
    if stored:  # checkpoints written before digests were recorded are read unverified
        bad = first_mismatch(stored, item)
        if bad is not None:
            raise DamagedCheckpoint(
                f"checkpoint {path} is damaged: {bad} no longer matches the digest it was saved with."
            )
    return program.from_saved(from_item(item))


def _fallback_advice(directory: str, damaged: int, program: Program, wanted: dict[str, Any]) -> str:
    """Which older checkpoint restores intact, and how to resume it (each is restored and verified)."""
    older = [step for step in complete_steps(directory) if step < damaged]
    for step in reversed(older):
        try:
            _restore_verified(os.path.join(directory, str(step)), program, wanted)
        except ConfigError:
            continue
        return (
            f"The newest intact checkpoint is step {step}: resume it with --resume-from {step} "
            f"(the newer ones are moved to {os.path.join(directory, SET_ASIDE)}, not deleted)."
        )
    if older:
        return f"No older checkpoint restores intact either (steps {steps_text(older)})."
    return "There is no older checkpoint in that folder."


def steps_text(steps: list[int]) -> str:
    """``2, 4, 6`` (or ``none``)."""
    return ", ".join(map(str, steps)) or "none"


@contextlib.contextmanager
def _quiet_missing_metadata():
    """Hide Orbax's warning that the item folder has no ``_CHECKPOINT_METADATA``: the manager writes
    that file one level up (the step folder), and this restore reads the item directly."""

    def keep(record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()

    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _first_line(err: Exception) -> str:
    """The gist of a library error: its first line, without TensorStore's spec dump."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line.split(" See full TensorStore details")[0][:300]


def _read_meta(path: str) -> dict[str, Any]:
    meta_file = os.path.join(path, "meta", "metadata")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DamagedCheckpoint(
            f"checkpoint {path} is damaged: {meta_file} is unreadable ({_first_line(err)})."
        ) from None
    if not isinstance(meta, dict) or not set(meta) >= _DESCRIPTION:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {meta_file} is not a jaxmp checkpoint description.")
    return meta


_DESCRIPTION = {"format", "model", "optimizer", "data", "batch"}  # what every jaxmp checkpoint records


_NOT_FLAGS = {"input_shape": "input shape", "classes": "number of classes"}


def _compare(saved: dict[str, Any], wanted: dict[str, Any], path: str) -> None:
    """Raise ``ConfigError`` naming the first field where the checkpoint and the run differ."""
    if saved.get("format") != wanted["format"]:
        raise ConfigError(f"checkpoint {path} has format {saved.get('format')}, this jaxmp reads {wanted['format']}.")
    for group in ("model", "optimizer", "data", "batch"):
        old, new = saved.get(group), wanted[group]
        if old == new:
            continue
        key = group
        if isinstance(new, dict) and isinstance(old, dict):
            key = next((k for k in new if old.get(k) != new[k]), next(iter(new)))
            old, new = old.get(key), new[key]
        name = _NOT_FLAGS.get(key, "--" + key.replace("_", "-"))
        raise ConfigError(f"checkpoint {path} was saved with {name} {_show(old)}, but this run has {_show(new)}.")


def _show(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, list) else str(value)


def _check_arrays(path: str, target: dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming the first array whose stored shape or dtype differs from the run's."""
    stored = _stored_arrays(path)
    wanted = {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    for name in sorted(wanted, key=lambda n: not n.startswith("params.")):  # parameters first: clearest
        leaf = wanted[name]
        if name not in stored:
            raise ConfigError(f"checkpoint {path} has no array {name}; it was saved for another model or optimizer.")
        shape, dtype = stored[name]
        if tuple(shape) != tuple(leaf.shape):
            raise ConfigError(
                f"checkpoint {path}: {name} has shape {tuple(shape)}, this run needs {tuple(leaf.shape)}."
            )
        if np.dtype(dtype) != np.dtype(leaf.dtype):
            raise ConfigError(f"checkpoint {path}: {name} has dtype {dtype}, this run needs {np.dtype(leaf.dtype)}.")
    extra = sorted(set(stored) - set(wanted))
    if extra:
        raise ConfigError(f"checkpoint {path} has array {extra[0]} that this run's model does not.")


def _stored_arrays(path: str) -> dict[str, tuple[list[int], str]]:
    """Shapes and dtypes of the stored arrays, by dotted name, from Orbax's tree metadata."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(os.path.join(path, "state"))
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as err:
        reason = _first_line(err)
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: its array index is unreadable ({reason}).") from None
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    arrays = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            arrays[path_name(p)] = (list(leaf.shape), str(np.dtype(leaf.dtype)))
    if not arrays:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: its array index lists no arrays.")
    return arrays


def to_item(state: TrainState) -> dict[str, Any]:
    """The saved form of a state: a plain dict, the typed PRNG key as its raw ``uint32`` bits."""
    key = jax.random.key_data(state.key)
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "key": key}


def from_item(item: dict[str, Any]) -> TrainState:
    """Inverse of :func:`to_item`."""
    return TrainState(item["params"], item["opt_state"], item["step"], jax.random.wrap_key_data(item["key"]))


def _abstract_item(program: Program) -> dict[str, Any]:
    """Shapes, dtypes and target shardings of the saved form of ``program``'s state (parameters in the
    model's own layer order, so any split, placement or mesh can read it)."""
    abstract = program.saved_abstract
    item = to_item_abstract(abstract)
    item_sh = to_item_abstract(jax.tree.map(lambda a: a.sharding, abstract))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), item, item_sh)


def to_item_abstract(state: TrainState) -> dict[str, Any]:
    """:func:`to_item` for abstract states and sharding trees (the key's bits are ``uint32[2]``)."""
    key = state.key
    if isinstance(key, jax.ShapeDtypeStruct):
        key = jax.eval_shape(jax.random.key_data, key)
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "key": key}


class Health(NamedTuple):
    """How training stood at a saved step, recorded in its ``meta``: after a divergence, the newest
    *steady* checkpoint is the one worth resuming (:meth:`Saver.steady_checkpoint`).

    Steady: the loss is finite and at most ``LOSS_GROWTH`` times the lowest loss the run had reached,
    and the gradient norm is finite and at most ``GRAD_GROWTH`` times the median of the run's so far.
    A checkpoint saved while the loss was already climbing holds parameters that will diverge again.
    A step's loss is computed on the parameters *before* its update, so a checkpoint of step N counts
    as steady only if step N + 1 is steady too (:meth:`Saver.observe`).
    """

    loss: float
    grad_norm: float
    best_loss: float
    median_grad_norm: float

    LOSS_GROWTH = 2.0
    GRAD_GROWTH = 10.0

    @property
    def steady(self) -> bool:
        finite = all(map(np.isfinite, self))
        return bool(
            finite
            and self.loss <= self.LOSS_GROWTH * self.best_loss
            and self.grad_norm <= self.GRAD_GROWTH * self.median_grad_norm
        )


class Saver:
    """Saves checkpoints of one run into ``--checkpoint-dir`` (asynchronously; :meth:`close` waits).

    ``program`` converts its states to the saved form (layer order); without it, states are saved as given.

    Created only after every check passed, so a run with bad input never creates the folder. With
    ``--resume-from``, the checkpoints newer than that step are moved to ``DIR/set-aside`` first
    (:attr:`set_aside` lists them): the run will save those steps again, and the user keeps the old ones.
    """

    def __init__(
        self,
        cfg: Config,
        input_shape: tuple[int, ...],
        classes: int,
        program: Program | None = None,
        own: dict | None = None,
    ):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(cfg.checkpoint.checkpoint_dir)
        self.every = cfg.checkpoint.checkpoint_every
        self._signature = signature(cfg, input_shape, classes, own)
        self._to_saved = program.to_saved if program is not None else (lambda state: state)
        self.set_aside = _set_aside_newer(self.directory, cfg.checkpoint.resume_from)
        steady, self._unsteady = _recorded_health(self.directory)
        self._keep = _KeepNewestAndSteady(cfg.checkpoint.keep, steady)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=self._keep, create=True, cleanup_tmp_directories=True
        )
        self._errors = _OrbaxErrors().install()  # until close: failures come from Orbax's threads at any time
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.last_saved: int | None = max(self._manager.all_steps(), default=None)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, step: int, state: TrainState, health: Health | None = None) -> None:
        """Start saving ``state`` as step ``step`` (the caller has checked that it is finite).

        Raises:
          WriteFailed: the folder is not writable or has no room, or an earlier save failed.
        """
        if step == self.last_saved:
            return
        ocp = self._ocp
        item = to_item(self._to_saved(state))
        self._call(self.last_saved, self._manager.check_for_errors)  # a failed save in flight speaks first
        self._check_room(step, item)
        meta = {**self._signature, "step": step, "data_position": {"batches_consumed": step}}
        meta["digests"] = digests(item)
        if health is not None:
            meta["health"] = health._asdict()
            if health.steady:
                self._keep.steady.add(step)
            else:
                self._unsteady[step] = health
        args = ocp.args.Composite(state=ocp.args.StandardSave(item), meta=ocp.args.JsonSave(meta))
        previous, self.last_saved = self.last_saved, step
        self._call(previous, lambda: self._manager.save(step, args=args, force=True))

    def observe(self, step: int, health: Health) -> None:
        """Step ``step`` was computed on the parameters saved at ``step - 1`` (if they were): an unsteady
        step makes that checkpoint unsteady too, before the preservation policy next decides."""
        if not health.steady and step - 1 == self.last_saved:
            self._keep.steady.discard(step - 1)
            self._unsteady.setdefault(step - 1, health)

    def steady_checkpoint(self) -> tuple[int | None, str]:
        """The newest checkpoint worth resuming after a divergence, and why the newer ones are not."""
        self.wait()
        steps = complete_steps(self.directory)
        steady = max((step for step in steps if step in self._keep.steady), default=None)
        for step in steps:
            if (steady is None or step > steady) and step in self._unsteady:
                health = self._unsteady[step]
                return steady, f"by step {step} the loss had climbed to {health.loss:.4g} (best {health.best_loss:.4g})"
        return steady, ""

    def wait(self) -> None:
        """Block until the save in flight is committed (its folder renamed into place)."""
        self._call(self.last_saved, self._manager.wait_until_finished)

    def committed(self, step: int | None) -> bool:
        return step is not None and os.path.isdir(os.path.join(self.directory, str(step)))

    def close(self) -> None:
        """Wait for the save in flight to be committed, then release Orbax's threads."""
        try:
            self.wait()
            self._call(self.last_saved, self._manager.close)
        finally:
            self._errors.remove()

    def _check_room(self, step: int, item) -> None:
        """Raise ``WriteFailed`` before a save that cannot succeed: an unwritable folder, a full disk."""
        needed = sum(leaf.nbytes for leaf in jax.tree.leaves(item))
        probe = os.path.join(self.directory, f".jaxmp-write-test-{os.getpid()}")
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
            os.remove(probe)
            free = shutil.disk_usage(self.directory).free
        except OSError as err:
            self._settle()
            raise self._failed(step, err.strerror or str(err)) from None
        if free < needed:
            self._settle()
            raise self._failed(step, f"it needs about {format_bytes(needed)}, the disk has {format_bytes(free)} free")

    def _settle(self, seconds: float = 10.0) -> None:
        """Before a refusal: give the save in flight a moment to commit (or to fail, and say so), so that
        the message lists what is really intact."""
        deadline = time.monotonic() + seconds
        while self._manager.is_saving_in_progress() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._call(self.last_saved, self._manager.check_for_errors)

    def _call(self, in_flight: int | None, action) -> None:
        """Run an Orbax call; a failure in it, or in the save of ``in_flight`` it waited for, becomes one
        ``WriteFailed`` naming the step that was not committed."""
        try:
            action()
            self._manager.check_for_errors()
        except Exception as err:  # noqa: BLE001 (Orbax re-raises its threads' errors as they came)
            failed = in_flight if in_flight is not None and not self.committed(in_flight) else self.last_saved
            raise self._failed(failed, _os_cause(self._errors.first or str(err))) from None

    def _failed(self, step: int | None, cause: str) -> WriteFailed:
        intact = [s for s in complete_steps(self.directory) if s != step]
        kept = (
            f"the checkpoints saved before (steps {steps_text(intact)}) are intact"
            if intact
            else "no checkpoint was saved"
        )
        what = f"checkpoint {step}" if step is not None else "a checkpoint"
        return WriteFailed(f"cannot save {what} in {self.directory}: {cause}; {kept}.")


class _KeepNewestAndSteady:
    """Orbax's preservation policy for ``--keep K``: the K newest checkpoints, and the newest *steady*
    one (:class:`Health`) even when it is older, so that a run whose loss climbed for K saves before it
    diverged still has a checkpoint worth resuming."""

    def __init__(self, newest: int, steady: set[int]):
        self.newest, self.steady = newest, steady

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        steps = [info.step for info in checkpoints]
        kept = set(sorted(steps)[-self.newest :])
        kept |= set(sorted(self.steady & set(steps))[-1:])
        return [step in kept for step in steps]


def _recorded_health(directory: str) -> tuple[set[int], dict[int, Health]]:
    """The checkpoints already in ``directory`` saved steady (or before health was recorded), and the
    health of the others."""
    steady, unsteady = set(), {}
    for step in complete_steps(directory):
        try:
            recorded = _read_meta(os.path.join(directory, str(step))).get("health")
        except DamagedCheckpoint:
            continue
        if recorded is None or Health(**recorded).steady:
            steady.add(step)
        else:
            unsteady[step] = Health(**recorded)
    return steady, unsteady


def _set_aside_newer(directory: str, step: int | None) -> list[int]:
    """Move the checkpoints newer than ``step`` to ``DIR/set-aside/<step>`` (process 0; the others wait)."""
    if step is None:
        return []
    newer = [s for s in complete_steps(directory) if s > step]
    if newer and jax.process_index() == 0:
        aside = os.path.join(directory, SET_ASIDE)
        os.makedirs(aside, exist_ok=True)
        for s in newer:
            target = os.path.join(aside, str(s))
            suffix = 1
            while os.path.exists(target):
                target, suffix = os.path.join(aside, f"{s}-{suffix}"), suffix + 1
            os.rename(os.path.join(directory, str(s)), target)
    if newer and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxmp set-aside")
    return newer


def _os_cause(text: str) -> str:
    """The operating system's words in a storage library's error (``[Errno 28] No space left on
    device``), else the error's first line."""
    found = re.findall(r"\[Errno \d+\] ([^:\]\[\n\"']+)", text)  # Python's OSError
    found += re.findall(r"([A-Z][^:\]\[\n\"]*) \[os_error_code='?\d+'?\]", text)  # TensorStore's
    return found[-1].strip() if found else _first_line(RuntimeError(text))


class _OrbaxErrors(logging.Filter):
    """While installed, keep Orbax's error logs (a traceback per background thread of a failed save) off
    the screen and remember the first cause, for the one line the run ends with."""

    def __init__(self):
        super().__init__()
        self.first: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "orbax" not in record.pathname:
            return True
        if self.first is None and record.exc_info and record.exc_info[1] is not None:
            self.first = str(record.exc_info[1])
        return False

    def install(self) -> _OrbaxErrors:
        logging.getLogger("absl").addFilter(self)
        self._unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable_hook
        return self

    def remove(self) -> None:
        logging.getLogger("absl").removeFilter(self)
        sys.unraisablehook = self._unraisable

    def _unraisable_hook(self, unraisable) -> None:
        """A failed save's TensorStore callbacks find Orbax's event loop closed: not the user's news."""
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            self._unraisable(unraisable)
