"""Checkpoints: resume continues the exact trajectory, onto any mesh; failures never cost a good checkpoint.

In-process runs use the test process's 8 CPU devices; the SIGKILL and SIGINT cases need a real child
process (a signal to this one would stop pytest).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from rich.console import Console
from support import CLASSES, IMAGE, fixed_batches, small_config, train_holding_the_commit, wait_for

from jaxmp.parallel.mesh import MeshShape, build_mesh, mesh_from_spec
from jaxmp.train import main
from jaxmp.training.checkpoint import DamagedCheckpoint, Saver, complete_steps, restore
from jaxmp.training.loop import run
from jaxmp.training.step import build_program

QUIET = Console(quiet=True)
SAVE_MESH = "data=2,tensor=2,pipe=2"


def run_cfg(**overrides):
    """A 4-block MLP with Adam on digits, pipelined with 2 micro-batches on SAVE_MESH unless overridden."""
    base = dict(depth=4, microbatches=2, optimizer="adam", lr=1e-3, mesh=SAVE_MESH, report=False, steps=20)
    return small_config("mlp", "tp", **{**base, **overrides})


def losses_in(path) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 20-step run on SAVE_MESH (the reference trajectory) that saved steps 10 and 20."""
    root = tmp_path_factory.mktemp("saved")
    metrics = root / "m.jsonl"
    reference = run(run_cfg(checkpoint_dir=str(root / "ck"), checkpoint_every=10, metrics_file=str(metrics)), QUIET)
    assert complete_steps(str(root / "ck")) == [10, 20]
    return root, np.array(reference.losses)


def resumed(saved, tmp_path, **overrides) -> np.ndarray:
    """Resume a copy of the step-10 checkpoint to step 20 with ``overrides``; the losses of steps 11..20."""
    root, _ = saved
    folder, metrics = tmp_path / "ck", tmp_path / "m.jsonl"
    shutil.copytree(root / "ck", folder)
    shutil.rmtree(folder / "20")  # as if the run had stopped after saving step 10
    shutil.copy(root / "m.jsonl", metrics)
    summary = run(run_cfg(checkpoint_dir=str(folder), resume=True, metrics_file=str(metrics), **overrides), QUIET)
    assert complete_steps(str(folder)) == [10, 20]
    assert len(losses_in(metrics)) == 20  # steps 1..10 carried over from the first run's metrics
    return np.array(summary.losses)


def test_resume_on_the_same_mesh_is_bit_exact(saved, tmp_path):
    _, reference = saved
    got = resumed(saved, tmp_path)
    assert len(got) == 10
    np.testing.assert_array_equal(got, reference[10:])
    np.testing.assert_array_equal(losses_in(tmp_path / "m.jsonl"), reference)


@pytest.mark.parametrize(
    ("mesh", "fsdp"), [("data=4,tensor=2", True), ("data=2,pipe=4", False)], ids=["data4-tensor2-fsdp", "pipe4"]
)
def test_resume_on_another_mesh_reshards(saved, tmp_path, mesh, fsdp):
    """Also onto FSDP shardings: params and Adam state split over data too, the same losses."""
    _, reference = saved
    np.testing.assert_allclose(resumed(saved, tmp_path, mesh=mesh, fsdp=fsdp), reference[10:], rtol=1e-5)


def largest_data_file(step_folder) -> str:
    files = [os.path.join(d, f) for d, _, names in os.walk(step_folder / "state") for f in names]
    return max((f for f in files if "ocdbt.process_" in f and "/d/" in f), key=os.path.getsize)


def flip_one_byte(step_folder) -> None:
    path = largest_data_file(step_folder)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


DAMAGE = {
    "one byte flipped": flip_one_byte,
    "a data file truncated": lambda step: os.truncate(largest_data_file(step), 100),
    "a data file deleted": lambda step: os.remove(largest_data_file(step)),
    "the description deleted": lambda step: os.remove(step / "meta" / "metadata"),
}


