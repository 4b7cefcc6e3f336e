"""jaxmp as a library: a model, optimizer, loss and rules of the user's own, through ``build_program``.

The reference is what a user would write by hand: ``jax.jit`` of ``optax`` on one device, no jaxmp.
Every jaxmp run of the same pieces, on one device or on a 3D mesh with a pipeline, must give the same
20 losses.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from support import CLASSES, IMAGE, fixed_batches, single_device_mesh

from jaxmp.config import Config, ConfigError
from jaxmp.parallel.mesh import mesh_from_spec
from jaxmp.training.step import build_program

STEPS, BATCH, FEATURES = 20, 16, math.prod(IMAGE)


class Residual(nnx.Module):
    """A residual MLP block whose hidden axis has a name of this model's own: ``hidden``."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        up = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "hidden"))
        down = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("hidden", "embed"))
        self.up = nnx.Linear(width, 2 * width, kernel_init=up, rngs=rngs)
        self.down = nnx.Linear(2 * width, width, kernel_init=down, rngs=rngs)

    def __call__(self, h, ctx):
        return h + self.down(jax.nn.tanh(self.up(h)))


class Flatten(nnx.Module):
    def __call__(self, x, ctx):
        return x.reshape(x.shape[0], -1)


class Dense(nnx.Module):
    def __init__(self, fan_in: int, fan_out: int, rngs: nnx.Rngs):
        self.linear = nnx.Linear(fan_in, fan_out, rngs=rngs)

    def __call__(self, h, ctx):
        return self.linear(h)


class ResidualMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 16):
        self.pre = Flatten()
        self.layers = nnx.List([Dense(FEATURES, width, rngs), *(Residual(width, rngs) for _ in range(3))])
        self.post = Dense(width, CLASSES, rngs)


def smoothed_loss(outputs, labels):
    """Label-smoothed cross-entropy, per example."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, outputs.shape[-1]), 0.1)
    return optax.softmax_cross_entropy(outputs, targets)


def optimizer():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup_steps=5, decay_steps=STEPS)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-2))


def hand_written_losses() -> np.ndarray:
    """The same training, written with jax.jit and optax only."""
    with nnx.use_eager_sharding(False):  # one device, no mesh: the names stay metadata
        model = ResidualMLP(nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optimizer()

    @jax.jit
    def step(params, opt_state, x, y):
        def loss(p):
            h = x
            m = nnx.merge(graphdef, p)
            for part in (m.pre, *m.layers, m.post):
                h = part(h, None)
            return smoothed_loss(h, y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's schedules mix Python floats and int32 counts
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state, losses = tx.init(params), []
    for x, y in zip(*fixed_batches(STEPS, BATCH), strict=True):
        params, opt_state, value = step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
        losses.append(float(value))
    return np.array(losses)


def jaxmp_losses(mesh_spec: str | None, **overrides) -> np.ndarray:
    cfg = Config().replace(batch_size=BATCH, seed=0, **overrides)
    mesh = single_device_mesh() if mesh_spec is None else mesh_from_spec(mesh_spec)
    program = build_program(
        cfg,
        mesh,
        IMAGE,
        CLASSES,
        model_fn=ResidualMLP,
        optimizer=optimizer(),
        loss=smoothed_loss,
        rules={"hidden": "tensor"},
    )
    state, losses = program.init(), []
    for x, y in zip(*fixed_batches(STEPS, BATCH), strict=True):
        state, metrics = program.train_step(state, *program.put_batch(x, y))
        losses.append(float(metrics["loss"]))
    return np.array(losses)


@pytest.fixture(scope="module")
def reference():
    return hand_written_losses()


@pytest.mark.parametrize(
    ("mesh", "overrides"),
    [
        (None, {}),
        ("data=2,tensor=4", {}),
        ("data=2,tensor=2,pipe=2", {"microbatches": 4, "schedule": "1f1b"}),
    ],
)
def test_own_model_optimizer_and_loss_train_like_a_hand_written_loop(reference, mesh, overrides):
    np.testing.assert_allclose(jaxmp_losses(mesh, **overrides), reference, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "adam"}, "optimizer must be an optax.GradientTransformation, got str"),
        ({"loss": lambda o, y: o.mean()}, r"loss must give one float per label, shape \(16,\)"),
        ({"loss": 3}, "loss must be a function"),
        ({"loss": lambda o, y: o[:, :, 0]}, "loss failed on outputs"),
    ],
)
def test_bad_pieces_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _one_device_program(**kwargs)


def _one_device_program(**pieces):
    """The own MLP on one device, with ``pieces`` (optimizer=, loss=) of a test's own."""
    cfg = Config().replace(batch_size=BATCH)
    return build_program(
        cfg, single_device_mesh(), IMAGE, CLASSES, model_fn=ResidualMLP, rules={"hidden": None}, **pieces
    )


