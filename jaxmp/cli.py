"""Command-line flags generated from the config schema, so ``--help`` can never drift from it.

Every leaf field of :class:`jaxmp.config.Config` becomes one flag (``batch_size`` -> ``--batch-size``)
with its default and help text. Parse errors print one line and exit with code 2, as every other bad
input does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading

import jaxmp.config
from jaxmp.config import Config, ConfigError, RunStopped, StoppedAtOnce, leaf_names, stop_at_once, validate
from jaxmp.speech import command_line


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except on a required option, which says so instead."""

    def _get_help_string(self, action):
        if action.required:
            return (action.help or "") + " (required)"
        return super()._get_help_string(action)


_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}

# The options only a training run reads: the cost tools (analyze, plan) compile a step and run nothing.
TRAINING_ONLY = frozenset(
    {"steps", "epochs", "eval_every", "metrics_file", "tensorboard_dir", "profile_steps", "profile_dir", "report"}
    | {"sample_tokens", "checkpoint_dir", "checkpoint_every", "keep", "resume"}
    | {"coordinator_address", "num_processes", "process_id"}
)


def build_parser(prog: str, description: str, add_flags=None, skip=frozenset()) -> argparse.ArgumentParser:
    """An argparse parser with the tool's own flags first (``add_flags(group)``), then one flag per
    config leaf except those in ``skip``."""
    parser = _OneLineParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    if add_flags is not None:
        add_flags(parser.add_argument_group(prog))
    defaults = Config()
    for group_field in dataclasses.fields(Config):
        group_value = getattr(defaults, group_field.name)
        fields = [f for f in dataclasses.fields(group_value) if f.name not in skip]
        if not fields:
            continue
        group = parser.add_argument_group(group_field.name, type(group_value).__doc__)
        for f in fields:
            flag = "--" + f.name.replace("_", "-")
            default = getattr(group_value, f.name)
            help_text = f.metadata.get("help", "")
            if f.type == "bool":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
                continue
            choices = f.metadata.get("choices")
            if choices:
                help_text += f" ({', '.join(choices)})"
            group.add_argument(flag, type=_TYPES[f.type], default=default, help=help_text, metavar=f.name.upper())
    return parser


def parse_config(argv: list[str] | None, prog: str = "jaxmp.train", description: str = "") -> Config:
    """Parse flags into a validated :class:`Config` (``ConfigError`` on invalid values)."""
    args = vars(build_parser(prog, description).parse_args(argv))
    return validate(Config().replace(**args))


def parse_config_and_extras(
    argv: list[str] | None, prog: str, description: str, add_flags, skip=frozenset()
) -> tuple[Config, argparse.Namespace]:
    """Like :func:`parse_config`, for a CLI with its own flags: ``add_flags(group)`` adds them to an
    argument group named after ``prog``, shown first; the config leaves in ``skip`` are not offered and
    keep their defaults. Returns the validated config and a namespace of the tool's own flags."""
    args = vars(build_parser(prog, description, add_flags, skip).parse_args(argv))
    leaves = leaf_names()
    cfg = validate(Config().replace(**{k: v for k, v in args.items() if k in leaves}))
    return cfg, argparse.Namespace(**{k: v for k, v in args.items() if k not in leaves})


def run_cli(
    main,
    argv: list[str] | None = None,
    prog: str = "jaxmp.train",
    description: str = "",
    add_flags=None,
    skip=frozenset(),
) -> int:
    """Parse flags, call ``main(cfg)`` (``main(cfg, extras)`` with ``add_flags``), and turn a
    ``ConfigError`` into one line and exit code 2, a stopped run (divergence, a signal, a failed write)
    into one line and its own exit code. ``skip``: config leaves the tool does not offer."""
    global _exit_now
    try:
        with command_line(), _signals_stop_at_once("the first step" if prog == "jaxmp.train" else "the report"):
            if add_flags is None:
                main(parse_config(argv, prog, description))
            else:
                main(*parse_config_and_extras(argv, prog, description, add_flags, skip))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RunStopped, StoppedAtOnce) as stop:  # diverged loss, a signal, a failed write: one line, own exit code
        print(f"{stop.label}: {stop}", file=sys.stderr)
        _exit_now = stop.exit_now
        return stop.exit_code
    return 0


_exit_now = False  # the last run_cli call ended with threads or a teardown not worth waiting for


@contextlib.contextmanager
def _signals_stop_at_once(first_output: str):
    """SIGINT and SIGTERM outside a training loop (which handles them itself) stop the command at once
    with one line, not a traceback or a silent kill; ``first_output``: what the command had not reached."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        name = signal.Signals(signum).name
        stop_at_once(f"{name} before {first_output}; nothing was written.", signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_as_command(main) -> None:
    """The ``python -m jaxmp.*`` entry point: run ``main()`` and end the process with its exit code; a
    signal with no step boundary to wait for ends it at once (``jaxmp.config.stop_at_once``)."""
    jaxmp.config._signals_end_the_process = True
    exit_process(main())


def exit_process(code: int) -> None:
    """End a ``python -m jaxmp.*`` process with ``code``. After a stop that left library threads behind
    (a cut save: Orbax's threads wait up to 300 s; compilation cut by a signal), skip the interpreter's
    teardown: the line was printed and everything worth keeping is on disk."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _exit_now:
        os._exit(code)
    sys.exit(code)


__all__ = [
    "TRAINING_ONLY",
    "ConfigError",
    "build_parser",
    "exit_process",
    "run_as_command",
    "parse_config",
    "parse_config_and_extras",
    "run_cli",
]
