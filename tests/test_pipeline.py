"""Pipelined training equals one device: loss and every gradient, for every preset and the README's own
model, any S, M, R, split and placement, with data and tensor axes; the stash and the messages start as
NaN and must not reach the result (and do, with masking off)."""

import math

import jax
import numpy as np
import pytest
from support import OWN, assert_same, build, loss_and_grads, single_device_mesh, small_config

from jaxmp.config import ConfigError
from jaxmp.inspection.collectives import collectives
from jaxmp.parallel.mesh import MeshShape, build_mesh

RTOL = 1e-5


def config(model: str, **overrides):
    """A small config of ``model``: GELU for mlp-1024 (a ReLU kink at 0 can flip a unit within
    float32 rounding when a micro-batch sums in another order), a strategy every model takes."""
    microbatches = overrides.get("microbatches", 1)
    base = dict(batch_size=32 if 32 % (2 * microbatches) == 0 else 8 * microbatches)
    if model == "mlp-1024":
        base["activation"] = "gelu"
    if model == "mlp":
        base["depth"] = 8
    base.update({k: overrides.pop(k) for k in list(overrides) if k in base})
    piped = {
        k: overrides.pop(k)
        for k in list(overrides)
        if k in ("microbatches", "repeats", "stage_split", "placement", "schedule")
    }
    cfg = small_config("mlp" if model == OWN else model, overrides.pop("strategy", "tp"), **base, **overrides)
    return cfg, cfg.replace(**piped)


CASES = [
    # (model, schedule, stages, microbatches, repeats, data, tensor, stage split, placement)
    ("mlp", "1f1b", 4, 8, 2, 1, 1, "uniform", None),  # interleaved: some ticks need two rounds
    ("mlp", "zb-h1", 2, 8, 1, 2, 2, "uniform", None),
    ("mlp", "gpipe", 3, 1, 1, 1, 2, "3,3,2", None),
    ("mlp-1024", "1f1b", 2, 3, 1, 2, 2, "uniform", None),
    ("mlp-1024", "gpipe", 2, 1, 1, 1, 1, "uniform", "0,1,1,0"),
    ("mlp-1024", "interleaved-1f1b", 2, 3, 2, 1, 1, "uniform", None),  # M not a multiple of S
    ("mnist-cnn", "gpipe", 2, 4, 1, 2, 2, "uniform", None),
    ("mnist-cnn", "1f1b", 3, 8, 1, 1, 1, "2,1,3", None),
    ("mnist-cnn", "zb-h1", 2, 3, 1, 1, 1, "auto", None),
    ("mnist-cnn", "1f1b", 4, 9, 1, 1, 1, "uniform", None),  # M = 2S + 1
    (OWN, "1f1b", 2, 4, 1, 2, 2, "uniform", None),
    (OWN, "zb-h1", 3, 5, 1, 1, 1, "uniform", None),
    ("mlp", "zb-v", 4, 5, 1, 1, 1, "auto", None),  # a V: the turn on stage 3 is a message to itself
    ("mnist-cnn", "zb-v", 2, 4, 1, 2, 2, "uniform", None),
    # dualpipev: overlapped pairs, full and split backwards in one table; M in {S, 2S, 2S + 1}
    ("mlp", "dualpipev", 2, 5, 1, 2, 2, "uniform", None),
    ("mnist-cnn", "dualpipev", 2, 4, 1, 1, 1, "uniform", None),
    ("mlp", "dualpipev", 4, 4, 1, 1, 2, "uniform", None),
    ("mlp", "dualpipev", 4, 9, 1, 2, 1, "uniform", None),
]


@pytest.mark.parametrize(
    ("model", "schedule", "stages", "microbatches", "repeats", "data", "tensor", "split", "place"), CASES
)
def test_pipeline_matches_one_device(model, schedule, stages, microbatches, repeats, data, tensor, split, place):
    cfg, piped = config(
        model, microbatches=microbatches, repeats=repeats, stage_split=split, placement=place, schedule=schedule
    )
    mesh = build_mesh(MeshShape(data=data, tensor=tensor, pipe=stages))
    got = loss_and_grads(piped, mesh, poison=True, model=model)
    assert_same(got, loss_and_grads(cfg, single_device_mesh(), model=model))


