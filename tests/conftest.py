"""Test set-up: 8 simulated CPU devices, configured once before JAX initialises a backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("PJRT_NPROC", "16")  # spare XLA:CPU threads: see jaxmp.parallel.mesh.cpu_threads

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key():
    """A fixed PRNG key, so every test is reproducible."""
    return jax.random.key(0)
