"""``--dtype bfloat16``: matmuls and activations in bfloat16, float32 master weights and gradients.

A dtype bug shows up as float32 dots left in the program (the flag ignored), bfloat16 parameters or
optimizer state (precision lost between steps), or a loss that drifts from the float32 run by more than
bfloat16 rounding explains.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import CLASSES, IMAGE, losses_on, single_device_mesh, small_config

from jaxmp.parallel.mesh import MeshShape, build_mesh
from jaxmp.training.step import build_program


def bfloat16_arrays(hlo: str) -> int:
    """How many bfloat16 values the optimised HLO defines (XLA:CPU runs the dots themselves in float32,
    but activations are still rounded to and stored in bfloat16)."""
    return len(re.findall(r"= bf16\[", hlo))


@pytest.mark.parametrize("model", ["mlp", "mnist-cnn", "dense"])
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(model):
    strategy = "dp" if model == "dense" else "tp"
    cfg = small_config(model, strategy, dtype="bfloat16", optimizer="adam", lr=1e-3)
    program = build_program(cfg, build_mesh(MeshShape(data=2, tensor=2)), IMAGE, CLASSES)
    state = program.init()
    assert {a.dtype for a in jax.tree.leaves((state.params, state.opt_state)) if a.ndim} == {np.dtype("float32")}
    assert bfloat16_arrays(program.train_step.compiled.as_text()) > 0
    float32 = build_program(cfg.replace(dtype="float32"), build_mesh(MeshShape(data=2, tensor=2)), IMAGE, CLASSES)
    assert bfloat16_arrays(float32.train_step.compiled.as_text()) == 0


def test_bfloat16_pipeline_tracks_float32_and_one_device():
    cfg = small_config("mlp", "tp", dtype="bfloat16", microbatches=4)
    pipelined = losses_on(cfg, build_mesh(MeshShape(data=2, tensor=2, pipe=2)))
    one_device = losses_on(cfg.replace(microbatches=1), single_device_mesh())
    float32 = losses_on(cfg.replace(dtype="float32", microbatches=1), single_device_mesh())
    assert np.all(np.isfinite(pipelined))
    np.testing.assert_allclose(pipelined, one_device, rtol=1e-2)
    np.testing.assert_allclose(pipelined, float32, rtol=3e-2)
    assert not np.array_equal(one_device, float32)  # the flag did change the arithmetic


@pytest.mark.parametrize("model", ["mlp-1024"])
def test_bfloat16_pipelines_stages_of_different_shapes(model):
    """Every pipelined model runs in bfloat16: its messages are bfloat16, its state stays float32, and
    its losses track float32 on one device."""
    cfg = small_config(model, "tp", dtype="bfloat16", microbatches=2, batch_size=16)
    mesh = build_mesh(MeshShape(tensor=2, pipe=2))
    program = build_program(cfg, mesh, IMAGE, CLASSES)
    assert {a.dtype for a in jax.tree.leaves(program.state_abstract.params)} == {jnp.dtype("float32")}
    assert program.pipeline.train.message_dtype == jnp.bfloat16
    pipelined = losses_on(cfg, mesh, steps=5)
    float32 = losses_on(cfg.replace(dtype="float32", microbatches=1), single_device_mesh(), steps=5)
    np.testing.assert_allclose(pipelined, float32, rtol=3e-2)