@pytest.mark.parametrize(
    ("model", "schedule", "stages", "microbatches", "data", "tensor", "split"),
    [
        ("mlp", "zb-h1", 2, 8, 2, 2, "uniform"),
        ("mnist-cnn", "zb-h1", 3, 5, 1, 1, "2,1,3"),
        ("mlp", "zb-v", 2, 5, 1, 1, "uniform"),
        ("mlp", "dualpipev", 2, 4, 1, 1, "uniform"),
    ],
)
def test_weight_pass_from_stashed_cotangents_matches_one_device(
    model, schedule, stages, microbatches, data, tensor, split
):
    """--weight-pass stash: B keeps the cotangents W needs in the residual slot (poisoned until then)."""
    cfg, piped = config(model, microbatches=microbatches, stage_split=split, schedule=schedule, weight_pass="stash")
    mesh = build_mesh(MeshShape(data=data, tensor=tensor, pipe=stages))
    got = loss_and_grads(piped, mesh, poison=True, model=model)
    assert build(piped, mesh).pipeline.train.stash_cotangents
    assert_same(got, loss_and_grads(cfg, single_device_mesh(), model=model))


def test_dense_accumulates_micro_batches_on_one_stage():
    """A one-layer model pipelines on pipe=1: gradient accumulation over micro-batches, data x tensor."""
    cfg, piped = config("dense", strategy="column", microbatches=4)
    mesh = build_mesh(MeshShape(data=2, tensor=2))
    assert_same(loss_and_grads(piped, mesh, poison=True), loss_and_grads(cfg, single_device_mesh()))


@pytest.mark.parametrize(("model", "schedule", "microbatches"), [("mlp-1024", "1f1b", 3), ("mlp-1024", "dualpipev", 4)])
def test_unmasked_messages_let_the_poison_through(model, schedule, microbatches):
    """The negative control of the poison: writing every message, needed or not, puts NaN in the result
    (dualpipev: through a pair's two lanes and two rounds too)."""
    _, piped = config(model, microbatches=microbatches, schedule=schedule)
    mesh = build_mesh(MeshShape(pipe=2))
    loss, grads = loss_and_grads(piped, mesh, poison=True, masked=False)
    assert not (np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values()))
    loss, grads = loss_and_grads(piped, mesh, poison=False, masked=False)  # without poison: finite garbage
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("remat", ["none", "full"])
def test_remat_changes_nothing(remat):
    cfg, piped = config("mlp", microbatches=4, remat=remat)
    assert_same(
        loss_and_grads(piped, build_mesh(MeshShape(tensor=2, pipe=4)), poison=True),
        loss_and_grads(cfg, single_device_mesh()),
    )


def test_1f1b_keeps_the_residuals_of_s_micro_batches_gpipe_of_m():
    """Compiled temporaries (``memory_analysis``) where activations dominate: GPipe stashes the residuals
    of all M=8 micro-batches, 1F1B those of S=2 (--remat none: every residual kept); --remat full stashes
    only chunk inputs."""
    cfg = small_config("mlp", "dp", width=16, hidden=256, depth=4, batch_size=512, microbatches=8, remat="none")
    mesh = build_mesh(MeshShape(pipe=2))

    def temps(**overrides):
        return build(cfg.replace(**overrides), mesh).grad_step.compiled.memory_analysis().temp_size_in_bytes

    gpipe, one_f_one_b, full = temps(schedule="gpipe"), temps(schedule="1f1b"), temps(schedule="gpipe", remat="full")
    assert one_f_one_b < 0.7 * gpipe and full < 0.7 * gpipe


def test_dualpipev_stashes_about_what_zb_v_stashes():
    """Compiled temporaries where activations dominate (--remat none), pipe=2, M=4: DualPipeV keeps at most
    2S + 1 = 5 chunk-micro-batches per device where ZB-V keeps 2S = 4 (from the tables); XLA's buffers
    follow, within 5/4."""
    cfg = small_config("mlp", "dp", width=16, hidden=256, depth=4, batch_size=512, microbatches=4, remat="none")
    mesh = build_mesh(MeshShape(pipe=2))
    programs = {name: build(cfg.replace(schedule=name), mesh) for name in ("zb-v", "dualpipev")}
    temps = {name: p.grad_step.compiled.memory_analysis().temp_size_in_bytes for name, p in programs.items()}
    stashed = {name: p.pipeline.train.schedule.stashed().max() for name, p in programs.items()}
    assert (stashed["zb-v"], stashed["dualpipev"]) == (4, 5)
    assert temps["dualpipev"] <= 1.25 * temps["zb-v"], temps


def test_unroll_changes_nothing_but_the_loops():
    cfg, piped = config("mlp", depth=2, batch_size=32, microbatches=2, unroll=True)
    mesh = build_mesh(MeshShape(tensor=2, pipe=2))
    assert_same(loss_and_grads(piped, mesh, poison=True), loss_and_grads(cfg, single_device_mesh()))
    # The tick loops are the while loops of a known trip count (an action's loop runs once or not at all).
    loops = {
        u: build(piped.replace(unroll=u), mesh).grad_step.compiled.as_text().count("known_trip_count")
        for u in (False, True)
    }
    assert loops[True] < loops[False]


