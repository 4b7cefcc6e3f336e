"""Test set-up: 8 simulated CPU devices, configured once before JAX initialises a backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("PJRT_NPROC", "16")  # spare XLA:CPU threads: see jaxmp.parallel.mesh.cpu_threads
# Compile faster: XLA:CPU's LLVM backend without its optimisation passes. The tests compile far more than
# they run (a third less time in all); the optimised HLO, and so the collectives and memory the tests read,
# is the same, and float results may differ in the last bits, as between machines. Subprocesses inherit
# it, and the notebooks' kernels but those that print timings (tests/test_notebooks.py).
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"), FAST_COMPILE)))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key():
    """A fixed PRNG key, so every test is reproducible."""
    return jax.random.key(0)
