"""Errors in the caller's own terms: CLI flags on the command line, argument names in Python.

Why one rewrite at the boundary rather than two spellings at every ``raise``: the checks are shared by
the CLI and the Python API, and there are over a hundred of them. Each message names options as CLI
flags (``--batch-size``); a public Python entry point (:func:`speaks_python`) rewrites those into the
argument a Python caller passed (``batch_size``), unless the call came from the command line
(:func:`command_line`), whose users typed the flags.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re

from jaxmp.config import ConfigError, leaf_names

_FROM_COMMAND_LINE = contextvars.ContextVar("jaxmp_from_command_line", default=False)
_FLAG = re.compile(r"--(no-)?([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
_SIMULATE = re.compile(r"--cpu-devices (\d+)")
# Python arguments that are CLI flags too, besides the config's leaves.
_ARGUMENTS = frozenset({"devices"})


@contextlib.contextmanager
def command_line():
    """Within this block, errors keep naming CLI flags: the user typed them."""
    token = _FROM_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _FROM_COMMAND_LINE.reset(token)


def in_python_terms(message: str) -> str:
    """``message`` with each CLI flag of a config option replaced by its Python name (``--batch-size 12``
    -> ``batch_size 12``, ``--no-resume`` -> ``resume=False``, ``--cpu-devices 8`` ->
    ``jaxmp.simulate_cpu_devices(8)``); other ``--words`` (a pip command's) stay."""
    names = leaf_names() | _ARGUMENTS

    def python_name(match: re.Match) -> str:
        name = match.group(2).replace("-", "_")
        if name not in names:
            return match.group(0)
        return f"{name}=False" if match.group(1) else name

    return _FLAG.sub(python_name, _SIMULATE.sub(r"jaxmp.simulate_cpu_devices(\1)", message))


def speaks_python(function):
    """Decorate a public entry point: a ``ConfigError`` it raises names Python arguments, not flags."""

    @functools.wraps(function)
    def entry_point(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except ConfigError as error:
            if not _FROM_COMMAND_LINE.get() and error.args:
                error.args = (in_python_terms(str(error.args[0])), *error.args[1:])
            raise

    return entry_point
