"""Every bad checkpoint, profiling, TensorBoard and multi-process input: one line, exit code 2, no file touched.

One real checkpoint is made once per module (2 steps of a small MLP on digits); each case works on its
own copy, damaged as the case asks. After each case every file under the test's folder must have the
same bytes as before, and no file may have appeared (no checkpoint folder, no metrics, no trace).
"""

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil

import jax
import pytest
from flax import nnx
from support import IMAGE, small_config

from jaxmp.parallel.mesh import MeshShape, build_mesh, mesh_from_spec
from jaxmp.train import main
from jaxmp.training.checkpoint import Saver
from jaxmp.training.step import build_program

SMALL = ["--width", "32", "--hidden", "64", "--batch-size", "16", "--no-report"]
PRECIOUS = "a file the user saved\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("made") / "ck"
    assert main([*SMALL, "--steps", "2", "--checkpoint-dir", str(folder)]) == 0
    return folder


def edit_meta(folder, **changes):
    path = folder / "2" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    for dotted, value in changes.items():
        group, key = dotted.split("__")
        meta[group][key] = value
    path.write_text(json.dumps(meta))


def garble(path):
    path.write_bytes(b"\x00garbage" * 4)


def truncate_array_data(folder):
    """Cut every array-data file in half, as a full disk or an interrupted copy would."""
    for path in (folder / "2" / "state").rglob("*"):
        if path.is_file() and "ocdbt.process_0" in str(path) and path.name != "manifest.ocdbt":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "meta-garbage": lambda ck: garble(ck / "2" / "meta" / "metadata"),
    "meta-width-64": lambda ck: edit_meta(ck, model__width=64),
    "arrays-truncated": truncate_array_data,
    "index-garbage": lambda ck: garble(ck / "2" / "state" / "_METADATA"),
    "meta-format-only": lambda ck: (ck / "2" / "meta" / "metadata").write_text('{"format": 1}'),
}

RESUME = ["--checkpoint-dir", "{ck}", "--resume"]
CASES = [
    # flags
    (["--resume"], None, "--resume needs --checkpoint-dir"),
    (["--checkpoint-every", "5"], None, "--checkpoint-every needs --checkpoint-dir"),
    (["--checkpoint-dir", "{new}", "--checkpoint-every", "-1"], None, "--checkpoint-every must be 0 or positive"),
    (["--checkpoint-dir", "{new}", "--keep", "0"], None, "--keep must be positive, got 0"),
    (["--checkpoint-dir", "{file}"], None, "is a file; give a folder"),
    (["--checkpoint-dir", "{file}/sub"], None, "is not a writable folder"),
    (["--checkpoint-dir", "{new}", "--resume"], None, "holds no complete checkpoint to resume from"),
    (["--checkpoint-dir", "{ck}"], None, "already holds checkpoints up to step 2; add --resume"),
    (["--profile-steps", "5"], None, "--profile-steps '5' is not A:B"),
    (["--profile-steps", "0:3"], None, "--profile-steps '0:3' is not A:B"),
    (["--profile-steps", "4:2"], None, "--profile-steps '4:2' is not A:B"),
    (["--profile-steps", "30:40", "--steps", "20"], None, "30:40 lies outside the steps this run trains (1..20)"),
    (["--profile-steps", "1:2", "--profile-dir", "{file}"], None, "--profile-dir {file} is a file"),
    (["--tensorboard-dir", "{file}"], None, "--tensorboard-dir {file} is a file"),
    (["--coordinator-address", "localhost:1234"], None, "--num-processes, --process-id missing"),
    (["--coordinator-address", "node0", "--num-processes", "2", "--process-id", "0"], None, "is not HOST:PORT"),
    (
        ["--coordinator-address", "n:1", "--num-processes", "2", "--process-id", "2"],
        None,
        "--process-id 2 is not in 0..1",
    ),
    (["--coordinator-address", "n:1", "--num-processes", "0", "--process-id", "0"], None, "--num-processes must be"),
    (["--coordinator-address", "localhost:1", "--num-processes", "2", "--process-id", "1"], None, "came too late"),
    # checkpoints that do not fit the run
    ([*RESUME, "--width", "64"], None, "saved with --width 32, but this run has 64"),
    ([*RESUME, "--model", "mlp-1024"], None, "saved with --model mlp, but this run has mlp-1024"),
    ([*RESUME, "--activation", "relu"], None, "saved with --activation gelu, but this run has relu"),
    ([*RESUME, "--optimizer", "sgd"], None, "saved with --optimizer adam, but this run has sgd"),
    ([*RESUME, "--batch-size", "32"], None, "saved with --batch-size 16, but this run has 32"),
    ([*RESUME, "--seed", "1"], None, "saved with --seed 0, but this run has 1"),
    ([*RESUME, "--dataset", "synthetic", "--synthetic-shape", "8x8x1"], None, "saved with --dataset digits"),
    ([*RESUME, "--steps", "2"], None, "is already at step 2 of the 2 this run trains"),
    ([*RESUME, "--profile-steps", "1:3", "--steps", "5"], None, "1:3 lies outside the steps this run trains (3..5)"),
    # corrupt checkpoints
    ([*RESUME, "--steps", "4"], "meta-garbage", "is damaged: {ck}/2/meta/metadata is unreadable"),
    ([*RESUME, "--steps", "4"], "meta-format-only", "is damaged: {ck}/2/meta/metadata is not a jaxmp checkpoint"),
    (
        [*RESUME, "--steps", "4", "--width", "64"],
        "meta-width-64",
        "params.layers.0.layer.down.bias has shape (2, 32), this run needs (2, 64)",
    ),
    ([*RESUME, "--steps", "4"], "index-garbage", "is damaged: its array index"),
    ([*RESUME, "--steps", "4"], "arrays-truncated", "cannot be read (Encountered error while reading array"),
    ([*RESUME, "--steps", "4"], "arrays-truncated", "There is no older checkpoint in that folder."),
    (
        ["--checkpoint-dir", "{ck}", "--resume-from", "3", "--steps", "4"],
        None,
        "{ck} holds checkpoints of steps 2 only",
    ),
    (["--resume-from", "2"], None, "--resume-from needs --checkpoint-dir"),
]


def snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[path] = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    return files


@pytest.mark.parametrize(("argv", "damage", "message"), CASES, ids=[" ".join(a) + f" {d or ''}" for a, d, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(argv, damage, message, checkpoint, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    if damage:
        DAMAGE[damage](ck)
    (tmp_path / "file").write_text(PRECIOUS)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(PRECIOUS)
    names = {"ck": str(ck), "new": str(tmp_path / "new"), "file": str(tmp_path / "file")}
    argv = SMALL + [a.format(**names) for a in argv] + ["--metrics-file", str(metrics)]
    before = snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(**names) in err, err
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "new").exists() and not os.path.exists("jaxmp-profile")


def test_tensorboard_without_its_package(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else real(name, *a)
    )
    assert main([*SMALL, "--tensorboard-dir", str(tmp_path / "tb")]) == 2
    assert "needs the tensorboardX package: pip install 'jaxmp[tensorboard]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_with_another_dtype(tmp_path, capsys):
    """A state saved in bfloat16 (e.g. by another tool) is refused by name, not cast silently."""
    import jax
    import jax.numpy as jnp

    cfg = small_config("mlp", "tp", optimizer="adam", lr=1e-3, checkpoint_dir=str(tmp_path / "ck"))
    cfg = cfg.replace(mesh="data=8")
    program = build_program(cfg, mesh_from_spec("data=8"), (8, 8, 1), 10)
    state = program.init()
    cast = state._replace(params=jax.tree.map(lambda a: a.astype(jnp.bfloat16), state.params))
    saver = Saver(cfg, (8, 8, 1), 10, program)
    saver.save(2, cast)
    saver.close()
    before = snapshot(tmp_path)
    assert (
        main([*SMALL, "--optimizer", "adam", "--steps", "4", "--checkpoint-dir", str(tmp_path / "ck"), "--resume"]) == 2
    )
    err = capsys.readouterr().err
    assert "params.layers.0.layer.down.bias has dtype bfloat16, this run needs float32" in err, err
    assert snapshot(tmp_path) == before


class _NoLayers(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 2, rngs=rngs)


class _OutsideParam(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([_Layer(rngs)])
        self.extra = nnx.Linear(4, 2, rngs=rngs)


class _Layer(nnx.Module):
    def __init__(self, rngs, fan_in=144, fan_out=10):
        from jaxmp.models.layers import dense

        self.linear = dense(fan_in, fan_out, (None, None), rngs=rngs)

    def __call__(self, h, ctx):
        return self.linear(h.reshape(h.shape[0], -1))


def _stack_without_layers_name(rngs):
    from jaxmp.models.layers import Stacked

    stack = Stacked(lambda r: _Layer(r, 144, 144), 2, rngs=rngs)
    for _, variable in nnx.to_flat_state(nnx.state(stack.layer, nnx.Param)):
        variable.set_metadata("out_sharding", ())
    return stack


class _UnnamedStack(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([_stack_without_layers_name(rngs), _Layer(rngs)])


class _RaggedStack(nnx.Module):
    def __init__(self, rngs):
        from jaxmp.models.layers import Stacked

        stack = Stacked(lambda r: _Layer(r, 144, 144), 2, rngs=rngs)
        stack.depth = 3  # claims three layers, holds two
        self.layers = nnx.List([stack, _Layer(rngs)])


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_NoLayers, "model _NoLayers has no layer list"),
        (_OutsideParam, "parameter extra.bias is outside pre, layers and post"),
        (_UnnamedStack, "layers.0.layer.linear.bias is stacked but its first axis is not named 'layers'"),
        (_RaggedStack, "a stack of 3 layers needs a leading axis of 3 (its layers' shapes do not stack)"),
    ],
)
@pytest.mark.parametrize("shape", [MeshShape(), MeshShape(pipe=2)], ids=["plain", "pipelined"])
def test_a_model_that_breaks_the_layer_list_contract_gets_one_line(model, message, shape):
    """From Python, the same ConfigError the CLI prints: one line naming the part, when the program is built."""
    from jaxmp.config import ConfigError

    cfg = small_config("mlp", "tp", microbatches=2 if shape.pipe > 1 else 1)
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        build_program(cfg, build_mesh(shape, jax.devices()[: shape.pipe]), IMAGE, 10, model_fn=model)
    assert "\n" not in str(error.value)
