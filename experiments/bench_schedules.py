"""Pipeline schedules against each other and against torch.distributed.pipelining, in one run.

Model: ``mlp`` width D=512, hidden 2048, depth 8, batch 1024, Adam, float32 (defaults); ``pipe=4`` on
4 simulated CPU devices, M=8 micro-batches. Two tables:

a. **Step time** of each jaxmp schedule over the plain one-device jaxmp step (rounds interleaved, the
   median round per variant, first losses checked equal first), and, with ``--torch-python``, the same
   ratio for torch.distributed.pipelining's ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B,
   ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble and ScheduleDualPipeV over torch's plain step
   (``torch_pipeline_peer.py``, same model, same machine, the same total thread count). Interleaved
   schedules use 2 chunks per device, zb-v and dualpipev 2 per device in a V; "zb-h1 stash" is zb-h1 with
   ``--weight-pass stash`` (``B`` keeps the cotangents ``W`` needs; no work done twice); "1f1b remat
   none" is 1f1b keeping every residual (the default ``--remat stage`` keeps matmul outputs).
b. **Memory** (``pipe=4``, M in 4, 8, 16, 32, ``--remat`` stage (default) and none): per-device
   temporaries of the compiled train step (XLA's ``memory_analysis``), and the table's bubble and
   largest stash.

Run (about 10 minutes on 2 CPU cores)::

    .venv/bin/python experiments/bench_schedules.py --out experiments/results
    .venv/bin/python experiments/bench_schedules.py --torch-python /tmp/torchenv/bin/python --out experiments/results

PyTorch is an optional benchmark dependency, never one of jaxmp's: ``python3 -m venv /tmp/torchenv &&
/tmp/torchenv/bin/pip install torch numpy``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

MiB = 2**20
JAXMP_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h1 stash", "zb-v", "dualpipev")
STEP_ONLY = {"1f1b remat none": ("1f1b", dict(remat="none"))}  # step table only: what the default remat saves
PEERS = {  # jaxmp schedule -> torch's corresponding one
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "zb-h1": "ScheduleInterleavedZeroBubble",
    "zb-h1 stash": "ScheduleInterleavedZeroBubble",
    "zb-v": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
    "1f1b remat none": "Schedule1F1B",
}


def config(args, **overrides):
    from jaxmp.config import Config

    fields = dict(model="mlp", width=args.width, hidden=args.hidden, depth=args.depth, batch_size=args.batch)
    fields.update(optimizer="adam", lr=1e-3)
    return Config().replace(**{**fields, **overrides})


def pipelined(args, schedule: str, microbatches: int):
    """Config overrides of one schedule ("zb-h1 stash": zb-h1 with ``--weight-pass stash``)."""
    repeats = 2 if schedule == "interleaved-1f1b" else 1
    name, _, stash = schedule.partition(" ")
    weight_pass = "stash" if stash else "recompute"
    return dict(schedule=name, microbatches=microbatches, repeats=repeats, weight_pass=weight_pass)


def build(args, mesh, **overrides):
    from jaxmp.training.step import build_program

    return build_program(config(args, **overrides), mesh, (args.features,), args.classes)


def step_times(args) -> dict[str, float]:
    """Median step seconds of the plain one-device step and each schedule on pipe=4."""
    import jax
    import numpy as np

    from jaxmp.parallel.mesh import MeshShape, build_mesh

    one = build_mesh(MeshShape(), jax.devices()[:1])
    pipe = build_mesh(MeshShape(pipe=args.stages), jax.devices()[: args.stages])
    programs = {"plain": build(args, one)}
    for name in JAXMP_SCHEDULES:
        programs[name] = build(args, pipe, **pipelined(args, name, args.microbatches))
    for name, (schedule, flags) in STEP_ONLY.items():
        programs[name] = build(args, pipe, **pipelined(args, schedule, args.microbatches), **flags)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.features), dtype=np.float32)
    y = rng.integers(0, args.classes, args.batch, dtype=np.int32)
    runs, first = {}, {}
    for name, program in programs.items():
        state, batch = program.init(), program.put_batch(x, y)
        state, metrics = program.train_step.compiled(state, *batch)
        first[name] = float(metrics["loss"])
        runs[name] = [program.train_step.compiled, state, batch]
    for name, loss in first.items():
        assert abs(loss - first["plain"]) <= 1e-5 * abs(first["plain"]), (name, loss, first["plain"])
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            step, state, batch = run
            start = time.perf_counter()
            state, metrics = step(state, *batch)
            jax.block_until_ready(metrics)
            seconds[name].append(time.perf_counter() - start)
            run[1] = state
    return {name: statistics.median(s) for name, s in seconds.items()}


def memory_rows(args) -> list[list]:
    import jax

    from jaxmp.inspection.compiled import memory_and_flops
    from jaxmp.parallel.mesh import MeshShape, build_mesh
    from jaxmp.pipeline.schedule import lockstep_bubble, timed_bubble

    pipe = build_mesh(MeshShape(pipe=args.stages), jax.devices()[: args.stages])
    rows = []
    for remat in args.remats.split(","):
        for microbatches in (4, 8, 16, 32):
            temps, schedules = {}, {}
            for name in JAXMP_SCHEDULES:
                program = build(args, pipe, remat=remat, **pipelined(args, name, microbatches))
                temps[name] = memory_and_flops(program.train_step.compiled).temp_bytes
                schedules[name] = program.pipeline.train.schedule
            for name, temp in temps.items():
                schedule = schedules[name]
                ratios = [f"{temp / temps[base]:.2f}" for base in ("gpipe", "1f1b")]
                bubbles = [f"{f(schedule):.3f}" for f in (timed_bubble, lockstep_bubble)]
                row = [remat, microbatches, name, f"{temp / MiB:.1f}", *ratios, *bubbles]
                rows.append([*row, int(schedule.stashed().max())])
    return rows


def torch_times(args) -> dict[str, float] | None:
    if not args.torch_python:
        return None
    script = Path(__file__).with_name("torch_pipeline_peer.py")
    flags = ["--width", args.width, "--hidden", args.hidden, "--depth", args.depth, "--batch", args.batch]
    flags += ["--features", args.features, "--ranks", args.stages, "--microbatches", args.microbatches]
    flags += ["--threads", args.threads, "--steps", args.rounds]
    out = subprocess.run([args.torch_python, str(script), *map(str, flags)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def time_report(args, ours: dict[str, float], peer: dict[str, float] | None) -> str:
    rows = []
    for name in (*JAXMP_SCHEDULES, *STEP_ONLY):
        ratio = ours[name] / ours["plain"]
        torch_name = PEERS[name]
        theirs = peer[torch_name] / peer["plain"] if peer else None
        rows.append(
            [
                name,
                f"{ours[name] * 1e3:.0f}",
                f"**{ratio:.2f}**",
                torch_name,
                "" if theirs is None else f"{peer[torch_name] * 1e3:.0f}",
                "" if theirs is None else f"{theirs:.2f}",
            ]
        )
    plain = f"jaxmp plain one-device step {ours['plain'] * 1e3:.0f} ms"
    if peer:
        plain += f"; torch plain step {peer['plain'] * 1e3:.0f} ms"
    head = ["jaxmp schedule", "ms", "/ plain", "torch peer", "ms", "/ torch plain"]
    return (
        f"### a. Step time, pipe={args.stages}, M={args.microbatches} ({args.stages} simulated CPU devices, "
        f"{args.threads} threads)\n\nmlp width {args.width}, hidden {args.hidden}, depth {args.depth}, batch "
        f"{args.batch}, adam, float32; {args.rounds} interleaved rounds, median; {plain}; interleaved "
        "schedules with 2 chunks per device, zb-v and dualpipev with 2 in a V; default --remat (stage) but "
        "the last row.\n\n" + table(head, rows) + "\n"
    )


def memory_report(args, rows) -> str:
    head = ["remat", "M", "schedule", "temp MiB", "/ gpipe", "/ 1f1b", "bubble", "lockstep bubble", "most stashed"]
    return (
        f"### b. Memory per device, pipe={args.stages}\n\nTemporaries of the compiled train step "
        "(`memory_analysis`), and from the table: the bubble (idle time, each device running its actions in "
        "order as soon as their inputs are done, F = I = W = 1 and B = 2 per chunk, an overlapped pair F + B), "
        "the bubble when every tick lasts as long as its slowest device (jaxmp's executor), and the largest "
        "stash (zb-v's and dualpipev's in chunks, each half a stage's layers). `--remat stage` (the default) "
        "stashes matmul outputs only, so the "
        "fixed part (gradient sums, optimizer update, one chunk's workspace) dominates; `--remat none` "
        "stashes every residual, where the stash counts show most.\n\n" + table(head, rows) + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("width", 512), ("hidden", 2048), ("depth", 8), ("batch", 1024), ("features", 784)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--parts", default="a,b")
    p.add_argument("--remats", default="stage,none", help="part b: one table block per --remat mode")
    p.add_argument("--torch-python", help="a Python with torch installed: adds the peer's column")
    p.add_argument("--out", help="write schedules_step.md and schedules_memory.md into this folder")
    args = p.parse_args()
    from jaxmp.parallel.mesh import simulate_cpu_devices

    simulate_cpu_devices(args.stages)
    reports = {}
    if "a" in args.parts:
        peer = torch_times(args)  # first: its processes must not compete with jaxmp's threads
        reports["schedules_step.md"] = time_report(args, step_times(args), peer)
    if "b" in args.parts:
        reports["schedules_memory.md"] = memory_report(args, memory_rows(args))
    for name, text in reports.items():
        print(text)
        if args.out:
            Path(args.out, name).write_text(text)


if __name__ == "__main__":
    main()
