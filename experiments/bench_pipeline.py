"""Pipeline benchmarks: step-time overhead of the executor, compile-time flatness, memory and traffic.

Shapes: B = global batch, M = micro-batches, b = B/M micro-batch, S = stages (the ``pipe`` axis),
R = circular repeats, T = 2*(M*R + S - 1) ticks (forward and backward phases), D/H = residual/hidden
width of the ``mlp`` model.

Three measurements, each a ratio (or a table) taken inside one run, so machine drift cancels:

a. **Overhead** (one device, ``pipe=1``): the jaxmp train step with ``M`` micro-batches and default
   flags (the pipelined executor with ``S=1`` and the default 1F1B table: each forward runs its own
   backward, so the loop is ``M`` ticks of one ``jax.vjp``, no switch) against the plain jaxmp step
   (``M=1``) and
   against a hand-written baseline that unrolls a Python loop over the ``M`` micro-batches inside one
   ``jit``, takes ``jax.value_and_grad`` of each (same model, via ``nnx.merge``) and sums the gradients.
   pipelined/loop is the price of our loop; loop/plain is the price of micro-batching itself. Variants
   run in interleaved rounds (A, B, C, A, B, C, ...); the median round gives each step time. The first
   losses must agree (rtol 1e-5) before anything is timed. Static HLO op counts of each compiled step
   say where extra work comes from (one appearance per op; ops inside loops run once per iteration).
b. **Compile-time flatness** (simulated ``pipe=4`` mesh): wall time of lowering + compiling the train
   step (first access of ``Program.train_step.compiled``) for M=32 vs M=4 and for depth 32 vs depth 4.
   The scan over ticks and the scan over layers should make both ratios close to 1 (target <= 1.5).
c. **Memory and pipeline traffic** (``pipe`` = 1, 2, 4, 8 of the simulated CPU devices, ``data=tensor=1``,
   so per-device numbers change only with the pipeline split): per-device argument and temp bytes of
   the compiled train step (XLA's ``memory_analysis``) for ``remat`` none/stage/full, and the bytes the
   collective-permutes over ``pipe`` move per step (``total_elements`` applies loop trip counts) against
   ``T * b*D*itemsize``: one micro-batch activation per tick of the forward phase and one cotangent per
   tick of the backward phase.

Run (defaults: a few minutes on 2 CPU cores, most of it in part a)::

    .venv/bin/python experiments/bench_pipeline.py --out experiments/results
    .venv/bin/python experiments/bench_pipeline.py --parts a --batch 256 --rounds 3   # quick look
    .venv/bin/python experiments/bench_pipeline.py --parts a --remats stage,none,full  # all remat modes
    .venv/bin/python experiments/bench_pipeline.py --parts a --remats stage,stage+unroll --cpu-devices 0  # GPU
    .venv/bin/python experiments/bench_pipeline.py --parts b,c --cpu-devices 8

``--out DIR`` writes ``pipeline_overhead.md``, ``pipeline_compile.md`` and ``pipeline_memory.md``.
Absolute times on simulated CPU devices say nothing about accelerators; the ratios and the byte counts
are the point.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_step import loss_rtol  # the same loss check as the step benchmark
from flax import nnx

from jaxmp.config import Config
from jaxmp.inspection.collectives import collectives
from jaxmp.inspection.compiled import memory_and_flops
from jaxmp.models.contract import apply_model, model_parts
from jaxmp.models.layers import LayerContext
from jaxmp.parallel.mesh import MeshShape, build_mesh, simulate_cpu_devices
from jaxmp.pipeline import gpipe
from jaxmp.training.step import Program, build_program, cross_entropy, make_optimizer

HLO_OPS = ("dot", "copy", "transpose", "dynamic-slice", "dynamic-update-slice", "while", "fusion")
MiB = 2**20


def base_config(args: argparse.Namespace, **overrides) -> Config:
    fields = dict(model="mlp", width=args.width, hidden=args.hidden, depth=args.depth, batch_size=args.batch)
    fields.update(optimizer="adam", lr=1e-3, dtype=args.dtype)
    return Config().replace(**{**fields, **overrides})


def random_batch(program: Program, batch: int, features: int, classes: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, features), dtype=np.float32)
    return program.put_batch(x, rng.integers(0, classes, batch, dtype=np.int32))


def hlo_op_counts(hlo_text: str) -> dict[str, int]:
    """How often each op of ``HLO_OPS`` appears in the optimised HLO (fused computations included)."""
    return {op: len(re.findall(rf"[\s}}]{re.escape(op)}\(", hlo_text)) for op in HLO_OPS}


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


# --- a. overhead of the pipelined executor on one device -------------------------------------------


def make_loop_step(program: Program, cfg: Config, microbatches: int) -> Callable:
    """The hand-written baseline: ``M`` unrolled ``value_and_grad`` calls, gradients summed, adam."""
    tx = make_optimizer(cfg.optim)

    def loss_fn(params, x_bxF, y_b):
        parts = model_parts(nnx.merge(program.graphdef, params))
        return cross_entropy(apply_model(parts, params, x_bxF, LayerContext()), y_b).mean() / microbatches

    def step(state, x_BxF, y_B):
        params, opt_state = state
        x_MxbxF = x_BxF.reshape(microbatches, -1, *x_BxF.shape[1:])
        y_Mxb = y_B.reshape(microbatches, -1)
        loss, grads = 0.0, None
        for m in range(microbatches):
            loss_m, grads_m = jax.value_and_grad(loss_fn)(params, x_MxbxF[m], y_Mxb[m])
            loss = loss + loss_m
            grads = grads_m if grads is None else jax.tree.map(jnp.add, grads, grads_m)
        with jax.numpy_dtype_promotion("standard"):  # as jaxmp.training.step: optax promotes implicitly
            updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    return step, tx


class Variant:
    """A compiled ``step(state, x, y) -> (state, metrics)`` with its state and its timed rounds."""

    def __init__(self, name: str, compiled: jax.stages.Compiled, state: Any):
        self.name, self.compiled, self.state = name, compiled, state
        self.round_s: list[float] = []

    def run(self, x: jax.Array, y: jax.Array, steps: int) -> float:
        """Run ``steps`` steps, block, return the last loss; time the round."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, x, y)
        loss = float(jax.block_until_ready(metrics)["loss"])
        self.round_s.append(time.perf_counter() - start)
        return loss

    def step_ms(self, steps: int) -> float:
        return 1e3 * statistics.median(self.round_s) / steps