@pytest.mark.parametrize("model", ["mnist-cnn", "mlp-1024"])
def test_training_trajectory_on_data_tensor_pipe_mesh(model):
    """``--mesh data=2,tensor=2,pipe=2 --microbatches 4``: 20 steps follow one device's losses."""
    from support import losses_on, reference_losses

    cfg, piped = config(model, microbatches=4)
    np.testing.assert_allclose(
        losses_on(piped, build_mesh(MeshShape(data=2, tensor=2, pipe=2))), reference_losses(cfg), rtol=RTOL
    )


def param_bytes(program) -> int:
    """Parameter bytes one device holds (the largest stage's buffers, padding included)."""
    return sum(
        math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
        for a in jax.tree.leaves(program.state_abstract.params)
    )


def test_each_stage_holds_only_its_own_parameters():
    one = param_bytes(build(config("mlp-1024")[0], single_device_mesh()))
    _, split = config("mlp-1024", microbatches=2, stage_split="1,3")
    assert param_bytes(build(split, build_mesh(MeshShape(pipe=2)))) <= 0.8 * one
    assert param_bytes(build(split, build_mesh(MeshShape(tensor=2, pipe=2)))) <= 0.45 * one
    cfg, piped = config("mlp", microbatches=4)
    program = build(piped, build_mesh(MeshShape(pipe=4)))
    whole = build(cfg, single_device_mesh()).state_abstract.params
    outside = sum(a.size * 4 for k in ("pre", "post") for a in jax.tree.leaves(whole[k]))
    stacked = sum(a.size * 4 for a in jax.tree.leaves(whole["layers"]))
    assert stacked / 4 <= param_bytes(program) <= stacked / 4 + outside
    table = program.pipeline.packing.stage_table()
    assert [row["layers"] for row in table] == [
        "pre, layers.0[0:2]",
        "layers.0[2:4]",
        "layers.0[4:6]",
        "layers.0[6:8], post",
    ]


