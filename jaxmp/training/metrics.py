"""JSON Lines metrics that never clobber a file the user already has, even when the run fails.

Records stream to ``PATH.partial`` (so ``tail -f`` works) and replace ``PATH`` only when the run
finishes; a run that fails or is interrupted leaves ``PATH`` as it was and the partial file for
inspection (and for a resumed run, which starts from the records up to its checkpoint). TensorBoard
scalars are optional: ``--tensorboard-dir`` needs ``tensorboardX`` (the ``tensorboard`` extra).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import traceback
from typing import Any

from jaxmp.config import ConfigError, WriteFailed


def check_metrics_path(path: str | None) -> None:
    """Raise ``ConfigError`` if ``path`` cannot be written, before the run touches anything."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ConfigError(f"--metrics-file {path} is a directory; give a file path.")
    check_output_dir("--metrics-file", os.path.dirname(os.path.abspath(path)), file=path)


def check_output_dir(flag: str, path: str, file: str | None = None) -> None:
    """Raise ``ConfigError`` unless ``path`` is a folder or could be created as one (the run creates
    it when it first writes there: :func:`make_parent`). ``file``: the path the flag named, when
    ``path`` is its folder."""
    named = f"{flag} {file or path}"
    if os.path.exists(path) and not os.path.isdir(path):
        where = f"{named}: {path}" if file else named
        raise ConfigError(f"{where} is a file; give a folder.")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ConfigError(f"{named}: {parent} is not a writable folder.")


def make_parent(path: str) -> str:
    """Create the folders above the file ``path`` (output folders are made as needed); ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


class MetricsWriter:
    """Append JSON objects to ``PATH.partial``; ``commit()`` moves it onto ``PATH`` atomically.

    Args:
      path: the JSONL file, or None for no file.
      carried: records of an earlier run to start with (a resumed run keeps its history).
      tensorboard_dir: also write every numeric field as a TensorBoard scalar there.
    """

    def __init__(self, path: str | None, carried: list[dict[str, Any]] = (), tensorboard_dir: str | None = None):
        self.path = path
        self._file = open(make_parent(path) + ".partial", "w") if path else None  # noqa: SIM115 (closed in commit/close)
        for record in carried:
            self._write_line(record)
        self._scalars = ScalarWriter(tensorboard_dir)

    def _write_line(self, record: dict[str, Any]) -> None:
        if self._file:
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            except OSError as err:
                raise self._failed(err) from None

    def write(self, record: dict[str, Any]) -> None:
        self._write_line(record)
        self._scalars.write(record)

    def commit(self) -> None:
        if self._file:
            try:
                self._file.close()
                os.replace(self.path + ".partial", self.path)
            except OSError as err:
                raise self._failed(err) from None
            finally:
                self._file = None

    def close(self) -> None:
        if self._file:
            with contextlib.suppress(OSError):  # a write already failed and said so; what is there stays
                self._file.close()
            self._file = None
        self._scalars.close()

    def _failed(self, err: OSError) -> WriteFailed:
        partial = self.path + ".partial"
        return WriteFailed(
            f"cannot write the metrics {partial}: {err.strerror or err}; it keeps the records written before, "
            f"and {self.path} is as it was."
        )


def carried_records(path: str | None, until_step: int) -> list[dict[str, Any]]:
    """Records of steps ``<= until_step`` from an earlier run's metrics, for a resumed run to keep.

    The newer of ``PATH`` and ``PATH.partial`` is read (an interrupted run leaves only the partial
    file); unreadable lines are skipped, and nothing is written here.
    """
    if path is None:
        return []
    candidates = [p for p in (path, path + ".partial") if os.path.isfile(p)]
    if not candidates:
        return []
    records = []
    with open(max(candidates, key=os.path.getmtime)) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= until_step:
                records.append(record)
    return records


def check_tensorboard(path: str | None) -> None:
    """Raise ``ConfigError`` if ``--tensorboard-dir`` is given but cannot be used; writes nothing."""
    if path is None:
        return
    import importlib.util

    if importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError(f"--tensorboard-dir {path} needs the tensorboardX package: pip install 'jaxmp[tensorboard]'.")
    check_output_dir("--tensorboard-dir", path)


class ScalarWriter:
    """TensorBoard scalars (every numeric field of a metrics record), through tensorboardX if asked for.

    tensorboardX writes from a thread of its own. A failed write (a full disk) ends that thread, and
    the writes after it would wait forever on its queue; so its errors are caught (``threading.excepthook``)
    and the next write, or ``close``, raises :class:`WriteFailed` instead.
    """

    def __init__(self, path: str | None):
        self._writer, self.path, self._error = None, path, None
        if path:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(path, max_queue=1000)
            self._excepthook, threading.excepthook = threading.excepthook, self._thread_failed

    def _thread_failed(self, args) -> None:
        frames = traceback.extract_tb(args.exc_traceback)
        if (
            self._error is None
            and isinstance(args.exc_value, OSError)
            and any("tensorboardX" in f.filename for f in frames)
        ):
            self._error = args.exc_value
            return
        self._excepthook(args)

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        if self._error is not None:
            raise self._failed(self._error)
        try:
            for name, value in record.items():
                if name != "step" and isinstance(value, int | float):
                    self._writer.add_scalar(name, value, record["step"])
        except OSError as err:
            raise self._failed(err) from None

    def close(self) -> None:
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        threading.excepthook = self._excepthook
        if self._error is not None:  # its thread is gone: closing would wait for it
            raise self._failed(self._error)
        try:
            writer.close()
        except OSError as err:
            raise self._failed(err) from None

    def _failed(self, err: OSError) -> WriteFailed:
        return WriteFailed(f"cannot write TensorBoard scalars in {self.path}: {err.strerror or err}.")
