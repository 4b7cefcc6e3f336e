"""Helpers shared by tests: fixed batches and a loss trajectory on any mesh."""

from __future__ import annotations

import functools
import math
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

from jaxmp.config import Config
from jaxmp.parallel.mesh import MeshShape, build_mesh
from jaxmp.training.step import build_program

IMAGE = (12, 12, 1)
CLASSES = 10


def small_config(model: str, strategy: str, **overrides) -> Config:
    """A config small enough to compile and train 20 steps in about a second."""
    base = dict(model=model, strategy=strategy, width=32, hidden=64, depth=2, batch_size=16)
    base.update(optimizer="sgd", lr=0.01)
    return Config().replace(**{**base, **overrides})


def fixed_batches(steps: int, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` batches of random images and labels, the same on every call."""
    rng = np.random.default_rng(seed)
    xs = rng.uniform(size=(steps, batch, *IMAGE)).astype(np.float32)
    ys = rng.integers(0, CLASSES, size=(steps, batch)).astype(np.int32)
    return xs, ys


OWN = "own"  # the README's example model (not a preset), in place of a preset name


def readme_model_source() -> str:
    """The first code block of the README's "Your own model" section: ``MyModel`` and ``digits_model``."""
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## Your own model") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    return code[: code.index("\n```")] + "\n"


def model_fn_for(model: str):
    """``rngs -> model`` for the README's model, None for a preset."""
    if model != OWN:
        return None
    from jaxmp.examples.digits import MyModel  # the README's block, verbatim (test_readme checks it)

    return lambda rngs: MyModel(math.prod(IMAGE), CLASSES, rngs)


def build(cfg: Config, mesh, model: str = "", **kw):
    """``build_program`` for a preset or (``model=OWN``) the README's model."""
    return build_program(cfg, mesh, IMAGE, CLASSES, model_fn=model_fn_for(model), **kw)


def losses_on(cfg: Config, mesh: jax.sharding.Mesh, steps: int = 20, model: str = "") -> np.ndarray:
    """The loss of each of ``steps`` train steps of ``cfg`` on ``mesh``."""
    program = build(cfg, mesh, model)
    xs, ys = fixed_batches(steps, cfg.run.batch_size)
    state, losses = program.init(), []
    for x, y in zip(xs, ys, strict=True):
        state, metrics = program.train_step(state, *program.put_batch(x, y))
        losses.append(metrics["loss"])
    return np.array([float(loss) for loss in losses])


def single_device_mesh() -> jax.sharding.Mesh:
    return build_mesh(MeshShape(), jax.devices()[:1])


@functools.cache
def reference_losses(cfg: Config, steps: int = 20, model: str = "") -> np.ndarray:
    """Losses on one device."""
    return losses_on(cfg, single_device_mesh(), steps, model)


@functools.cache
def loss_and_grads(
    cfg: Config, mesh: jax.sharding.Mesh, *, poison: bool = False, seed: int = 0, model: str = "", masked: bool = True
):
    """Loss and gradients of one batch at initialisation, as host numpy (grads keyed by param name)."""
    from jaxmp.parallel.sharding import path_name

    program = build(cfg, mesh, model, poison=poison, masked=masked)
    xs, ys = fixed_batches(1, cfg.run.batch_size, seed)
    loss, grads = program.grad_step(program.init(), *program.put_batch(xs[0], ys[0]))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    return float(loss), {path_name(path): np.asarray(g) for path, g in flat}


def assert_same(got, expected, rtol: float = 1e-5) -> None:
    """Two ``loss_and_grads`` results agree: the loss, and every gradient (relative to its largest entry)."""
    loss, grads = got
    ref_loss, ref_grads = expected
    np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        scale = np.abs(ref_grads[name]).max()
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=rtol, atol=rtol * scale, err_msg=name)


def run_module(module: str, *args: str, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -m module args`` in a fresh process (exit codes and stderr as a user sees them)."""
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def assert_one_line_error(stderr: str, message: str = "") -> None:
    """The project's rule for bad input: one line, ``error: ...``, no traceback, naming ``message``."""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert message in stderr, stderr


_HOLD_THE_COMMIT = """
import os, time
from orbax.checkpoint._src.path import atomicity

def hold(original):
    async def finalize(self, *args, **kwargs):
        if os.path.basename(str(self.get_final())) == "STEP":
            open("saving", "w").close()  # every array of the step is written; the rename is held back
            time.sleep(600)
        return await original(self, *args, **kwargs)
    return finalize

for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
    cls.finalize = hold(cls.finalize)
from jaxmp.cli import run_as_command
from jaxmp.train import main
run_as_command(main)
"""


def train_holding_the_commit(step: int) -> list[str]:
    """``python -c`` arguments that run ``jaxmp.train`` (flags follow) with Orbax's commit of checkpoint
    ``step`` held back for 600 s, after touching ``saving`` in the working folder: a save in flight."""
    return ["-c", _HOLD_THE_COMMIT.replace("STEP", str(step))]


def wait_for(predicate, timeout: float, what: str, child: subprocess.Popen) -> None:
    """Poll ``predicate`` until it holds; fail if ``child`` ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if child.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {child.communicate()}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