@pytest.fixture(scope="module")
def saved_program(saved):
    cfg = run_cfg()
    return build_program(cfg, mesh_from_spec(SAVE_MESH), (8, 8, 1), 10)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_refused_naming_the_intact_one(saved, saved_program, tmp_path, damage):
    root, _ = saved
    shutil.copytree(root / "ck", tmp_path / "ck")
    DAMAGE[damage](tmp_path / "ck" / "20")
    cfg = run_cfg(checkpoint_dir=str(tmp_path / "ck"), resume=True, steps=30)
    with pytest.raises(DamagedCheckpoint, match=f"checkpoint {tmp_path / 'ck' / '20'}") as refused:
        restore(cfg, saved_program, (8, 8, 1), 10)
    assert "The newest intact checkpoint is step 10: resume it with --resume-from 10" in str(refused.value)
    if damage == "one byte flipped":  # the data still decodes: only the digest sees the change
        assert re.search(r"is damaged: \S+ no longer matches the digest it was saved with", str(refused.value))


def test_resume_from_an_older_checkpoint_continues_exactly_and_sets_the_newer_aside(saved, tmp_path):
    root, reference = saved
    folder = tmp_path / "ck"
    shutil.copytree(root / "ck", folder)
    flip_one_byte(folder / "20")
    summary = run(run_cfg(checkpoint_dir=str(folder), resume_from=10), QUIET)
    np.testing.assert_array_equal(summary.losses, reference[10:])  # bit for bit, as from an untouched one
    assert complete_steps(str(folder)) == [10, 20] and os.listdir(folder / "set-aside") == ["20"]
    assert restore(run_cfg(checkpoint_dir=str(folder), resume=True), summary.program, (8, 8, 1), 10).step == 20


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """3 steps of mlp-1024 on pipe=2 --stage-split 1,3 (each stage's parameters packed on its own
    devices), saved, then 10 more steps without a restart."""
    folder = tmp_path_factory.mktemp("pipeline-ck")
    cfg = small_config("mlp-1024", "tp", optimizer="adam", lr=1e-3, checkpoint_dir=str(folder / "ck"))
    cfg = cfg.replace(microbatches=2, stage_split="1,3")
    xs, ys = fixed_batches(13, cfg.run.batch_size)
    program = build_program(cfg, build_mesh(MeshShape(pipe=2)), IMAGE, CLASSES)
    state, _ = train_steps(program, program.init(), xs[:3], ys[:3])
    saver = Saver(cfg, IMAGE, CLASSES, program)
    saver.save(3, state)
    saver.close()
    _, reference = train_steps(program, state, xs[3:], ys[3:])
    return cfg, (xs[3:], ys[3:]), reference


def train_steps(program, state, xs, ys):
    losses = []
    for x, y in zip(xs, ys, strict=True):
        state, metrics = program.train_step(state, *program.put_batch(x, y))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize(
    ("shape", "overrides"),
    [
        (MeshShape(pipe=4), dict(stage_split="uniform")),
        (MeshShape(tensor=2), dict(microbatches=1, stage_split="uniform")),
        (MeshShape(), dict(microbatches=1, stage_split="uniform")),
        (MeshShape(data=4, pipe=2), dict(fsdp=True)),
    ],
    ids=["pipe4", "tensor2", "one-device", "data4-pipe2-fsdp"],
)
def test_pipeline_checkpoint_resumes_on_any_split_and_mesh(saved_pipeline, shape, overrides):
    """Checkpoints hold the model's own layer order, whatever the split, placement or mesh."""
    cfg, (xs, ys), reference = saved_pipeline
    cfg_b = cfg.replace(resume=True, **overrides)
    mesh = build_mesh(shape, jax.devices()[: shape.data * shape.tensor * shape.pipe])
    program = build_program(cfg_b, mesh, IMAGE, CLASSES)
    if cfg_b.model.fsdp:
        assert any("data" in str(s.spec) for s in jax.tree.leaves(program.state_shardings.params))
    restored = restore(cfg_b, program, IMAGE, CLASSES)
    assert restored.step == 3 and int(restored.state.step) == 3
    _, got = train_steps(program, restored.state, xs, ys)
    np.testing.assert_allclose(got, reference, rtol=1e-5)


SMALL = ["--width", "32", "--hidden", "64", "--batch-size", "16", "--no-report"]


