"""``--profile-steps`` writes a trace of exactly those steps (Perfetto and TensorBoard formats), with the
pipeline's collective-permutes in it; ``--tensorboard-dir`` writes the scalars of the metrics file;
``--schedule-plot`` the picture of the run's schedule."""

import gzip
import json

import pytest

from jaxmp.train import main


def test_profile_window_and_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    argv = ["--width", "32", "--hidden", "64", "--batch-size", "16", "--depth", "4", "--no-report", "--steps", "4"]
    argv += ["--mesh", "data=2,pipe=4", "--microbatches", "4", "--profile-steps", "2:3"]
    argv += ["--profile-dir", str(tmp_path / "prof"), "--tensorboard-dir", str(tmp_path / "tb")]
    argv += ["--schedule-plot", str(tmp_path / "schedule.png")]
    assert main(argv) == 0
    assert (tmp_path / "schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "prof").rglob("*.xplane.pb"))) == 1  # TensorBoard's profile plugin reads this
    (perfetto,) = (tmp_path / "prof").rglob("perfetto_trace.json.gz")  # ui.perfetto.dev opens this
    trace = json.loads(gzip.decompress(perfetto.read_bytes()))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
    assert steps == [2, 3]
    sends = [e for e in events if any(k in str(e.get("name")) for k in ("collective-permute", "ppermute"))]
    assert sends  # stage-to-stage sends
    (events_file,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    data = events_file.read_bytes()
    assert all(tag in data for tag in (b"loss", b"grad_norm", b"eval_accuracy"))
