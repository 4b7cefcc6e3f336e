"""Exact PartitionSpecs per parameter, for every model and strategy, and the optimizer state.

The expected tables are written out by hand from the design (column split = output on ``tensor``,
row split = input on ``tensor``), so a rules-table or model-annotation slip shows up as a diff.
"""

import math

import jax
import pytest
from flax import nnx
from support import CLASSES, IMAGE, small_config

from jaxmp.config import ConfigError
from jaxmp.parallel.mesh import MeshShape, build_mesh
from jaxmp.parallel.sharding import path_name, sharding_report
from jaxmp.training.step import build_program

P = jax.P
T = "tensor"
MLP_TP = {
    "pre.linear.kernel": P(None, None),
    "pre.linear.bias": P(None),
    "post.linear.kernel": P(None, None),
    "post.linear.bias": P(None),
    # stacked blocks: a leading `layers` axis, on `pipe` (size 1 here unless pipelined)
    "layers.0.layer.norm.scale": P("pipe", None),
    "layers.0.layer.norm.bias": P("pipe", None),
    "layers.0.layer.up.kernel": P("pipe", None, T),
    "layers.0.layer.up.bias": P("pipe", T),
    "layers.0.layer.down.kernel": P("pipe", T, None),
    "layers.0.layer.down.bias": P("pipe", None),
}
MLP1024_TP = {
    "layers.0.linear.kernel": P(None, T),
    "layers.0.linear.bias": P(T),
    "layers.1.linear.kernel": P(T, None),
    "layers.1.linear.bias": P(None),
    "layers.2.linear.kernel": P(None, T),
    "layers.2.linear.bias": P(T),
    "layers.3.linear.kernel": P(T, None),
    "layers.3.linear.bias": P(None),
}
CNN_TP = {
    "layers.0.conv.kernel": P(None, None, None, T),
    "layers.0.conv.bias": P(T),
    "layers.1.conv.kernel": P(None, None, None, T),
    "layers.1.conv.bias": P(T),
    "layers.3.linear.kernel": P(None, T),
    "layers.3.linear.bias": P(T),
    "layers.4.linear.kernel": P(T, None),
    "layers.4.linear.bias": P(None),
    "layers.5.linear.kernel": P(None, None),
    "layers.5.linear.bias": P(None),
}
CNN_HYBRID = {name: spec if ".linear." in name else P(*[None] * len(spec)) for name, spec in CNN_TP.items()}


def replicated(table):
    return {name: P(*["pipe" if axis == "pipe" else None for axis in spec]) for name, spec in table.items()}


EXPECTED = {
    ("mlp", "tp"): MLP_TP,
    ("mlp", "hybrid"): MLP_TP,
    ("mlp", "dp"): replicated(MLP_TP),
    ("mlp-1024", "tp"): MLP1024_TP,
    ("mlp-1024", "hybrid"): MLP1024_TP,
    ("mlp-1024", "dp"): replicated(MLP1024_TP),
    ("mnist-cnn", "tp"): CNN_TP,
    ("mnist-cnn", "hybrid"): CNN_HYBRID,
    ("mnist-cnn", "dp"): replicated(CNN_TP),
    ("dense", "column"): {"layers.0.linear.kernel": P(None, T)},
    ("dense", "row"): {"layers.0.linear.kernel": P(T, None)},
    ("dense", "dp"): {"layers.0.linear.kernel": P(None, None)},
}
BATCH_AXES = {"dp": ("data", "tensor"), "tp": "data", "hybrid": "data", "column": "data", "row": "data"}


def build(model, strategy, shape=None):
    return build_program(
        small_config(model, strategy), build_mesh(shape or MeshShape(data=2, tensor=4)), IMAGE, CLASSES
    )


def spec_table(shardings):
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {path_name(path): sharding.spec for path, sharding in flat}


@pytest.mark.parametrize(("model", "strategy"), sorted(EXPECTED))
def test_parameter_specs_are_exact(model, strategy):
    program = build(model, strategy, MeshShape(data=4, tensor=2) if model == "dense" else MeshShape(data=2, tensor=4))
    assert spec_table(program.state_shardings.params) == EXPECTED[model, strategy]


@pytest.mark.parametrize(("model", "strategy"), sorted(EXPECTED))
def test_batch_spec(model, strategy):
    program = build(model, strategy, MeshShape(data=4, tensor=2))
    conv_batch = ("data", "tensor") if strategy == "hybrid" and model == "mnist-cnn" else BATCH_AXES[strategy]
    assert program.x_sharding.spec[0] == conv_batch
    assert program.y_sharding.spec == P(BATCH_AXES[strategy])