@pytest.mark.parametrize(
    ("schedule", "stages", "microbatches", "repeats"),
    [("gpipe", 4, 4, 1), ("1f1b", 4, 4, 1), ("interleaved-1f1b", 2, 4, 2), ("gpipe", 2, 3, 2)],
)
def test_only_activations_and_cotangents_cross_pipe(schedule, stages, microbatches, repeats):
    """Traffic over pipe: one micro-batch message per device per tick (an activation on or a cotangent
    back, whichever its action sends; 1F1B sends both kinds in one tick), a single collective-permute
    each; no weight and no all-to-all."""
    from jaxmp.pipeline import build_schedule

    _, piped = config("mlp", batch_size=48, microbatches=microbatches, repeats=repeats, schedule=schedule)
    mesh = build_mesh(MeshShape(pipe=stages))
    program = build(piped, mesh)
    every = collectives(program.train_step.compiled.as_text(), mesh)
    on_pipe = [c for c in every if "pipe" in c.axes]
    permutes = [c for c in on_pipe if c.kind == "collective-permute"]
    b_by_d = (48 // microbatches) * 32
    ticks = build_schedule(schedule, stages, microbatches, repeats).ticks
    assert {c.elements for c in permutes} == {b_by_d}
    assert sum(c.total_elements for c in permutes) == ticks * b_by_d
    assert [c for c in on_pipe if c.kind != "collective-permute" and c.elements > 1] == []


@pytest.mark.parametrize(
    ("model", "shape"), [("mlp", MeshShape(data=2, tensor=2, pipe=2)), ("mnist-cnn", MeshShape(data=2, pipe=2))]
)
def test_weight_gradients_are_reduced_over_the_batch_axes_once_per_step(model, shape):
    """Each device sums its stage's gradients through the tick loops; one all-reduce per buffer after them."""
    _, piped = config(model, microbatches=4)
    mesh = build_mesh(shape)
    program = build(piped, mesh)
    reduced = [
        c
        for c in collectives(program.train_step.compiled.as_text(), mesh)
        if c.kind == "all-reduce" and c.axes == ("data",) and c.elements > 1
    ]
    buffers = program.pipeline.packing.buffers.values()
    assert reduced and [c.count for c in reduced] == [1] * len(reduced)  # nothing reduced inside a loop
    assert sum(c.total_elements for c in reduced) == sum(b.size for b in buffers)


def test_megatron_collectives_inside_a_stage_are_those_of_the_layer():
    """mlp-1024 on tensor=2, pipe=2: each stage's column/row pair keeps its one all-reduce per direction,
    so the pipelined program has exactly the one-stage program's all-reduces (the backward pulls through
    stashed residuals; --remat stage's redone element-wise work needs none); with --remat full each
    stage's backward re-runs its forward, and with it one forward all-reduce."""
    cfg, piped = config("mlp-1024", microbatches=2)

    def tensor_all_reduces(text, mesh):
        return [
            c for c in collectives(text, mesh) if c.kind == "all-reduce" and c.axes == ("tensor",) and c.elements > 1
        ]

    flat_mesh = build_mesh(MeshShape(tensor=2), jax.devices()[:2])
    flat = build(cfg, flat_mesh)
    forward = len(tensor_all_reduces(flat.eval_step.compiled.as_text(), flat_mesh))
    both = len(tensor_all_reduces(flat.grad_step.compiled.as_text(), flat_mesh))
    mesh = build_mesh(MeshShape(tensor=2, pipe=2))
    counts = [
        len(tensor_all_reduces(build(piped.replace(remat=remat), mesh).grad_step.compiled.as_text(), mesh))
        for remat in ("stage", "none", "full")
    ]
    assert forward == 2 and counts == [both, both, both + 2]


@pytest.mark.parametrize(
    ("model", "shape", "overrides", "message"),
    [
        ("mlp-1024", MeshShape(pipe=8), {}, "need at least 8 layers, the model has 4"),
        ("mnist-cnn", MeshShape(pipe=2), dict(stage_split="2,2"), "adding up to the model's 6 layers"),
        ("mnist-cnn", MeshShape(pipe=2), dict(stage_split="fast"), "is not uniform, auto, auto-memory or"),
        ("mlp-1024", MeshShape(pipe=2), dict(placement="0,2,1,0"), "device 2 is not in 0..1"),
        ("mlp-1024", MeshShape(pipe=2), dict(placement="0,0,0,0"), "gives device 1 along pipe no layers"),
        ("mlp", MeshShape(data=2, pipe=4), dict(microbatches=3, batch_size=32), "cannot be split into 3 micro-batches"),
        ("dense", MeshShape(pipe=2), dict(strategy="column"), "need at least 2 layers, the model has 1"),
    ],
)
def test_bad_pipeline_configs(model, shape, overrides, message):
    _, cfg = config(model, **{"microbatches": 2, **overrides})
    with pytest.raises(ConfigError, match=message):
        build(cfg, build_mesh(shape))


def test_auto_splits_balance_and_never_drop_a_layer():
    from jaxmp.pipeline.partition import chunk_bounds

    assert chunk_bounds("uniform", 5, 2) == [(0, 3), (3, 5)]
    assert chunk_bounds("2,3", 5, 2) == [(0, 2), (2, 5)]
    # one expensive layer gets a stage of its own; the cheap ones share
    assert chunk_bounds("auto", 5, 3, [1.0, 100.0, 1.0, 1.0, 1.0]) == [(0, 1), (1, 2), (2, 5)]
    for split, costs in [("uniform", None), ("auto", [3.0, 1.0, 4.0, 1.0, 5.0])]:
        bounds = chunk_bounds(split, 5, 4, costs)
        assert bounds[0][0] == 0 and bounds[-1][1] == 5
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:], strict=False))


def test_auto_memory_puts_the_big_layer_alone():
    """mnist-cnn: fc1 holds nearly all the weights, so balancing bytes gives it a stage of its own."""
    _, piped = config("mnist-cnn", microbatches=2, stage_split="auto-memory")
    program = build(piped, build_mesh(MeshShape(pipe=2)))
    assert "layers.3" in program.pipeline.packing.stage_table()[1]["layers"]


@pytest.mark.parametrize(
    ("repeats", "split", "shared"), [(1, "uniform", [2]), (2, "uniform", [1, 1]), (1, "3,2,2,1", [])]
)
def test_evenly_split_stacks_share_their_offsets_on_every_stage(repeats, split, shared):
    """The executor unpacks a piece once per step only if every stage holds it at the same offsets: an
    evenly split stack (one region per chunk a stage runs), never pre or post, nothing when uneven; the
    buffers still round-trip the model's parameters."""
    cfg, piped = config("mlp", microbatches=4, repeats=repeats, stage_split=split)
    packing = build(piped, build_mesh(MeshShape(pipe=4))).pipeline.packing
    assert [rows for _, key, rows in packing.shared] == shared
    assert all(key[0] == "layers" for _, key, _ in packing.shared)
    for chunk in packing.chunks:
        for slot in chunk.slots:
            sig = chunk.shared[slot.piece]
            if sig is None:  # pre, post and uneven rows come after the shared region, per stage
                assert slot.offset >= packing.shared_size.get(slot.buffer, 0)
            else:
                assert slot in [s._replace(piece=slot.piece) for s in packing.shared[sig]]
    params = build(cfg, single_device_mesh()).init().params
    back = packing.unpack(packing.pack(params))
    jax.tree.map(np.testing.assert_array_equal, back, params)
