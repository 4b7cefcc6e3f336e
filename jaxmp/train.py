"""``python -m jaxmp.train``: flags -> config -> training loop. No model logic lives here."""

from __future__ import annotations

import sys

from jaxmp.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    """Train from command-line flags; returns the exit code (2 for invalid input)."""
    from jaxmp.training.loop import run

    return run_cli(run, argv, "jaxmp.train", "Train a model with data, tensor or hybrid parallelism.")


if __name__ == "__main__":
    sys.exit(main())