def test_diverged_run_names_no_checkpoint_when_every_one_was_saved_climbing(tmp_path, capsys):
    """SGD at lr 10 blows up at step 4 (found by running it). Step 2's loss, computed on the parameters
    saved at step 1, is already 500x the first: no checkpoint is worth resuming, and the message says so
    instead of pointing at parameters that will diverge again (with --lr 0.01 too)."""
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("earlier run\n")
    argv = [*SMALL, "--optimizer", "sgd", "--lr", "10", "--steps", "30", "--metrics-file", str(metrics)]
    argv += ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "1", "--keep", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nan at step 4" in err, err
    assert "no checkpoint is worth resuming (by step 2 the loss had climbed to " in err, err
    assert complete_steps(str(tmp_path / "ck")) == [2, 3]
    assert metrics.read_text() == "earlier run\n"
    assert json.loads((tmp_path / "m.jsonl.partial").read_text().splitlines()[-1])["step"] == 4


class _Info:
    def __init__(self, step):
        self.step = step


def test_keep_k_also_keeps_the_newest_steady_checkpoint():
    from jaxmp.training.checkpoint import Health, _KeepNewestAndSteady

    keep = _KeepNewestAndSteady(2, {1, 2})
    infos = [_Info(step) for step in (1, 2, 3, 4)]
    assert keep.should_preserve(infos, context=None) == [False, True, True, True]  # 3, 4 and steady 2
    keep.steady.discard(2)  # step 3 found the parameters of step 2 climbing
    assert keep.should_preserve(infos, context=None) == [True, False, True, True]
    assert Health(2.0, 1.0, 1.5, 1.0).steady and not Health(3.1, 1.0, 1.5, 1.0).steady
    assert not Health(2.0, 11.0, 1.5, 1.0).steady and not Health(float("nan"), 1.0, 1.5, 1.0).steady


DIGITS = (8, 8, 1)


def cli_config(folder):
    """The config the CLI builds from SMALL (Adam by default) with ``--checkpoint-dir folder --resume``."""
    cfg = small_config("mlp", "tp", optimizer="adam", lr=1e-3)
    return cfg.replace(checkpoint_dir=str(folder), resume=True)


def restore_cli_checkpoint(folder):
    cfg = cli_config(folder)
    return restore(cfg, build_program(cfg, mesh_from_spec(cfg.run.mesh), DIGITS, CLASSES), DIGITS, CLASSES)


def _child(args, tmp_path, **kw):
    return subprocess.Popen(
        [sys.executable, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def test_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "ck"
    args = ["--checkpoint-dir", str(folder), "--checkpoint-every", "2", *SMALL]
    child = _child([*train_holding_the_commit(4), "--cpu-devices", "8", "--steps", "8", *args], tmp_path)
    wait_for(lambda: (tmp_path / "saving").exists(), 120, "the save of step 4", child)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    leftovers = sorted(os.listdir(folder))
    assert complete_steps(str(folder)) == [2]
    assert any(name.startswith("4.orbax-checkpoint-tmp") for name in leftovers), leftovers
    assert restore_cli_checkpoint(folder).step == 2  # the cut save is ignored...
    Saver(cli_config(folder), DIGITS, CLASSES).close()  # ...and removed (in the background) by the next run
    deadline = time.monotonic() + 20
    while sorted(os.listdir(folder)) != ["2"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(os.listdir(folder)) == ["2"]


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    metrics = tmp_path / "m.jsonl"
    args = ["-m", "jaxmp.train", "--cpu-devices", "8", "--steps", "100000", "--checkpoint-dir", "ck", *SMALL]
    child = _child([*args, "--metrics-file", str(metrics)], tmp_path)
    partial = tmp_path / "m.jsonl.partial"
    wait_for(lambda: partial.exists() and partial.read_text().count("\n") >= 3, 120, "three steps", child)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGINT, err
    assert err.startswith("stopped: SIGINT at step ") and err.count("\n") == 1 and "Traceback" not in err, err
    step = int(err.split("at step ")[1].split(":")[0])
    assert complete_steps(str(tmp_path / "ck")) == [step]
    assert not metrics.exists()  # an interrupted run does not replace the metrics file
    restored = restore_cli_checkpoint(tmp_path / "ck")
    assert restored.step == int(restored.state.step) == step
