"""jaxmp: model parallelism (data, tensor, layer-wise, pipeline) for JAX/XLA and Flax NNX.

The public API, re-exported; everything else lives in the submodules. Importing jaxmp does not start
a JAX backend, so ``simulate_cpu_devices`` can still run afterwards.
"""

from jaxmp.analysis import Collective, collectives, textbook_layer_exchange
from jaxmp.config import Config, ConfigError
from jaxmp.mesh import MeshShape, build_mesh, mesh_from_spec, parse_mesh, simulate_cpu_devices
from jaxmp.pipeline import Schedule, gpipe, render
from jaxmp.sharding import print_sharding_report, sharding_report
from jaxmp.step import Program, TrainState, build_program

__all__ = [
    "Collective",
    "Config",
    "ConfigError",
    "MeshShape",
    "Program",
    "Schedule",
    "TrainState",
    "build_mesh",
    "build_program",
    "collectives",
    "gpipe",
    "mesh_from_spec",
    "parse_mesh",
    "print_sharding_report",
    "render",
    "sharding_report",
    "simulate_cpu_devices",
    "textbook_layer_exchange",
]