def overhead_variants(args: argparse.Namespace) -> tuple[list[Variant], tuple[jax.Array, jax.Array]]:
    """Compile plain, pipelined (one per remat) and loop steps on one device."""
    mesh = build_mesh(MeshShape(), jax.devices()[:1])
    cfg = base_config(args)
    plain = build_program(cfg, mesh, (args.features,), args.classes)
    batch = random_batch(plain, args.batch, args.features, args.classes)
    variants = [Variant("plain jaxmp (M=1)", plain.train_step.compiled, plain.init())]
    for variant in args.remats.split(","):
        remat, _, extra = variant.partition("+")
        piped_cfg = cfg.replace(microbatches=args.microbatches, remat=remat, unroll=extra == "unroll")
        piped = build_program(piped_cfg, mesh, (args.features,), args.classes)
        name = f"pipelined jaxmp (M={args.microbatches}, S=1, remat {variant})"
        variants.append(Variant(name, piped.train_step.compiled, piped.init()))
    step, tx = make_loop_step(plain, cfg, args.microbatches)
    params = jax.tree.map(jnp.copy, plain.init().params)  # own buffers: every state is donated
    state = (params, tx.init(params))
    compiled = jax.jit(step, donate_argnums=0).lower(state, *batch).compile()
    variants.append(Variant(f"hand loop over M={args.microbatches} (one jit)", compiled, state))
    return variants, batch


def measure_overhead(args: argparse.Namespace) -> str:
    variants, batch = overhead_variants(args)
    first = [v.run(*batch, 1) for v in variants]  # warm-up round, and the equivalence check
    for v, loss in zip(variants, first, strict=True):
        if abs(loss - first[0]) > loss_rtol(args.dtype) * abs(first[0]):
            raise SystemExit(f"{v.name}: first loss {loss!r} != plain {first[0]!r}; no ratio reported.")
        v.round_s.clear()
    for _ in range(args.rounds):
        for v in variants:
            v.run(*batch, args.steps_per_round)
    return overhead_report(args, variants)


