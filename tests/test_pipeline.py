"""Pipelined training equals sequential training: loss and every gradient, any S, M, R, with data and
tensor axes too; bubbles are poisoned with NaN and must not reach the result."""

import numpy as np
import pytest
from support import CLASSES, IMAGE, assert_same, loss_and_grads, single_device_mesh, small_config

from jaxmp.config import ConfigError
from jaxmp.mesh import MeshShape, build_mesh
from jaxmp.pipeline import gpipe, render
from jaxmp.step import build_program

RTOL = 1e-5

CASES = [
    # (stages, microbatches, repeats, data, tensor)
    (2, 1, 1, 1, 1),
    (2, 3, 1, 1, 1),
    (2, 8, 1, 1, 1),
    (4, 3, 1, 1, 1),
    (4, 8, 2, 1, 1),
    (8, 8, 1, 1, 1),
    (8, 1, 1, 1, 1),
    (2, 3, 2, 1, 1),
    (2, 8, 2, 2, 2),
    (4, 1, 2, 2, 1),
    (2, 4, 1, 2, 2),
    (2, 3, 1, 1, 4),
]


@pytest.mark.parametrize(("stages", "microbatches", "repeats", "data", "tensor"), CASES)
def test_mlp_pipeline_matches_sequential(stages, microbatches, repeats, data, tensor):
    cfg = small_config("mlp", "tp", depth=16, batch_size=48 if microbatches == 3 else 32)
    piped = cfg.replace(microbatches=microbatches, repeats=repeats)
    mesh = build_mesh(MeshShape(data, tensor, stages))
    assert_same(loss_and_grads(piped, mesh, poison=True), loss_and_grads(cfg, single_device_mesh()))


@pytest.mark.parametrize("remat", ["stage", "full"])
def test_remat_changes_nothing(remat):
    cfg = small_config("mlp", "tp", depth=8, batch_size=32)
    piped = cfg.replace(microbatches=4, remat=remat)
    assert_same(
        loss_and_grads(piped, build_mesh(MeshShape(1, 2, 4)), poison=True), loss_and_grads(cfg, single_device_mesh())
    )


@pytest.mark.parametrize(("repeats", "remat"), [(1, "none"), (2, "stage")])
def test_unroll_changes_nothing_but_the_loops(repeats, remat):
    cfg = small_config("mlp", "tp", depth=4, batch_size=48)
    piped = cfg.replace(microbatches=3, repeats=repeats, remat=remat, unroll=True)
    mesh = build_mesh(MeshShape(1, 2, 2))
    assert_same(loss_and_grads(piped, mesh, poison=True), loss_and_grads(cfg, single_device_mesh()))
    loops = {
        unroll: build_program(piped.replace(unroll=unroll), mesh, IMAGE, CLASSES)
        .grad_step.compiled.as_text()
        .count(" while(")
        for unroll in (False, True)
    }
    assert loops[True] < loops[False]


def test_poison_is_really_there():
    """Without masking, bubbles would be NaN: check the schedule has bubbles the poison would hit."""
    assert gpipe(4, 3).busy.sum() < gpipe(4, 3).busy.size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(depth=6, repeats=1), "cannot be split into 4 equal chunks"),
        (dict(depth=2), "need at least 4 layers"),
        (dict(microbatches=3, batch_size=32), "cannot be split into 3 micro-batches"),
        (dict(stage_split="1,3"), "need equal stages"),
    ],
)
def test_bad_pipeline_configs(overrides, message):
    from support import CLASSES, IMAGE

    from jaxmp.step import build_program

    cfg = small_config("mlp", "tp", depth=8, batch_size=32).replace(**overrides)
    with pytest.raises(ConfigError, match=message):
        build_program(cfg, build_mesh(MeshShape(2, 1, 4)), IMAGE, CLASSES)


def test_schedule_table_counts_the_gpipe_bubble():
    for stages, microbatches in [(2, 1), (2, 8), (4, 3), (8, 32)]:
        schedule = gpipe(stages, microbatches)
        assert schedule.ticks == microbatches + stages - 1
        assert schedule.bubble_fraction == pytest.approx((stages - 1) / (microbatches + stages - 1))
    circular = gpipe(4, 8, repeats=2)
    assert circular.ticks == 8 * 2 + 4 - 1
    assert circular.bubble_fraction == pytest.approx(3 / (2 * 8 + 3))
    assert render(gpipe(2, 2)).splitlines() == ["stage 0: 0 1 .", "stage 1: . 0 1"]


