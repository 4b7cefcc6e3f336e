"""Every 8-device (data, tensor) mesh and every strategy trains exactly like one device.

A sharding bug (a gradient reduced twice or not at all, a dropout mask that depends on the mesh,
a weight split along the wrong axis and silently broadcast) changes the loss trajectory; float32
reassociation across devices stays near 1e-7.
"""

import jax
import numpy as np
import pytest
from support import build, fixed_batches, losses_on, reference_losses, single_device_mesh, small_config

from jaxmp.parallel.mesh import MeshShape, build_mesh

MESHES = [MeshShape(data=8), MeshShape(data=4, tensor=2), MeshShape(data=2, tensor=4), MeshShape(tensor=8)]
# tp splits weights over tensor and the batch over data: every factorisation; dp and hybrid split the
# batch (hybrid's conv layers over both axes), so one mesh with each axis the larger covers their rules
MESHES_OF = {
    "dp": [MeshShape(data=8), MeshShape(data=2, tensor=4)],
    "tp": MESHES,
    "hybrid": [MeshShape(data=4, tensor=2), MeshShape(tensor=8)],
}
MODELS = ["mlp", "mlp-1024", "mnist-cnn"]
RTOL = 1e-5
CASES = [(m, s, shape) for m in MODELS for s, shapes in MESHES_OF.items() for shape in shapes]


@pytest.mark.parametrize(("model", "strategy", "mesh_shape"), CASES, ids=str)
def test_loss_trajectory_matches_single_device(model, strategy, mesh_shape):
    cfg = small_config(model, strategy)
    expected = reference_losses(small_config(model, "dp"))
    got = losses_on(cfg, build_mesh(mesh_shape))
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(got, expected, rtol=RTOL)


@pytest.mark.parametrize("strategy", ["dp", "column", "row"])
def test_dense_layer_matches_single_device(strategy):
    cfg = small_config("dense", strategy, lr=0.1)
    np.testing.assert_allclose(
        losses_on(cfg, build_mesh(MeshShape(data=4, tensor=2))),
        reference_losses(small_config("dense", "dp", lr=0.1)),
        rtol=RTOL,
    )


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adaptive_optimizers_match_single_device(optimizer):
    cfg = small_config("mlp", "tp", optimizer=optimizer, lr=1e-3)
    np.testing.assert_allclose(
        losses_on(cfg, build_mesh(MeshShape(data=2, tensor=4))), reference_losses(cfg.replace(strategy="dp")), rtol=RTOL
    )


@pytest.mark.parametrize(("model", "has_dropout"), [("mnist-cnn", True), ("dense", False)])
def test_dropout_changes_the_loss(model, has_dropout):
    """The CNN's dropout is active in training, so the equivalence above does compare masks: another
    dropout key alone (same parameters, same batch) changes its loss. The dense model, without dropout,
    is the control."""
    program = build(small_config(model, "dp"), single_device_mesh())
    state = program.init()
    xs, ys = fixed_batches(1, 16)
    batch = program.put_batch(xs[0], ys[0])
    other = state._replace(key=jax.random.fold_in(state.key, 1))
    losses = [float(program.grad_step(s, *batch)[0]) for s in (state, other)]
    assert (losses[0] != losses[1]) == has_dropout, losses