class _NotALayer(nnx.Module):
    """A model whose layer is a bare nnx.Linear: called as layer(h, ctx), ctx lands in its arguments."""

    def __init__(self, rngs):
        self.pre = Flatten()
        self.layers = nnx.List([nnx.Linear(FEATURES, CLASSES, rngs=rngs)])


def test_a_model_that_fails_on_its_input_is_one_line():
    with pytest.raises(ConfigError, match=rf"the model fails on inputs of shape \({BATCH}, 12, 12, 1\)"):
        build_program(Config().replace(batch_size=BATCH), single_device_mesh(), IMAGE, CLASSES, model_fn=_NotALayer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": float("nan")}, "^lr must be a finite number, got nan"),
        ({"weight_decay": float("inf")}, "^weight_decay must be a finite number, got inf"),
        ({"microbatches": 0}, "^microbatches must be positive, got 0"),
        ({"model": "resnet"}, "^model 'resnet' is not one of"),
        ({"depth": "8"}, "^depth must be an int, got '8'"),
        ({"fsdp": 1}, "^fsdp must be a bool, got 1"),
    ],
)
def test_the_python_api_validates_like_the_cli_in_python_terms(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_program(Config().replace(**overrides), single_device_mesh(), IMAGE, CLASSES)


def test_python_terms_rename_the_config_flags_only():
    from jaxmp.speech import in_python_terms

    message = "--checkpoint-every needs --checkpoint-dir; --no-resume; --cpu-devices 8; pip download --no-deps x"
    assert in_python_terms(message) == (
        "checkpoint_every needs checkpoint_dir; resume=False; jaxmp.simulate_cpu_devices(8); pip download --no-deps x"
    )


# ---------------------------------------------------------------- jaxmp.fit: the loop around it


def _data(n=64, seed=1, nan_at=None):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, *IMAGE)).astype(np.float32)
    if nan_at is not None:
        x[nan_at] = np.nan
    return x, rng.integers(0, CLASSES, n).astype(np.int32)


def _fit(tmp_path, mesh, steps, **options):
    from rich.console import Console

    from jaxmp import fit

    options = dict(batch_size=BATCH, report=False, metrics_file=str(tmp_path / f"{mesh}-{steps}.jsonl"), **options)
    return fit(
        ResidualMLP,
        _data(),
        _data(32, seed=2),
        optimizer=optimizer(),
        loss=smoothed_loss,
        rules={"hidden": "tensor"},
        mesh=mesh,
        steps=steps,
        console=Console(quiet=True),
        **options,
    )


