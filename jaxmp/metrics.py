"""JSON Lines metrics that never clobber a file the user already has, even when the run fails.

Records stream to ``PATH.partial`` (so ``tail -f`` works) and replace ``PATH`` only when the run
finishes; a run that fails leaves ``PATH`` as it was and the partial file for inspection.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxmp.config import ConfigError


def check_metrics_path(path: str | None) -> None:
    """Raise ``ConfigError`` if ``path`` cannot be written, before the run touches anything."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"--metrics-file {path} is a directory; give a file path.")
    if not os.path.isdir(folder):
        raise ConfigError(f"--metrics-file {path}: folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--metrics-file {path}: folder {folder} is not writable.")


class MetricsWriter:
    """Append JSON objects to ``PATH.partial``; ``commit()`` moves it onto ``PATH`` atomically."""

    def __init__(self, path: str | None):
        self.path = path
        self._file = open(path + ".partial", "w") if path else None  # noqa: SIM115 (closed in commit/close)

    def write(self, record: dict[str, Any]) -> None:
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def commit(self) -> None:
        if self._file:
            self._file.close()
            os.replace(self.path + ".partial", self.path)
            self._file = None

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
