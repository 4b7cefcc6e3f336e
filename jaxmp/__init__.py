"""jaxmp: model parallelism (data, tensor, layer-wise, pipeline) for JAX/XLA and Flax NNX.

The public API, re-exported; everything else lives in the submodules. Importing jaxmp does not start
a JAX backend, so ``simulate_cpu_devices`` can still run afterwards. The command-line modules
(``jaxmp.train``, ``jaxmp.analyze``, ``jaxmp.plan``) are not imported here, so ``python -m`` runs them
cleanly; the cost tools behind them are ``jaxmp.inspection.step_report.analyze`` and
``jaxmp.inspection.planner.plan``. Every name but ``Config`` and ``ConfigError`` is imported on first
use, JAX with it.
"""

from jaxmp.config import Config, ConfigError

# Everything else loads on first use (PEP 562), so ``python -m jaxmp.train`` starts its signal handling
# before JAX is imported: a Ctrl-C during start-up is one line, never an import traceback.
_LAZY = {
    "predict": "jaxmp.inspection.closed_forms",
    "predict_program": "jaxmp.inspection.closed_forms",
    "Collective": "jaxmp.inspection.collectives",
    "collectives": "jaxmp.inspection.collectives",
    "HARDWARE": "jaxmp.inspection.hardware",
    "Hardware": "jaxmp.inspection.hardware",
    "textbook_layer_exchange": "jaxmp.inspection.textbook",
    "MeshShape": "jaxmp.parallel.mesh",
    "as_mesh": "jaxmp.parallel.mesh",
    "build_mesh": "jaxmp.parallel.mesh",
    "mesh_from_spec": "jaxmp.parallel.mesh",
    "parse_mesh": "jaxmp.parallel.mesh",
    "simulate_cpu_devices": "jaxmp.parallel.mesh",
    "print_sharding_report": "jaxmp.parallel.sharding",
    "sharding_report": "jaxmp.parallel.sharding",
    **dict.fromkeys(
        ("Schedule", "build_schedule", "dualpipev", "gpipe", "naive", "one_f_one_b", "plot", "render", "validate")
        + ("zb_h1", "zb_v"),
        "jaxmp.pipeline",
    ),
    "Program": "jaxmp.training.step",
    "TrainState": "jaxmp.training.step",
    "build_program": "jaxmp.training.step",
    "fit": "jaxmp.training.loop",
}

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
    "dualpipev",
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
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxmp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
