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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxmp.config import Config, ConfigError
from jaxmp.models import activation_of, preset
from jaxmp.parallel.sharding import path_name
from jaxmp.training.metrics import check_output_dir
from jaxmp.training.step import Program, TrainState

FORMAT = 1  # bump when the layout of ``state`` or ``meta`` changes


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
    directory, resume = cfg.checkpoint.checkpoint_dir, cfg.checkpoint.resume
    if directory is None:
        return
    check_output_dir("--checkpoint-dir", directory)
    flag = f"--checkpoint-dir {directory}"
    steps = complete_steps(directory)
    if resume and not steps:
        raise ConfigError(f"--resume: {flag} holds no complete checkpoint to resume from.")
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
    step = complete_steps(directory)[-1]
    path = os.path.join(directory, str(step))
    _compare(_read_meta(path), signature(cfg, input_shape, classes, own), path)
    return path, step


def restore(
    cfg: Config, program: Program, input_shape: tuple[int, ...], classes: int, own: dict | None = None
) -> Restored:
    """Restore the newest checkpoint of ``--checkpoint-dir`` onto ``program``'s shardings.

    Raises:
      ConfigError: see :func:`check_resume`; also an array of another shape or dtype, or unreadable
        array data; one sentence names it.
    """
    import orbax.checkpoint as ocp

    path, step = check_resume(cfg, input_shape, classes, own)
    target = _abstract_item(program)
    with _quiet_missing_metadata():
        _check_arrays(path, target)
    try:
        with _quiet_missing_metadata():
            item = ocp.StandardCheckpointer().restore(os.path.join(path, "state"), target)
    except Exception as err:  # noqa: BLE001 (TensorStore raises bare Exception for damaged data)
        raise ConfigError(f"checkpoint {path} cannot be read ({_first_line(err)}).") from None
    return Restored(program.from_saved(from_item(item)), step, path)


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
        raise ConfigError(f"checkpoint {path} is corrupt: {meta_file} is unreadable ({_first_line(err)}).") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise ConfigError(f"checkpoint {path} is corrupt: {meta_file} is not a jaxmp checkpoint description.")
    return meta


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
        metadata = ocp.StandardCheckpointer().metadata(os.path.join(path, "state"))
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as err:
        reason = _first_line(err)
        raise ConfigError(f"checkpoint {path} is corrupt: its array index is unreadable ({reason}).") from None
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    arrays = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            arrays[path_name(p)] = (list(leaf.shape), str(np.dtype(leaf.dtype)))
    if not arrays:
        raise ConfigError(f"checkpoint {path} is corrupt: its array index lists no arrays.")
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


class Saver:
    """Saves checkpoints of one run into ``--checkpoint-dir`` (asynchronously; :meth:`close` waits).

    ``program`` converts its states to the saved form (layer order); without it, states are saved as given.

    Created only after every check passed, so a run with bad input never creates the folder.
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
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.checkpoint.keep, create=True, cleanup_tmp_directories=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.last_saved: int | None = max(self._manager.all_steps(), default=None)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, step: int, state: TrainState) -> None:
        """Start saving ``state`` as step ``step`` (the caller has checked that it is finite)."""
        if step == self.last_saved:
            return
        ocp = self._ocp
        meta = {**self._signature, "step": step, "data_position": {"batches_consumed": step}}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(to_item(self._to_saved(state))), meta=ocp.args.JsonSave(meta)
        )
        self._manager.save(step, args=args, force=True)
        self.last_saved = step

    def close(self) -> None:
        """Wait for the save in flight to be committed, then release Orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()
