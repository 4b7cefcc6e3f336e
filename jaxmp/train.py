"""``python -m jaxmp.train``: flags -> config -> training loop. No model logic lives here."""

from __future__ import annotations

from jaxmp.cli import run_as_command, run_cli


def main(argv: list[str] | None = None) -> int:
    """Train from command-line flags; returns the exit code (2 for invalid input)."""
    return run_cli(_run, argv, "jaxmp.train", "Train a model with data, tensor or hybrid parallelism.")


def _run(cfg) -> None:
    from jaxmp.training.loop import run  # JAX loads here, after run_cli's signal handling is in place

    run(cfg)


if __name__ == "__main__":
    run_as_command(main)
