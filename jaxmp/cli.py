"""Command-line flags generated from the config schema, so ``--help`` can never drift from it.

Every leaf field of :class:`jaxmp.config.Config` becomes one flag (``batch_size`` -> ``--batch-size``)
with its default and help text. Parse errors print one line and exit with code 2, as every other bad
input does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jaxmp.config import Config, ConfigError, RunStopped, validate


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "str | None": str}


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config leaf."""
    parser = _OneLineParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = Config()
    for group_field in dataclasses.fields(Config):
        group_value = getattr(defaults, group_field.name)
        group = parser.add_argument_group(group_field.name, type(group_value).__doc__)
        for f in dataclasses.fields(group_value):
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
    argv: list[str] | None, prog: str, description: str, add_flags
) -> tuple[Config, argparse.Namespace]:
    """Like :func:`parse_config`, for a CLI with its own flags: ``add_flags(group)`` adds them to an
    argument group named after ``prog``; returns the validated config and a namespace of those flags."""
    parser = build_parser(prog, description)
    add_flags(parser.add_argument_group(prog))
    args = vars(parser.parse_args(argv))
    leaves = {f.name for group in dataclasses.fields(Config) for f in dataclasses.fields(group.default_factory)}
    cfg = validate(Config().replace(**{k: v for k, v in args.items() if k in leaves}))
    return cfg, argparse.Namespace(**{k: v for k, v in args.items() if k not in leaves})


def run_cli(
    main, argv: list[str] | None = None, prog: str = "jaxmp.train", description: str = "", add_flags=None
) -> int:
    """Parse flags, call ``main(cfg)`` (``main(cfg, extras)`` with ``add_flags``), and turn a
    ``ConfigError`` into one line and exit code 2."""
    try:
        if add_flags is None:
            main(parse_config(argv, prog, description))
        else:
            main(*parse_config_and_extras(argv, prog, description, add_flags))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stop:  # diverged loss, Ctrl-C: one line and the run's own exit code
        print(f"{stop.label}: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


__all__ = ["ConfigError", "build_parser", "parse_config", "parse_config_and_extras", "run_cli"]