def test_initialised_arrays_carry_the_specs_and_adam_state_follows_params():
    program = build_program(
        small_config("mlp", "tp", optimizer="adam"), build_mesh(MeshShape(data=2, tensor=4)), IMAGE, CLASSES
    )
    state = program.init()
    actual = {path_name(p): leaf.sharding.spec for p, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert actual == MLP_TP
    adam = state.opt_state[0]
    assert spec_table(jax.tree.map(lambda a: a.sharding, adam.mu)) == MLP_TP
    assert spec_table(jax.tree.map(lambda a: a.sharding, adam.nu)) == MLP_TP
    assert adam.count.sharding.spec == P()


def test_report_bytes_per_device_divide_by_the_split():
    state = build("mlp", "tp").init()
    rows = {row.name: row for row in sharding_report(state.params)}
    up, norm = rows["layers.0.layer.up.kernel"], rows["layers.0.layer.norm.scale"]
    assert up.shape == (2, 32, 64) and up.bytes_per_device == 2 * 32 * 64 * 4 // 4
    assert norm.bytes_per_device == 2 * 32 * 4


def test_indivisible_parameter_is_named():
    cfg = small_config("mlp", "tp", hidden=60)
    message = r"layers\.0\.layer\.down\.kernel of shape \(2, 60, 32\).*60 is not divisible by 8"
    with pytest.raises(ConfigError, match=message):
        build_program(cfg, build_mesh(MeshShape(tensor=8)), IMAGE, CLASSES)


def test_indivisible_batch_is_rejected():
    cfg = small_config("mlp", "dp", batch_size=12)
    with pytest.raises(ConfigError, match="^batch_size 12 is not divisible by 8"):
        build_program(cfg, build_mesh(MeshShape(data=2, tensor=4)), IMAGE, CLASSES)


class _Named(nnx.Module):
    """A two-layer model of its own whose hidden axis has a name no built-in rule knows."""

    def __init__(self, rngs, hidden_name="hidden"):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("features", hidden_name))
        self.pre = _Flat()
        self.layers = nnx.List([_Layer(nnx.Linear(math.prod(IMAGE), 32, kernel_init=init, rngs=rngs))])
        self.post = _Layer(nnx.Linear(32, CLASSES, rngs=rngs))


class _Layer(nnx.Module):
    def __init__(self, linear):
        self.linear = linear

    def __call__(self, h, ctx):
        return self.linear(h)


class _Flat(nnx.Module):
    def __call__(self, x, ctx):
        return x.reshape(x.shape[0], -1)


def _build_named(rules=None, mesh=None, **kw):
    cfg = small_config("mlp", "tp", batch_size=16)
    mesh = mesh or build_mesh(MeshShape(data=2, tensor=4))
    return build_program(cfg, mesh, IMAGE, CLASSES, model_fn=lambda r: _Named(r, **kw), rules=rules)


def test_a_logical_name_without_a_rule_is_named_with_its_parameter():
    with pytest.raises(
        ConfigError, match=r"parameter layers\.0\.linear\.kernel: no rule maps its logical axis 'hidden'"
    ):
        _build_named()


@pytest.mark.parametrize(("rule", "spec"), [("tensor", (None, "tensor")), (None, (None, None))])
def test_own_rules_extend_the_strategy(rule, spec):
    program = _build_named({"hidden": rule})
    kernel = program.state_abstract.params["layers"][0]["linear"]["kernel"]
    assert tuple(kernel.sharding.spec) == spec


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"hidden": "model"}, r"rules\['hidden'\] = 'model': a rule maps a logical name to None, a mesh axis"),
        ({"hidden": ("data", "data")}, "names a mesh axis twice"),
        (["hidden"], "rules must map logical axis names to mesh axes, got list"),
    ],
)
def test_bad_rules_tables_are_refused(rules, message):
    with pytest.raises(ConfigError, match=message):
        _build_named(rules)


def test_a_mesh_with_foreign_axis_names_is_refused():
    mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])
    with pytest.raises(
        ConfigError, match=r"mesh axes \('data', 'model'\): jaxmp meshes have the axes data, context, tensor, pipe"
    ):
        _build_named({"hidden": "tensor"}, mesh=mesh)


def test_a_mesh_of_some_of_the_axes_gets_the_others_as_size_one():
    from jaxmp.parallel.mesh import as_mesh

    mesh = jax.make_mesh((2, 4), ("data", "tensor"), devices=jax.devices()[:8])
    full = as_mesh(mesh)
    assert full.axis_names == ("data", "context", "tensor", "pipe")
    assert dict(full.shape) == {"data": 2, "context": 1, "tensor": 4, "pipe": 1}
    assert list(full.devices.flat) == list(mesh.devices.flat)
    swapped = jax.make_mesh((2, 4), ("tensor", "data"), devices=jax.devices()[:8])
    with pytest.raises(ConfigError, match=r"mesh axes \('tensor', 'data'\): .* \(in that order"):
        as_mesh(swapped)
    with pytest.raises(ConfigError, match="got int"):
        as_mesh(8)
