"""Command-line flags generated from the config schema, so ``--help`` can never drift from it.

Every leaf field of :class:`jaxmp.config.Config` becomes one flag (``batch_size`` -> ``--batch-size``)
with its default and help text. Parse errors print one line and exit with code 2, as every other bad
input does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jaxmp.config import Config, ConfigError, validate


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


def run_cli(main, argv: list[str] | None = None, prog: str = "jaxmp.train", description: str = "") -> int:
    """Parse flags, call ``main(cfg)``, and turn a ``ConfigError`` into one line and exit code 2."""
    try:
        main(parse_config(argv, prog, description))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["ConfigError", "build_parser", "parse_config", "run_cli"]
