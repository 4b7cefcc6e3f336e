"""What the checkpoint digests cost: save and restore time with and without them, in one run.

    python experiments/checkpoint_digest_cost.py [--repeats 3] [--out experiments/results/checkpoint_digest_cost.md]

Two models on 8 simulated CPU devices (``data=8``, Adam, so a checkpoint holds the parameters and two
moments): the default ``mlp`` and an ``mlp`` of about 100 MB of parameters (width 1024, hidden 4096,
depth 3). For each, the median over ``--repeats`` of:
- save: ``Saver.save`` + ``wait`` (the digest is computed on the devices before Orbax starts writing);
- restore: ``restore`` (the digest is recomputed on the restored arrays and compared).
"Without" replaces the digest function by one that returns nothing (so restore has nothing to verify).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jaxmp

jaxmp.simulate_cpu_devices(8)

import jax  # noqa: E402

import jaxmp.training.checkpoint as checkpoint  # noqa: E402
from jaxmp.config import Config  # noqa: E402
from jaxmp.parallel.mesh import mesh_from_spec  # noqa: E402
from jaxmp.training.step import build_program  # noqa: E402

MODELS = {
    "mlp (default)": dict(model="mlp"),
    "mlp 1024x4096x3 (~100 MB of parameters)": dict(model="mlp", width=1024, hidden=4096, depth=3),
}


@contextlib.contextmanager
def digests_off():
    real = checkpoint.digests
    checkpoint.digests = lambda item: {}
    try:
        yield
    finally:
        checkpoint.digests = real


def time_save_and_restore(cfg: Config, program, state, folder: Path, step: int) -> tuple[float, float]:
    cfg = cfg.replace(checkpoint_dir=str(folder))
    saver = checkpoint.Saver(cfg, (8, 8, 1), 10, program)
    began = time.perf_counter()
    saver.save(step, state)
    saver.wait()
    saved = time.perf_counter() - began
    saver.close()
    began = time.perf_counter()
    restored = checkpoint.restore(cfg.replace(resume=True), program, (8, 8, 1), 10)
    jax.block_until_ready(restored.state.params)
    return saved, time.perf_counter() - began


def measure(name: str, overrides: dict, repeats: int) -> list[str]:
    cfg = Config().replace(mesh="data=8", optimizer="adam", batch_size=64, **overrides)
    program = build_program(cfg, mesh_from_spec("data=8"), (8, 8, 1), 10)
    state = program.init()
    megabytes = sum(leaf.nbytes for leaf in jax.tree.leaves(checkpoint.to_item(program.to_saved(state)))) / 2**20
    times = {"with": ([], []), "without": ([], [])}
    with tempfile.TemporaryDirectory() as root:
        for i in range(repeats + 1):  # the first round compiles the digest and warms Orbax: not counted
            for label in ("with", "without"):
                with digests_off() if label == "without" else contextlib.nullcontext():
                    saved, restored = time_save_and_restore(cfg, program, state, Path(root) / f"{label}{i}", i + 1)
                if i:
                    times[label][0].append(saved)
                    times[label][1].append(restored)
    (save_with, restore_with), (save_without, restore_without) = (
        tuple(statistics.median(t) for t in times[label]) for label in ("with", "without")
    )
    return [
        f"| {name} | {megabytes:,.1f} | {save_without:.3f} | {save_with:.3f} | {save_with / save_without:.2f} "
        f"| {restore_without:.3f} | {restore_with:.3f} | {restore_with / restore_without:.2f} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = [
        "| model | checkpoint MiB | save s, no digest | save s, digest | ratio "
        "| restore s, no digest | restore s, digest | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, overrides in MODELS.items():
        lines += measure(name, overrides, args.repeats)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(
            f"# Checkpoint digests: save and restore time\n\n`python {' '.join(sys.argv)}`; median of "
            f"{args.repeats} after one warm-up round; 8 simulated CPU devices, data=8, Adam.\n\n{text}\n"
        )


if __name__ == "__main__":
    main()
