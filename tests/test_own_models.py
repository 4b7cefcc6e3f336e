"""Two models that are not presets, through the public API only, on every mesh of 8 devices.

An MLP whose hidden axis has a logical name of its own (``hidden``) and a small CNN with its own names
for conv feature maps (``maps``) and dense units (``units``). Each is trained 20 steps on one device,
then on every (data, tensor, pipe) factorisation of 8 devices (pipelined with 1F1B where ``pipe > 1``):
the losses must agree to float32 tolerance. ``jaxmp.analyze`` must list their collectives.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from support import CLASSES, IMAGE, fixed_batches

import jaxmp
import jaxmp.training.loop
from jaxmp.inspection.planner import factorisations
from jaxmp.inspection.step_report import analyze

STEPS, BATCH, FEATURES = 20, 16, 12 * 12
RULES = {"hidden": "tensor", "maps": "tensor", "units": "tensor"}


def _param(names):
    """Flax's own annotation, as a Flax user writes it."""
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class Block(nnx.Module):
    """``h + W2 tanh(W1 h)``, the hidden axis named ``hidden``."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(width, 2 * width, kernel_init=_param(("embed", "hidden")), rngs=rngs)
        self.down = nnx.Linear(2 * width, width, kernel_init=_param(("hidden", "embed")), rngs=rngs)

    def __call__(self, h, ctx):
        return h + self.down(jax.nn.tanh(self.up(h)))


class Linear(nnx.Module):
    def __init__(self, fan_in: int, fan_out: int, rngs: nnx.Rngs, names=(None, None)):
        self.linear = nnx.Linear(fan_in, fan_out, kernel_init=_param(names), rngs=rngs)

    def __call__(self, h, ctx):
        return self.linear(h.reshape(h.shape[0], -1))


class BlockMLP(nnx.Module):
    """Eight layers (so ``pipe=8`` has one per stage): an input projection and seven blocks."""

    def __init__(self, rngs: nnx.Rngs, width: int = 16):
        self.layers = nnx.List([Linear(FEATURES, width, rngs), *(Block(width, rngs) for _ in range(7))])
        self.post = Linear(width, CLASSES, rngs)


class Conv(nnx.Module):
    """3x3 convolution (SAME) and ReLU, output maps named ``maps``."""

    def __init__(self, c_in: int, c_out: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(c_in, c_out, (3, 3), kernel_init=_param((None, None, None, "maps")), rngs=rngs)

    def __call__(self, h, ctx):
        return jax.nn.relu(self.conv(h))


class Pool(nnx.Module):
    def __call__(self, h, ctx):
        return nnx.max_pool(h, (2, 2), strides=(2, 2))


class SmallCNN(nnx.Module):
    """Four convolutions, a pool and three dense layers: eight layers."""

    def __init__(self, rngs: nnx.Rngs, maps: int = 8):
        convs = [Conv(1, maps, rngs), *(Conv(maps, maps, rngs) for _ in range(3))]
        flat = 6 * 6 * maps
        dense = [Linear(flat, 32, rngs, (None, "units")), Linear(32, 32, rngs, ("units", None)), Linear(32, 16, rngs)]
        self.layers = nnx.List([*convs, Pool(), *dense])
        self.post = Linear(16, CLASSES, rngs)


MODELS = {"mlp": BlockMLP, "cnn": SmallCNN}


def _optimizer():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))


def _losses(model: str, mesh_spec: str, devices=None) -> np.ndarray:
    mesh = jaxmp.mesh_from_spec(mesh_spec, devices)
    cfg = jaxmp.Config().replace(batch_size=BATCH, seed=0, mesh=mesh_spec, microbatches=mesh.shape["pipe"])
    program = jaxmp.build_program(
        cfg, mesh, IMAGE, CLASSES, model_fn=MODELS[model], optimizer=_optimizer(), rules=RULES
    )
    state, losses = program.init(), []
    for x, y in zip(*fixed_batches(STEPS, BATCH), strict=True):
        state, metrics = program.train_step(state, *program.put_batch(x, y))
        losses.append(metrics["loss"])
    return np.array([float(loss) for loss in losses])


@pytest.fixture(scope="module")
def one_device():
    return {model: _losses(model, "data=1", jax.devices()[:1]) for model in MODELS}


MESHES = [str(shape) for shape in factorisations(8)]


# every mesh with one of the two models, in turn, and the 3D mesh with both: each model meets data,
# tensor and pipe splits alone and together, at half the compilations of both on all ten
CASES = [(mesh, list(MODELS)[i % 2]) for i, mesh in enumerate(MESHES)]
CASES += [(mesh, model) for mesh in MESHES for model in MODELS if mesh == "data=2,tensor=2,pipe=2"]
CASES = list(dict.fromkeys(CASES))


@pytest.mark.parametrize(("mesh", "model"), CASES)
def test_every_mesh_of_eight_devices_trains_like_one_device(one_device, model, mesh):
    assert np.isfinite(one_device[model]).all() and one_device[model][-1] < one_device[model][0]
    np.testing.assert_allclose(_losses(model, mesh), one_device[model], rtol=1e-5)


@pytest.mark.parametrize("model", list(MODELS))
def test_analyze_lists_the_collectives_of_a_model_of_your_own(model):
    cfg = jaxmp.Config().replace(batch_size=BATCH, mesh="data=2,tensor=4")
    report = analyze(cfg, model_fn=MODELS[model], input_shape=IMAGE, classes=CLASSES, rules=RULES)
    kinds = {(c.kind, c.axes) for c in report.collectives if c.elements}
    assert ("all-reduce", ("tensor",)) in kinds  # the hidden / maps axis split over tensor
    assert any(kind == "all-reduce" and "data" in axes for kind, axes in kinds)  # gradients over data
    assert report.model == MODELS[model].__qualname__
    data_rows = [r for r in report.rows if r.kind == "all-reduce" and r.axes == ("data",)]
    # the gradient all-reduce over data has a closed form for any model; XLA may fold a few replicated
    # gradients into a data x tensor reduction, never move more than predicted
    assert data_rows and all(0 < r.measured <= r.predicted for r in data_rows), report.rows
    assert report.prediction.uncovered == ("tensor",)  # layer kinds of its own: no closed form for tensor


def _data(n=64, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, *IMAGE)).astype(np.float32), rng.integers(0, CLASSES, n).astype(np.int32)


def _fit(tmp_path, mesh, steps, **options):
    from rich.console import Console

    return jaxmp.fit(
        SmallCNN,
        _data(),
        _data(32, seed=2),
        optimizer=_optimizer(),
        rules=RULES,
        mesh=mesh,
        steps=steps,
        batch_size=BATCH,
        report=False,
        console=Console(quiet=True),
        metrics_file=str(tmp_path / f"{steps}-{options.get('resume', False)}.jsonl"),
        **options,
    )


def test_fit_on_a_flax_mesh_resumes_on_another_and_refuses_nan_data(tmp_path):
    """The CNN through ``jaxmp.fit``: a ``jax.sharding.Mesh`` of the user's own (axis ``data`` only)
    as the reference; saved at step 3 on a pipelined 3D mesh, resumed on ``tensor=8``, the trajectory
    continues; a NaN in the data is refused before the run, naming the row."""
    flax_mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    straight = _fit(tmp_path, flax_mesh, 6)
    first = _fit(tmp_path, "data=2,tensor=2,pipe=2", 3, microbatches=2, checkpoint_dir=str(tmp_path / "ck"))
    resumed = _fit(tmp_path, "tensor=8", 6, checkpoint_dir=str(tmp_path / "ck"), resume=True)
    np.testing.assert_allclose(first.losses + resumed.losses, straight.losses, rtol=1e-5)
    x, y = _data()
    x[3:] = np.nan
    with pytest.raises(jaxmp.ConfigError, match=r"train data: example 3 holds a non-finite value"):
        jaxmp.fit(SmallCNN, (x, y), steps=3, batch_size=BATCH, report=False, rules=RULES, mesh="data=8")


def test_plan_ranks_the_meshes_of_a_model_of_your_own():
    """``plan`` compiles the user's program on every mesh of 2 devices; each shape is feasible and its
    roofline inputs come from that program (the MLP's hidden axis split over tensor moves data there)."""
    from jaxmp.inspection.hardware import get_hardware
    from jaxmp.inspection.planner import plan

    cfg = jaxmp.Config().replace(batch_size=BATCH)
    rows = plan(cfg, 2, get_hardware("cpu"), IMAGE, CLASSES, (1,), model_fn=BlockMLP, rules=RULES)
    assert sorted(str(r.mesh) for r in rows) == sorted(str(s) for s in factorisations(2))
    assert all(r.feasible and r.flops > 0 for r in rows), rows
    comm = {str(r.mesh): r.comm_bytes for r in rows}
    assert comm["data=1,tensor=2,pipe=1"] > 0 and comm["data=2,tensor=1,pipe=1"] > 0
