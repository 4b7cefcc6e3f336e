"""Two processes x 4 CPU devices (a real ``jax.distributed`` run over localhost, Gloo collectives) train
exactly like one process x 8 devices, and write a checkpoint that one process restores.

The two-process run is what a SLURM job does with ``srun -n 2``: every process runs the same program on
its own devices, feeds only its rows of each batch, and writes only its shards of the checkpoint.
"""

import json
import socket
import subprocess
import sys

import jax
import numpy as np
from support import small_config

from jaxmp.parallel.mesh import mesh_from_spec
from jaxmp.train import main
from jaxmp.training.checkpoint import restore
from jaxmp.training.step import build_program

MESH = "data=2,tensor=2,pipe=2"
FLAGS = ["--mesh", MESH, "--microbatches", "2", "--depth", "4", "--width", "32", "--hidden", "64"]
FLAGS += ["--batch-size", "16", "--optimizer", "adam", "--steps", "8", "--no-report"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def losses(path) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]


def test_two_processes_train_like_one(tmp_path):
    address = f"localhost:{free_port()}"
    two = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxmp.train", "--cpu-devices", "4", *FLAGS]
            + ["--coordinator-address", address, "--num-processes", "2", "--process-id", str(rank)]
            + ["--metrics-file", str(tmp_path / "two.jsonl"), "--checkpoint-dir", str(tmp_path / "ck-two")],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        assert (
            main([*FLAGS, "--metrics-file", str(tmp_path / "one.jsonl"), "--checkpoint-dir", str(tmp_path / "ck")]) == 0
        )
        outputs = [child.communicate(timeout=300) for child in two]
    finally:
        for child in two:
            child.kill()
    for child, (_, err) in zip(two, outputs, strict=True):
        assert child.returncode == 0, err[-3000:]
    assert "summary" in outputs[0][0] and "summary" not in outputs[1][0]  # process 0 alone reports
    assert "[Gloo]" not in outputs[0][0] + outputs[1][0]  # 20 connection lines per process unfiltered
    np.testing.assert_allclose(losses(tmp_path / "two.jsonl"), losses(tmp_path / "one.jsonl"), rtol=1e-5)
    assert len(losses(tmp_path / "one.jsonl")) == 8

    cfg = small_config("mlp", "tp", depth=4, microbatches=2, optimizer="adam", mesh=MESH)
    program = build_program(cfg, mesh_from_spec(MESH), (8, 8, 1), 10)
    cfg = cfg.replace(resume=True)
    one, two_saved = (
        restore(cfg.replace(checkpoint_dir=str(tmp_path / d)), program, (8, 8, 1), 10) for d in ("ck", "ck-two")
    )
    assert one.step == two_saved.step == 8
    for a, b in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(two_saved.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_the_gloo_filter_drops_interleaved_connection_lines_only():
    from jaxmp.training.distributed import GLOO_CONNECTED

    interleaved = b"[Gloo] Rank [Gloo] Rank 01 is connected to  is connected to 11 peer ranks.  peer ranks. "
    interleaved += b"Expected number of connected peer ranks is : Expected number of connected peer ranks is : 11\n"
    assert GLOO_CONNECTED.fullmatch(interleaved) and GLOO_CONNECTED.fullmatch(b"\n")
    assert not GLOO_CONNECTED.fullmatch(b"[Gloo] Rank 0: connection refused\n")
    assert not GLOO_CONNECTED.fullmatch(b"step 10 loss 2.3\n")