def test_fit_trains_resumes_on_another_mesh_and_refuses_another_model(tmp_path):
    """An own model, optimizer, loss and data through the whole loop: 1F1B on a 3D mesh equals data
    parallelism; saved at step 4 on that mesh, it resumes on data=4,tensor=2 and continues the trajectory;
    a checkpoint of this model refuses to resume another."""
    one = _fit(tmp_path, "data=8", 8)
    piped = dict(microbatches=4, schedule="1f1b")
    first = _fit(tmp_path, "data=2,tensor=2,pipe=2", 4, checkpoint_dir=str(tmp_path / "ck"), **piped)
    np.testing.assert_allclose(first.losses, one.losses[:4], rtol=1e-5)
    resumed = _fit(tmp_path, "data=4,tensor=2", 8, checkpoint_dir=str(tmp_path / "ck"), resume=True)
    np.testing.assert_allclose(resumed.losses, one.losses[4:], rtol=1e-5)
    assert 0.0 <= one.eval_accuracy <= 1.0 and one.state is not None
    from jaxmp import fit

    with pytest.raises(ConfigError, match=r"was saved with model ResidualMLP, but this run has \S*<lambda>"):
        fit(
            lambda r: ResidualMLP(r, width=8),
            _data(),
            steps=9,
            batch_size=BATCH,
            report=False,
            rules={"hidden": None},
            checkpoint_dir=str(tmp_path / "ck"),
            resume=True,
        )


def test_fit_stops_a_run_that_diverges_naming_the_step(tmp_path):
    from jaxmp import fit
    from jaxmp.training.loop import Diverged

    def poisoned(outputs, labels):  # finite data, a loss that is not
        return outputs[:, 0] * jnp.nan

    with pytest.raises(Diverged, match=r"loss is nan at step \d+"):
        fit(ResidualMLP, _data(), loss=poisoned, steps=3, batch_size=BATCH, report=False, rules={"hidden": None})


@pytest.mark.parametrize("split", ["train", "test"])
def test_fit_refuses_non_finite_data_naming_the_split_and_row(split):
    from jaxmp import fit

    bad, good = _data(nan_at=5), _data()
    with pytest.raises(ConfigError, match=rf"{split} data: example 5 holds a non-finite value"):
        fit(ResidualMLP, *((bad, good) if split == "train" else (good, bad)), steps=1, batch_size=BATCH)


def test_put_batch_names_what_it_expected_and_what_it_got():
    program = _one_device_program()
    x, y = _data(BATCH)
    with pytest.raises(
        ConfigError, match=rf"put_batch: x is int32\[{BATCH}, 12, 12, 1\], the program was built for float32"
    ):
        program.put_batch(x.astype(np.int32), y)
    with pytest.raises(ConfigError, match=rf"put_batch: y is int32\[10\], the program was built for int32\[{BATCH}\]"):
        program.put_batch(x, y[:10])
    program.put_batch(x, y)  # the right batch passes


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (np.zeros((4, 3)), "train data must be a pair"),
        ((np.zeros((4, 3)), np.zeros(5, np.int32)), "do not pair up"),
        ((np.zeros((4, 3)), np.zeros(4)), "labels must be integer class ids"),
    ],
)
def test_fit_refuses_data_that_does_not_pair_up(train, message):
    from jaxmp import fit

    with pytest.raises(ConfigError, match=message):
        fit(ResidualMLP, train)


def test_the_readme_layout_lists_every_module_and_nothing_else():
    """The README's layout section is the package: every module under jaxmp/ listed, none invented."""
    import pathlib
    import re

    root = pathlib.Path(__file__).parents[1]
    text = (root / "README.md").read_text()
    block = text[text.index("## Layout") :].split("```text\n", 1)[1].split("\n```", 1)[0]
    listed, stack = set(), []
    for line in block.splitlines():
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        stack = [*stack[: indent // 2], name]
        if stack[0] == "jaxmp/" and name.endswith(".py"):
            listed.add("".join(stack))
    modules = {str(p.relative_to(root)) for p in (root / "jaxmp").rglob("*.py") if "__pycache__" not in p.parts}
    modules = {m for m in modules if not re.fullmatch(r"jaxmp/\w+/__init__\.py", m)}
    assert listed == modules


def test_a_mesh_larger_than_the_devices_says_how_to_simulate_more():
    from jaxmp import MeshShape, build_mesh

    with pytest.raises(ConfigError, match=r"needs 16 devices, JAX has 8; on CPU, jaxmp.simulate_cpu_devices\(16\)"):
        build_mesh(MeshShape(data=16))
