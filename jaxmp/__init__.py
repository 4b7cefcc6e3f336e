"""jaxmp: model parallelism (data, tensor, layer-wise, pipeline) for JAX/XLA and Flax NNX.

The public API, re-exported; everything else lives in the submodules. Importing jaxmp does not start
a JAX backend, so ``simulate_cpu_devices`` can still run afterwards. The command-line modules
(``jaxmp.train``, ``jaxmp.analyze``, ``jaxmp.plan``) are not imported here, so ``python -m`` runs them
cleanly; the cost tools behind them are ``jaxmp.inspection.step_report.analyze`` and
``jaxmp.inspection.planner.plan``. ``jaxmp.fit`` (the training loop, with Orbax behind it) is imported
on first use.
"""

from jaxmp.config import Config, ConfigError
from jaxmp.inspection.closed_forms import predict, predict_program
from jaxmp.inspection.collectives import Collective, collectives
from jaxmp.inspection.hardware import HARDWARE, Hardware
from jaxmp.inspection.textbook import textbook_layer_exchange
from jaxmp.parallel.mesh import MeshShape, as_mesh, build_mesh, mesh_from_spec, parse_mesh, simulate_cpu_devices
from jaxmp.parallel.sharding import print_sharding_report, sharding_report
from jaxmp.pipeline import Schedule, build_schedule, gpipe, naive, one_f_one_b, plot, render, validate, zb_h1, zb_v
from jaxmp.training.step import Program, TrainState, build_program

__all__ = [
    "HARDWARE",
    "Collective",
    "Config",
    "ConfigError",
    "Hardware",
    "MeshShape",
    "Program",
    "as_mesh",
    "Schedule",
    "TrainState",
    "build_mesh",
    "build_program",
    "build_schedule",
    "collectives",
    "fit",
    "gpipe",
    "mesh_from_spec",
    "naive",
    "one_f_one_b",
    "parse_mesh",
    "plot",
    "predict",
    "predict_program",
    "print_sharding_report",
    "render",
    "sharding_report",
    "simulate_cpu_devices",
    "textbook_layer_exchange",
    "validate",
    "zb_h1",
    "zb_v",
]


def __getattr__(name: str):
    if name == "fit":
        from jaxmp.training.loop import fit

        return fit
    raise AttributeError(f"module 'jaxmp' has no attribute {name!r}")
