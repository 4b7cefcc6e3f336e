"""FSDP (ZeRO-3): parameters and optimizer state also split over the batch's mesh axes; same losses.

The memory claim is read off the compiled program (``memory_analysis()`` of the init function: the
train state each device holds), not computed from formulas. Loss and every gradient equal one device,
with and without a pipeline; runs restored onto FSDP shardings are checked in ``test_checkpoint.py``.
"""

import pytest
from jax.sharding import PartitionSpec as P
from support import CLASSES, IMAGE, assert_same, loss_and_grads, single_device_mesh, small_config

from jaxmp.parallel.mesh import MeshShape, build_mesh
from jaxmp.parallel.sharding import sharding_report
from jaxmp.training.step import build_program


def params_of(program):
    """Parameters as ``ShapeDtypeStruct`` with their shardings (nothing compiled)."""
    return program.state_abstract.params


def specs(program) -> dict[str, P]:
    return {row.name: row.spec for row in sharding_report(params_of(program))}


@pytest.mark.parametrize(
    ("model", "strategy", "shape", "microbatches"),
    [
        ("mlp", "tp", MeshShape(data=4, tensor=2), 1),
        ("mlp", "dp", MeshShape(data=2, tensor=2, pipe=2), 4),
        ("mnist-cnn", "hybrid", MeshShape(data=4, tensor=2), 1),
        ("mlp-1024", "tp", MeshShape(data=4, pipe=2), 2),
    ],
    ids=str,
)
def test_fsdp_loss_and_gradients_match_one_device(model, strategy, shape, microbatches):
    cfg = small_config(model, strategy, depth=4, batch_size=32)
    fsdp = cfg.replace(fsdp=True, microbatches=microbatches)
    assert_same(loss_and_grads(fsdp, build_mesh(shape)), loss_and_grads(cfg, single_device_mesh()))


def test_fsdp_adds_data_to_the_largest_whole_dimension():
    mesh = build_mesh(MeshShape(data=4, tensor=2))
    got = specs(build_program(small_config("mlp", "tp", fsdp=True), mesh, IMAGE, CLASSES))
    assert got["pre.linear.kernel"] == P("data", None)  # (144, 32): 144 is the larger dim
    assert got["layers.0.layer.up.kernel"] == P("pipe", "data", "tensor")  # (2, 32, 64): column split kept
    assert got["layers.0.layer.down.kernel"] == P("pipe", "tensor", "data")  # (2, 64, 32): row split kept
    assert got["post.linear.kernel"] == P("data", None)  # (32, 10)
    assert got["layers.0.layer.up.bias"] == P("pipe", ("tensor", "data"))  # (2, 64): no whole dim left, split further
    assert got["post.linear.bias"] == P(None)  # 10 classes do not divide over 4 devices: stays whole


def test_fsdp_under_dp_uses_every_batch_axis():
    mesh = build_mesh(MeshShape(data=2, tensor=4))
    got = specs(build_program(small_config("mlp", "dp", fsdp=True), mesh, IMAGE, CLASSES))
    assert got["pre.linear.kernel"] == P(("data", "tensor"), None)
    assert got["post.linear.bias"] == P("data")  # 10 is not divisible by 8, but by data=2


def test_fsdp_divides_the_per_device_state_by_data():
    """Bytes of the train state per device (compiled init outputs) drop by data=4, up to the whole arrays."""
    mesh = build_mesh(MeshShape(data=4, tensor=2))
    plain, fsdp = (
        build_program(small_config("mlp", "tp", fsdp=flag, optimizer="adam"), mesh, IMAGE, CLASSES)
        for flag in (False, True)
    )
    measured = [p.init.compiled.memory_analysis().output_size_in_bytes for p in (plain, fsdp)]
    table = [sum(r.bytes_per_device for r in sharding_report(params_of(p))) for p in (plain, fsdp)]
    copies = 3  # params, and Adam's mu and nu
    scalars = measured[0] - copies * table[0]  # step counter, key, Adam's count, buffer alignment
    assert 0 < scalars < 512
    assert measured[1] == copies * table[1] + scalars  # the compiled program holds what the table reports
    whole = sum(r.bytes_per_device for r in sharding_report(params_of(fsdp)) if "data" not in str(r.spec))
    assert whole == 4 * CLASSES  # only the head bias stays whole
    assert table[1] - whole == (table[0] - whole) / 4  # every other parameter is split 4 ways
    print(f"train state bytes per device (Adam): {measured[0]:,} -> {measured[1]:,} with --fsdp")