def test_training_trajectory_on_data_tensor_pipe_mesh():
    """``--mesh data=2,tensor=2,pipe=2 --microbatches 4``: 20 steps follow one device's losses."""
    from support import losses_on, reference_losses

    cfg = small_config("mlp", "tp", depth=4, batch_size=32)
    expected = reference_losses(cfg)
    got = losses_on(cfg.replace(microbatches=4), build_mesh(MeshShape(2, 2, 2)))
    np.testing.assert_allclose(got, expected, rtol=RTOL)


@pytest.mark.parametrize(("stages", "microbatches", "repeats"), [(4, 4, 1), (2, 4, 2), (2, 3, 2)])
def test_activations_cross_stages_by_one_collective_permute_per_tick_each_way(stages, microbatches, repeats):
    from support import CLASSES, IMAGE

    from jaxmp.analysis import collectives
    from jaxmp.step import build_program

    cfg = small_config("mlp", "tp", depth=8, batch_size=48).replace(microbatches=microbatches, repeats=repeats)
    mesh = build_mesh(MeshShape(1, 1, stages))
    program = build_program(cfg, mesh, IMAGE, CLASSES)
    ticks = gpipe(stages, microbatches, repeats).ticks
    permutes = [c for c in collectives(program.train_step.compiled.as_text(), mesh) if c.kind == "collective-permute"]
    microbatch_activation = (48 // microbatches) * 32  # b x width
    assert {c.axes for c in permutes} == {("pipe",)}
    assert all(c.elements == microbatch_activation for c in permutes)
    assert sum(c.count for c in permutes) == 2 * ticks
    # 2 * (M*R + S - 1) micro-batch activations when S divides M; a partial last group idles longer
    assert sum(c.total_elements for c in permutes) == 2 * ticks * microbatch_activation


HETERO_CASES = [
    # (model, stages, microbatches, repeats, data, stage_split)
    ("mlp-1024", 2, 1, 1, 1, "uniform"),
    ("mlp-1024", 2, 3, 1, 2, "uniform"),
    ("mlp-1024", 4, 8, 1, 1, "uniform"),
    ("mlp-1024", 2, 8, 2, 2, "uniform"),
    ("mlp-1024", 2, 3, 1, 1, "1,3"),
    ("mnist-cnn", 2, 3, 1, 1, "uniform"),
    ("mnist-cnn", 2, 4, 1, 4, "auto"),
    ("mnist-cnn", 4, 1, 1, 1, "auto"),
    ("mnist-cnn", 3, 8, 1, 2, "uniform"),
]


@pytest.mark.parametrize(("model", "stages", "microbatches", "repeats", "data", "split"), HETERO_CASES)
def test_heterogeneous_pipeline_matches_sequential(model, stages, microbatches, repeats, data, split):
    """Stages of different shapes (conv, then dense), dropout included: same loss and gradients.

    GELU instead of mlp-1024's ReLU: with a kink at 0, float32 reassociation (a micro-batch matmul
    sums in another order) can flip a unit sitting within rounding of 0 and change its gradient.
    """
    cfg = small_config(model, "tp", batch_size=48, activation="gelu" if model == "mlp-1024" else "default")
    piped = cfg.replace(microbatches=microbatches, repeats=repeats, stage_split=split)
    mesh = build_mesh(MeshShape(data, 1, stages))
    assert_same(loss_and_grads(piped, mesh, poison=True), loss_and_grads(cfg, single_device_mesh()))


def test_heterogeneous_training_trajectory():
    from support import losses_on, reference_losses

    cfg = small_config("mnist-cnn", "hybrid", batch_size=32)
    got = losses_on(cfg.replace(microbatches=4), build_mesh(MeshShape(2, 1, 2)))
    np.testing.assert_allclose(got, reference_losses(cfg), rtol=RTOL)


def test_auto_split_balances_flops_and_never_drops_a_layer():
    from jaxmp.pipeline.partition import chunk_bounds

    assert chunk_bounds("uniform", 5, 2) == [(0, 3), (3, 5)]
    assert chunk_bounds("2,3", 5, 2) == [(0, 2), (2, 5)]
    # one expensive layer gets a stage of its own; the cheap ones share
    assert chunk_bounds("auto", 5, 3, [1.0, 100.0, 1.0, 1.0, 1.0]) == [(0, 1), (1, 2), (2, 5)]
    for split, flops in [("uniform", None), ("auto", [3.0, 1.0, 4.0, 1.0, 5.0])]:
        bounds = chunk_bounds(split, 5, 4, flops)
        assert bounds[0][0] == 0 and bounds[-1][1] == 5
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:], strict=False))


