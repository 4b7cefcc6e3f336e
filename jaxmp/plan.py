"""``python -m jaxmp.plan``: the trainer's flags, plus ``--devices`` and the hardware; ranks every
mesh of N devices (data, tensor, pipe; context too for a model with a sequence) by a roofline step time
from compiled programs.

The planner itself is :func:`jaxmp.inspection.planner.plan`; this module only parses flags and prints.
Invalid input: one line, exit code 2.
"""

from __future__ import annotations

import json

import jax

from jaxmp.cli import TRAINING_ONLY, run_as_command, run_cli
from jaxmp.config import Config, ConfigError
from jaxmp.inspection.hardware import get_hardware
from jaxmp.inspection.planner import parse_factors, plan, print_plan, to_json
from jaxmp.parallel.mesh import DATA


def _add_flags(group) -> None:
    group.add_argument("--devices", type=int, required=True, help="number of devices to plan for")
    group.add_argument("--hardware", default="cpu", help="device kind of the roofline: cpu, h100, h200, tpu-v5p")
    group.add_argument("--memory-gib", type=float, default=None, help="override the device memory (GiB)")
    group.add_argument(
        "--microbatch-factors", default="1,2,4", help="with pipe=S, try M = f*S micro-batches for each f"
    )
    group.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _run(cfg: Config, extras) -> None:
    from rich.console import Console

    from jaxmp.inspection.step_report import setup

    hw = get_hardware(extras.hardware, extras.memory_gib)
    factors = parse_factors(extras.microbatch_factors)
    if extras.devices < 1:
        raise ConfigError(f"--devices must be positive, got {extras.devices}.")
    if cfg.run.cpu_devices is None and jax.device_count() < extras.devices:
        raise ConfigError(
            f"--devices {extras.devices}: only {jax.device_count()} are available; "
            f"add --cpu-devices {extras.devices} to simulate them on CPU."
        )
    _, input_shape, classes, batch = setup(cfg.replace(mesh=f"{DATA}=1"))  # simulates --cpu-devices; plan picks meshes
    if jax.device_count() < extras.devices:
        raise ConfigError(f"--devices {extras.devices} needs --cpu-devices of at least {extras.devices}.")
    with Console(stderr=True).status("compiling the candidates") as status:  # shown on a terminal only
        rows = plan(cfg, extras.devices, hw, input_shape, classes, factors, progress=status.update, **batch)
    if extras.json:
        print(json.dumps(to_json(rows, hw), indent=1))
    else:
        print_plan(rows, hw, Console(width=max(Console().width, 150)))


def main(argv: list[str] | None = None) -> int:
    """Plan the mesh for the model the flags describe; returns the exit code (2 for invalid input)."""
    description = "Rank every mesh of N devices (data, tensor, pipe; context too for gpt) by a roofline step time."
    skip = TRAINING_ONLY | {"mesh", "schedule_plot"}  # plan picks the meshes itself
    return run_cli(_run, argv, "jaxmp.plan", description, add_flags=_add_flags, skip=skip)


if __name__ == "__main__":
    run_as_command(main)