def overhead_report(args: argparse.Namespace, variants: list[Variant]) -> str:
    plain_ms, loop_ms = variants[0].step_ms(args.steps_per_round), variants[-1].step_ms(args.steps_per_round)
    rows = []
    for v in variants:
        ms = v.step_ms(args.steps_per_round)
        per_step = [1e3 * t / args.steps_per_round for t in v.round_s]
        memory = memory_and_flops(v.compiled)
        rows.append(
            [v.name, f"{ms:.1f}", f"{min(per_step):.1f}", f"{ms / plain_ms:.2f}", f"{ms / loop_ms:.2f}"]
            + [f"{(memory.temp_bytes or 0) / MiB:.0f}"]
            + list(hlo_op_counts(v.compiled.as_text()).values())
        )
    header = ["variant", "median ms", "min ms", "/ plain", "/ loop", "temp MiB", *HLO_OPS]
    piped = list(zip(args.remats.split(","), variants[1:-1], strict=True))
    lines = [
        f"### a. Pipelining overhead on one device ({jax.devices()[0].device_kind})",
        "",
        f"mlp width {args.width}, hidden {args.hidden}, depth {args.depth}, batch {args.batch} "
        f"({args.batch // args.microbatches} per micro-batch), {args.features} features, adam, {args.dtype}; "
        f"{args.rounds} interleaved rounds x {args.steps_per_round} step(s); "
        f"first losses agree (rtol {loss_rtol(args.dtype)}). "
        "Op columns: static appearances in the optimised HLO.",
        "",
        *markdown_table(header, rows),
        "",
        "pipelined/plain (target <= 1.2): "
        + ", ".join(f"remat {remat} **{v.step_ms(args.steps_per_round) / plain_ms:.2f}**" for remat, v in piped)
        + f"; loop/plain = {loop_ms / plain_ms:.2f} (the cost of micro-batching itself).",
    ]
    return "\n".join(lines) + "\n"


# --- b. compile time ------------------------------------------------------------------------------


def compile_seconds(cfg: Config, mesh: jax.sharding.Mesh, args: argparse.Namespace) -> float:
    """Best of ``--compile-repeats`` fresh lower + compile of the train step."""
    best = float("inf")
    for _ in range(args.compile_repeats):
        program = build_program(cfg, mesh, (args.features,), args.classes)
        start = time.perf_counter()
        program.train_step.compiled  # noqa: B018 - lowers and compiles on first access
        best = min(best, time.perf_counter() - start)
    return best


def measure_compile(args: argparse.Namespace) -> str:
    mesh = build_mesh(MeshShape(pipe=4))
    small = dict(width=args.small_width, hidden=args.small_hidden, batch_size=args.small_batch)
    compile_seconds(base_config(args, **small, depth=4, microbatches=4), mesh, args)  # warm JAX's own caches
    sweeps = [("micro-batches M (depth 8)", "microbatches", (4, 32), dict(depth=8))]
    sweeps.append(("depth (M=4)", "depth", (4, 32), dict(microbatches=4)))
    rows = []
    for label, field, (low, high), fixed in sweeps:
        seconds = [compile_seconds(base_config(args, **small, **fixed, **{field: v}), mesh, args) for v in (low, high)]
        rows.append([label, low, f"{seconds[0]:.2f}", high, f"{seconds[1]:.2f}", f"**{seconds[1] / seconds[0]:.2f}**"])
    lines = [
        "### b. Compile time of the train step on a simulated pipe=4 mesh",
        "",
        f"mlp width {args.small_width}, hidden {args.small_hidden}, batch {args.small_batch}, adam; "
        f"lower + compile, best of {args.compile_repeats}. Target: ratio <= 1.5.",
        "",
        *markdown_table(["sweep", "small", "seconds", "large", "seconds", "large / small"], rows),
    ]
    return "\n".join(lines) + "\n"


# --- c. memory and collective-permute traffic -----------------------------------------------------


def pipe_traffic(program: Program) -> tuple[int, int, int]:
    """(collective-permute bytes, collective-permute executions, bytes of every other collective) over
    ``pipe`` in one train step (per device, loop trip counts applied)."""
    colls = [c for c in collectives(program.train_step.compiled.as_text(), program.mesh) if "pipe" in c.axes]
    permutes = [c for c in colls if c.kind == "collective-permute" and c.axes == ("pipe",)]
    others = [c for c in colls if c not in permutes]

    def total_bytes(group):
        return sum(c.total_elements * np.dtype(c.dtype).itemsize for c in group)

    return total_bytes(permutes), sum(c.count for c in permutes), total_bytes(others)


