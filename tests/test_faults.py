"""Faults at any moment of a real ``python -m jaxmp.train`` process: signals from start-up to the end of a
save, a checkpoint folder made read-only mid-run, a full disk under the checkpoints or the metrics.

Each must end in one line on stderr with the documented exit code (130 / 143 for SIGINT / SIGTERM, 1 for
a failed write), within seconds, and leave every checkpoint committed before it intact and resumable.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import train_holding_the_commit, wait_for

from jaxmp.training.checkpoint import complete_steps

SMALL = ["--cpu-devices", "2", "--mesh", "data=2", "--width", "16", "--hidden", "32", "--batch-size", "8"]
SMALL += ["--no-report", "--steps", "100000"]


def start(tmp_path: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "jaxmp.train", *SMALL, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(child: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    """The exit code and stderr; fails if the run takes longer than ``timeout`` to end."""
    try:
        _, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        raise AssertionError(f"the run did not end within {timeout} s") from None
    return child.returncode, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def steps_done(tmp_path: Path, count: int):
    metrics = tmp_path / "m.jsonl.partial"
    return lambda: metrics.exists() and metrics.read_text().count("\n") >= count


def during_start_up(tmp_path: Path, child: subprocess.Popen) -> None:
    """A second after the training modules began loading: data, model and compilation under way."""
    wait_for(lambda: (tmp_path / "loading").exists(), 60, "the training modules", child)
    time.sleep(1.0)


# When each signal arrives: while JAX is imported, while the run starts (loading, compiling), in the
# middle of training; a fourth test sends two while a save is in flight.
MOMENTS = {  # "import": as JAX starts to load (earlier, Python itself is still starting: its defaults apply)
    "import": lambda tmp_path, child: wait_for(lambda: (tmp_path / "loading").exists(), 60, "the import", child),
    "start-up": during_start_up,
    "training": lambda tmp_path, child: wait_for(steps_done(tmp_path, 3), 120, "three steps", child),
}


@pytest.mark.parametrize(
    ("moment", "signum", "expected"),
    [
        ("import", signal.SIGINT, "stopped: SIGINT before the first step; nothing was written."),
        ("import", signal.SIGTERM, "stopped: SIGTERM before the first step; nothing was written."),
        ("start-up", signal.SIGINT, "stopped: SIGINT before the first step; nothing was written."),
        ("start-up", signal.SIGTERM, "stopped: SIGTERM before the first step; nothing was written."),
        ("training", signal.SIGTERM, "stopped: SIGTERM at step "),
    ],
)
def test_a_signal_at_any_moment_is_one_line_and_its_exit_code(tmp_path, moment, signum, expected):
    hooks = tmp_path / "hooks"  # marks the moment the training modules (JAX with them) begin to load
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import builtins\n"
        "_real = builtins.__import__\n"
        "def _marking(name, *args, **kwargs):\n"
        "    if name == 'jaxmp.training.loop':\n"
        "        open('loading', 'w').close()\n"
        "    return _real(name, *args, **kwargs)\n"
        "builtins.__import__ = _marking\n"
    )
    env_path = f"{hooks}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    child = subprocess.Popen(
        [sys.executable, "-m", "jaxmp.train", *SMALL, "--checkpoint-dir", "ck", "--metrics-file", "m.jsonl"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": env_path},
    )
    MOMENTS[moment](tmp_path, child)
    child.send_signal(signum)
    code, err = finish(child)
    assert code == 128 + signum and one_line(err).startswith(expected), err
    steps = complete_steps(str(tmp_path / "ck"))
    if moment == "training":  # saved where it stopped, and announced only once committed
        assert steps == [int(err.split("at step ")[1].split(":")[0])]
    else:
        assert steps == [] and not (tmp_path / "m.jsonl").exists()


def test_a_second_ctrl_c_during_a_save_stops_at_once_and_says_it_was_not_committed(tmp_path):
    args = ["--checkpoint-dir", "ck", "--checkpoint-every", "25", "--metrics-file", "m.jsonl"]
    child = subprocess.Popen(
        [sys.executable, *train_holding_the_commit(50), *SMALL, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: (tmp_path / "saving").exists(), 120, "the save of step 50", child)
    child.send_signal(signal.SIGINT)  # the loop saves at the next step, after the save in flight...
    time.sleep(0.05)
    child.send_signal(signal.SIGINT)  # ...which never commits: the second Ctrl-C stops at once
    code, err = finish(child)
    line = one_line(err)
    assert code == 130 and line.startswith("stopped: SIGINT again, at once; checkpoint "), err
    assert "was not committed" in line and line.endswith(f"the newest checkpoint is {tmp_path}/ck/25."), err
    assert complete_steps(str(tmp_path / "ck")) == [25]


def _can_drop_permission_bypass() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


@pytest.mark.skipif(not _can_drop_permission_bypass(), reason="needs root and setpriv to drop CAP_DAC_OVERRIDE")
def test_a_checkpoint_folder_made_read_only_ends_the_run_in_seconds(tmp_path):
    """As a user without root's permission bypass (setpriv drops CAP_DAC_OVERRIDE)."""
    drop = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    child = start(tmp_path, "--checkpoint-dir", "ck", "--checkpoint-every", "20", prefix=drop)
    wait_for(lambda: complete_steps(str(tmp_path / "ck")) == [20], 120, "the checkpoint of step 20", child)
    os.chmod(tmp_path / "ck", 0o555)
    began = time.monotonic()
    try:
        code, err = finish(child)
    finally:
        os.chmod(tmp_path / "ck", 0o755)
    assert code == 1 and time.monotonic() - began < 30
    line, saved = one_line(err), complete_steps(str(tmp_path / "ck"))  # 40 too, if it beat the chmod
    assert saved in ([20], [20, 40]), saved
    intact = ", ".join(map(str, saved))
    assert re.fullmatch(
        rf"error: cannot save checkpoint \d+ in {tmp_path}/ck: Permission denied; "
        rf"the checkpoints saved before \(steps {intact}\) are intact\.",
        line,
    ), err


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root can mount one), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs to mount a small tmpfs (root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_under_the_checkpoints_is_one_line(tmp_path, small_disk):
    child = start(tmp_path, "--width", "512", "--checkpoint-dir", str(small_disk / "ck"), "--checkpoint-every", "10")
    code, err = finish(child, timeout=120)
    line = one_line(err)
    assert code == 1 and line.startswith(f"error: cannot save checkpoint 20 in {small_disk}/ck: it needs about"), err
    assert line.endswith("free; the checkpoints saved before (steps 10) are intact."), err
    assert complete_steps(str(small_disk / "ck")) == [10]


def test_a_full_disk_under_the_metrics_keeps_the_partial_stream(tmp_path, small_disk):
    (small_disk / "m.jsonl").write_text("the user's earlier metrics\n")
    (small_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 16 * 2**10))  # 16 KiB left: ~150 records
    child = start(tmp_path, "--metrics-file", str(small_disk / "m.jsonl"))
    code, err = finish(child, timeout=120)
    partial = small_disk / "m.jsonl.partial"
    assert code == 1 and one_line(err) == (
        f"error: cannot write the metrics {partial}: No space left on device; it keeps the records written "
        f"before, and {small_disk}/m.jsonl is as it was."
    ), err
    assert (small_disk / "m.jsonl").read_text() == "the user's earlier metrics\n"
    assert partial.read_text().count('"loss"') > 100


def test_a_full_disk_under_tensorboard_is_one_line_not_a_hang(tmp_path, small_disk):
    """tensorboardX writes from its own thread; before, a failed write ended that thread and the run
    then waited forever on its queue."""
    (small_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 16 * 2**10))
    child = start(tmp_path, "--tensorboard-dir", str(small_disk / "tb"))
    code, err = finish(child, timeout=120)
    assert (
        code == 1
        and one_line(err) == f"error: cannot write TensorBoard scalars in {small_disk}/tb: No space left on device."
    ), err
