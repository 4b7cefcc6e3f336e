"""``python -m jaxmp.analyze``: the trainer's flags, plus ``--json``; compiles the train step (nothing
runs) and prints what it costs.

The report itself (collectives, memory, FLOPs, the closed forms next to them) is
:func:`jaxmp.inspection.step_report.analyze`; this module only parses flags and prints. Invalid input:
one line, exit code 2.
"""

from __future__ import annotations

import json

from jaxmp.cli import TRAINING_ONLY, run_as_command, run_cli
from jaxmp.config import Config
from jaxmp.inspection.step_report import analyze, to_json


def _add_flags(group) -> None:
    group.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _run(cfg: Config, extras) -> None:
    from rich.console import Console

    from jaxmp.inspection.tables import print_report

    report = analyze(cfg)
    if extras.json:
        print(json.dumps(to_json(report), indent=1))
    else:
        print_report(report, Console(width=max(Console().width, 130)))


def main(argv: list[str] | None = None) -> int:
    """Analyze the train step of the configuration the flags describe; returns the exit code."""
    description = "Collectives, memory and FLOPs of the compiled train step, against the closed-form prediction."
    return run_cli(_run, argv, "jaxmp.analyze", description, add_flags=_add_flags, skip=TRAINING_ONLY)


if __name__ == "__main__":
    run_as_command(main)