@pytest.mark.parametrize(
    ("model", "shape", "overrides", "message"),
    [
        ("mlp-1024", MeshShape(1, 1, 8), {}, "need at least 8 layers, the model has 4"),
        ("mlp-1024", MeshShape(1, 2, 2), {}, "runs with tensor=1"),
        ("mnist-cnn", MeshShape(1, 1, 2), dict(stage_split="2,2"), "adding up to the model's 5 layers"),
        ("mnist-cnn", MeshShape(1, 1, 2), dict(stage_split="fast"), "is not uniform, auto or"),
    ],
)
def test_bad_heterogeneous_configs(model, shape, overrides, message):
    from support import CLASSES, IMAGE

    from jaxmp.step import build_program

    cfg = small_config(model, "tp", batch_size=32).replace(microbatches=2, **overrides)
    with pytest.raises(ConfigError, match=message):
        build_program(cfg, build_mesh(shape), IMAGE, CLASSES)


@pytest.mark.parametrize(
    ("strategy", "shape"),
    [("tp", MeshShape(2, 2, 2)), ("dp", MeshShape(2, 2, 2)), ("tp", MeshShape(2, 2, 1))],
    ids=["tp-pipe2", "dp-pipe2", "tp-pipe1"],
)
def test_stacked_weight_gradients_are_reduced_over_the_batch_axes_once_per_step(strategy, shape):
    """Each device accumulates its weight gradients through the tick loop; one all-reduce after it.

    Reducing inside the loop (the weight-gradient accumulator replicated over the batch axes) moves the
    stacked weights' gradients once per tick: ``T`` times the parameter elements instead of once.
    """
    import math

    import jax

    from jaxmp.analysis import collectives
    from jaxmp.sharding import logical_to_spec, rules_for

    cfg = small_config("mlp", strategy, depth=4, batch_size=32).replace(microbatches=4)
    mesh = build_mesh(shape)
    program = build_program(cfg, mesh, IMAGE, CLASSES)
    batch = logical_to_spec(("batch",), rules_for(strategy))[0]
    batch_axes = tuple(a for a in ((batch,) if isinstance(batch, str) else batch) if mesh.shape[a] > 1)
    colls = collectives(program.grad_step.compiled.as_text(), mesh)
    reduced = [c for c in colls if c.kind == "all-reduce" and c.axes == batch_axes and c.elements > 1]
    params = jax.tree.leaves(program.init().params)
    assert [c.op_name for c in reduced if c.count > 1] == []  # nothing reduced inside a loop
    assert sum(c.total_elements for c in reduced) == sum(math.prod(p.sharding.shard_shape(p.shape)) for p in params)


@pytest.mark.parametrize("model", ["mlp-1024", "mnist-cnn"])
def test_heterogeneous_gradients_are_reduced_over_data_once_per_step(model):
    """Each device accumulates its parameter gradients through the backward tick loop; one all-reduce
    over ``data`` after it. With ``data`` automatic in the shard_maps, every parameter gradient was
    all-reduced once per tick: ``T`` = 5 times the parameter elements at M=4, S=2."""
    import math

    import jax

    from jaxmp.analysis import collectives

    cfg = small_config(model, "tp", batch_size=32).replace(microbatches=4)
    mesh = build_mesh(MeshShape(2, 1, 2))
    program = build_program(cfg, mesh, IMAGE, CLASSES)
    colls = collectives(program.grad_step.compiled.as_text(), mesh)
    reduced = [c for c in colls if c.kind == "all-reduce" and c.axes == ("data",) and c.elements > 1]
    params = jax.tree.leaves(program.init().params)
    assert reduced and [c.count for c in reduced] == [1] * len(reduced)  # nothing reduced inside a loop
    assert sum(c.total_elements for c in reduced) == sum(math.prod(p.sharding.shard_shape(p.shape)) for p in params)
