"""Command-line flags generated from the config schema, so ``--help`` can never drift from it.

Every leaf field of :class:`jaxmp.config.Config` becomes one flag (``batch_size`` -> ``--batch-size``)
with its default and help text. Parse errors print one line and exit with code 2, as every other bad
input does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jaxmp.config import Config, ConfigError, RunStopped, leaf_names, validate
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
    ``ConfigError`` into one line and exit code 2. ``skip``: config leaves the tool does not offer."""
    try:
        with command_line():
            if add_flags is None:
                main(parse_config(argv, prog, description))
            else:
                main(*parse_config_and_extras(argv, prog, description, add_flags, skip))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stop:  # diverged loss, Ctrl-C: one line and the run's own exit code
        print(f"{stop.label}: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


__all__ = ["TRAINING_ONLY", "ConfigError", "build_parser", "parse_config", "parse_config_and_extras", "run_cli"]