def memory_row(args: argparse.Namespace, pipe: int, remat: str, repeats: int) -> list[Any]:
    cfg = base_config(args, depth=args.mem_depth, batch_size=args.mem_batch, width=args.mem_width)
    cfg = cfg.replace(hidden=args.mem_hidden, microbatches=args.microbatches, remat=remat, repeats=repeats)
    program = build_program(cfg, build_mesh(MeshShape(pipe=pipe)), (args.features,), args.classes)
    memory = memory_and_flops(program.train_step.compiled)
    moved, count, other = pipe_traffic(program)
    ticks = gpipe(pipe, args.microbatches, repeats).ticks
    act_bytes = args.mem_batch // args.microbatches * args.mem_width * 4
    formula = ticks * act_bytes if pipe > 1 else 0
    ratio = f"{moved / formula:.2f}" if formula else "-"
    return [
        pipe,
        repeats,
        remat,
        f"{memory.argument_bytes / MiB:.1f}",
        f"{memory.temp_bytes / MiB:.1f}",
        count,
        f"{moved / MiB:.3f}",
        f"{formula / MiB:.3f}",
        ratio,
        f"{other / MiB:.3f}",
    ]


def measure_memory(args: argparse.Namespace) -> str:
    pipes = [p for p in (1, 2, 4, 8) if p <= jax.device_count()]
    rows = [memory_row(args, pipe, remat, 1) for pipe in pipes for remat in ("stage", "none", "full")]
    rows += [memory_row(args, pipe, "stage", 2) for pipe in pipes if pipe > 1 and args.mem_depth % (2 * pipe) == 0]
    header = ["pipe", "R", "remat", "argument MiB", "temp MiB", "permutes/step", "permute MiB", "formula MiB"]
    b = args.mem_batch // args.microbatches
    lines = [
        "### c. Per-device memory and pipeline traffic of the train step",
        "",
        f"mlp width {args.mem_width}, hidden {args.mem_hidden}, depth {args.mem_depth}, batch {args.mem_batch}, "
        f"M={args.microbatches} (b={b}), adam, f32; mesh data=1, tensor=1, pipe=P on P of the "
        f"{jax.device_count()} simulated CPU devices. Formula: T*b*D*4 bytes with T = 2*(M*R+S-1) ticks "
        "(one activation per tick of the forward phase, one cotangent per tick of the backward phase). "
        "Last column: every other collective over pipe "
        "(all-reduce, all-gather, all-to-all), per step.",
        "",
        *markdown_table([*header, "measured / formula", "other pipe collectives MiB"], rows),
    ]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="a,b,c", help="which measurements to run: any of a,b,c")
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=8,
        help="simulated CPU devices (b needs 4, c up to 8); 0: the real devices",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (part a)")
    p.add_argument("--out", help="write the Markdown tables into this folder")
    a = p.add_argument_group("a: overhead on one device")
    a.add_argument("--width", type=int, default=512)
    a.add_argument("--hidden", type=int, default=2048)
    a.add_argument("--depth", type=int, default=8)
    a.add_argument("--batch", type=int, default=1024)
    a.add_argument("--microbatches", type=int, default=8, help="M (parts a and c)")
    a.add_argument(
        "--remats",
        default="stage,none",
        help="comma-separated remat modes of the pipelined variants; MODE+unroll also unrolls the loops",
    )
    a.add_argument("--features", type=int, default=784)
    a.add_argument("--classes", type=int, default=10)
    a.add_argument("--rounds", type=int, default=7)
    a.add_argument("--steps-per-round", type=int, default=1)
    b = p.add_argument_group("b: compile time")
    b.add_argument("--small-width", type=int, default=64)
    b.add_argument("--small-hidden", type=int, default=256)
    b.add_argument("--small-batch", type=int, default=64)
    b.add_argument("--compile-repeats", type=int, default=2)
    c = p.add_argument_group("c: memory")
    c.add_argument("--mem-width", type=int, default=256)
    c.add_argument("--mem-hidden", type=int, default=1024)
    c.add_argument("--mem-depth", type=int, default=8)
    c.add_argument("--mem-batch", type=int, default=256)
    return p.parse_args(argv)


PARTS = {
    "a": ("pipeline_overhead.md", measure_overhead),
    "b": ("pipeline_compile.md", measure_compile),
    "c": ("pipeline_memory.md", measure_memory),
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cpu_devices:
        simulate_cpu_devices(args.cpu_devices)
    parts = [part.strip() for part in args.parts.split(",")]
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"--parts {args.parts!r}: unknown part(s) {sorted(unknown)}; choose from a, b, c.")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        filename, measure = PARTS[part]
        start = time.perf_counter()
        text = measure(args)
        print(text + f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)
        if out:
            (out / filename).write_text(text)


if __name__ == "__main__":
    main()
