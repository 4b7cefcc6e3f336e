"""Multi-process runs on JAX's own runtime: ``jax.distributed.initialize`` before any device is used.

Why JAX's runtime and nothing else: one SPMD program spans every process; ``jax.devices()`` lists all
devices of all hosts, the mesh is built over them and XLA's collectives (NCCL on GPUs, Gloo on CPUs)
run between hosts. Each process feeds only its own devices (``Program.put_rows``), process 0 alone
prints and writes metrics, and every process writes its own shards of a checkpoint.

When it starts: with ``--coordinator-address``, ``--num-processes`` and ``--process-id`` given, or
when a launcher JAX detects (SLURM's ``srun``, Open MPI's ``mpirun``, ...) started more than one
process; a plain ``python -m jaxmp.train`` stays single-process.
"""

from __future__ import annotations

import atexit
import io
import os
import re
import sys
import threading

from jaxmp.config import ConfigError, DistributedConfig


def detected_process_count() -> int:
    """How many processes a launcher JAX recognises started (1 when there is none).

    Uses JAX's own cluster detection (the same code ``jax.distributed.initialize()`` runs), so every
    launcher JAX supports is supported here.
    """
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # moved in a later JAX: no auto-detection, explicit flags still work
        return 1
    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return int(env.get_process_count() or 1)
    return 1


def initialize(cfg: DistributedConfig) -> bool:
    """Join (or start) a multi-process run when asked or detected; returns whether it did.

    Must run before JAX initialises a backend (after ``simulate_cpu_devices``).

    Raises:
      ConfigError: JAX already started, or the coordinator cannot be reached.
    """
    import jax
    from jax._src import xla_bridge

    explicit = cfg.coordinator_address is not None
    if not explicit and detected_process_count() <= 1:
        return False
    if jax.distributed.is_initialized():
        return True
    if xla_bridge.backends_are_initialized():
        raise ConfigError("multi-process set-up came too late: JAX already started in this process.")
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as err:
        where = cfg.coordinator_address or "the detected launcher"
        line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ConfigError(f"jax.distributed.initialize with {where} failed: {line}.") from None
    drop_gloo_connection_lines()
    return True


# Gloo writes its line in pieces, from several threads at once: the pieces of two lines interleave, and a
# line of the stream may hold parts of several, or only the newline of one.
_GLOO_PIECES = rb"\[Gloo\] Rank|is connected to|peer ranks\.|Expected number of connected peer ranks is :|\d+| "
GLOO_CONNECTED = re.compile(rb"(" + _GLOO_PIECES + rb")*\n?")


def drop_gloo_connection_lines() -> None:
    """Keep Gloo's "[Gloo] Rank r is connected to p peer ranks" lines (one per communicator it opens, 20
    per process in a short run, written by C++ straight to file descriptor 1) off the user's screen.

    How: descriptor 1 becomes a pipe whose reader forwards every other line to the real stdout, and
    Python's own ``sys.stdout`` writes to the real stdout directly, so it stays a terminal (colours,
    live progress) when it was one. At exit the pipe is closed and drained.
    """
    sys.stdout.flush()
    real = os.dup(1)
    read, write = os.pipe()
    os.dup2(write, 1)
    os.close(write)
    encoding = sys.stdout.encoding or "utf-8"
    sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(real), "wb", buffering=0), encoding, line_buffering=True)

    def forward():
        with os.fdopen(read, "rb") as lines, os.fdopen(real, "wb", buffering=0) as out:
            for line in lines:
                if not GLOO_CONNECTED.fullmatch(line):
                    out.write(line)

    pump = threading.Thread(target=forward, name="jaxmp-stdout-filter", daemon=True)
    pump.start()

    def close():
        sys.stdout.flush()
        os.dup2(os.dup(sys.stdout.fileno()), 1)  # the pipe's last writer goes: the reader drains and stops
        pump.join(timeout=5)

    atexit.register(close)


def is_main_process() -> bool:
    """Whether this process prints and writes the metrics (process 0)."""
    import jax

    return jax.process_index() == 0
