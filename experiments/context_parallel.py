"""Context parallelism on simulated CPU devices: memory, traffic, balance and speed of each strategy.

- Memory: XLA's ``memory_analysis`` temporaries of the compiled train step, per device, for a one-layer
  ``gpt`` at a long sequence, C in {1, 2, 4, 8}; and the longest sequence (a power of two) whose step
  fits a fixed budget of temporaries per device. Static: nothing runs.
- Traffic: the ``context`` collectives read off the compiled program against the closed forms of
  :mod:`jaxmp.inspection.closed_forms` (measured / predicted).
- Balance: each device's useful causal attention work (unmasked query-key pairs,
  :func:`jaxmp.parallel.context.useful_pairs`), slowest over mean, with and without head-tail order.
- Speed: the median train-step time of ``ring`` and ``all-gather`` at the same C, in one run.

Run (about five minutes on 2 CPU cores)::

    .venv/bin/python experiments/context_parallel.py --out experiments/results
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

MiB = 2**20
STRATEGIES = ("all-gather", "ring", "ulysses")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096, help="the long sequence of the memory table")
    parser.add_argument("--budget-mib", type=float, default=64.0, help="temporaries per device, longest-sequence table")
    parser.add_argument("--speed-seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="folder for context_parallel.md")
    return parser.parse_args()


def config(seq: int, parts: int, strategy: str, **overrides):
    from jaxmp.config import Config

    options = dict(model="gpt", width=64, hidden=128, heads=8, depth=1, batch_size=1, optimizer="sgd", lr=0.01)
    return Config().replace(**{**options, **overrides}, mesh=f"context={parts}", context_strategy=strategy), seq


def program(cfg, seq: int):
    import jax
    import jax.numpy as jnp

    from jaxmp.parallel.mesh import mesh_from_spec
    from jaxmp.training.step import build_program

    mesh = mesh_from_spec(cfg.run.mesh, jax.devices())
    return build_program(cfg, mesh, (seq,), 64, input_dtype=jnp.int32, label_shape=(seq,))


def temp_bytes(cfg, seq: int) -> int:
    from jaxmp.inspection.compiled import memory_and_flops

    return memory_and_flops(program(cfg, seq).train_step.compiled).temp_bytes


def memory_table(args) -> list[str]:
    lines = [
        f"### Temporaries per device of the train step, T = {args.seq} (one layer, width 64, 8 heads, batch 1)",
        "",
        "| C | " + " | ".join(STRATEGIES) + " |",
        "|---:|" + "---:|" * len(STRATEGIES),
    ]
    base = None
    for parts in (1, 2, 4, 8):
        cells = []
        for strategy in STRATEGIES:
            mib = temp_bytes(*config(args.seq, parts, strategy)) / MiB
            base = base or mib
            cells.append(f"{mib:,.1f} MiB ({mib / base:.2f})")
        lines.append(f"| {parts} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return [*lines, "", "In brackets: over C = 1 (one device, the whole sequence).", ""]


def longest_table(args) -> list[str]:
    budget = args.budget_mib * MiB
    lines = [
        f"### Longest sequence whose step's temporaries fit {args.budget_mib:g} MiB per device",
        "",
        "| C | " + " | ".join(STRATEGIES) + " |",
        "|---:|" + "---:|" * len(STRATEGIES),
    ]
    for parts in (1, 2, 4, 8):
        cells = []
        for strategy in STRATEGIES:
            best, seq = 0, 512
            while seq <= 32768 and temp_bytes(*config(seq, parts, strategy)) <= budget:
                best, seq = seq, seq * 2
            cells.append(f"{best:,}" if best else "< 512")
        lines.append(f"| {parts} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return [*lines, ""]


def traffic_table() -> list[str]:
    from jaxmp.inspection.step_report import analyze_program

    lines = [
        "### Elements moved over context per step, measured / closed form (T = 256, C = 4, 2 layers)",
        "",
        "| strategy | collective | measured | closed form | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for strategy in STRATEGIES:
        cfg, seq = config(256, 4, strategy, depth=2, batch_size=2)
        for row in analyze_program(cfg, program(cfg, seq)).rows:
            if row.axes == ("context",) and row.predicted:
                lines.append(
                    f"| {strategy} | {row.kind} | {row.measured:,} | {row.predicted:,} | "
                    f"{row.measured / row.predicted:.2f} |"
                )
    return [*lines, "", "The all-reduces hold the weight gradients too (summed over context once per step).", ""]


def balance_table() -> list[str]:
    import numpy as np

    from jaxmp.parallel.context import head_tail_order, ring_work, useful_pairs

    seq = 4096
    lines = [
        f"### Attention work per device, slowest / mean, T = {seq}",
        "",
        "Useful: the unmasked query-key pairs of each device's queries. Ring: the pairs its ring computes "
        "(it skips the pairs of halves no query sees; all-gather and ulysses compute every pair of their "
        "queries' rows, the same on every device).",
        "",
        "| C | useful, contiguous | useful, head-tail | ring, contiguous | ring, head-tail |",
        "|---:|---:|---:|---:|---:|",
    ]
    for parts in (2, 4, 8):
        ratios = []
        for measure in (useful_pairs, ring_work):
            for order in (np.arange(seq), head_tail_order(seq, parts)):
                work = measure(order.reshape(parts, -1))
                ratios.append(f"{work.max() / work.mean():.3f}")
        lines.append(f"| {parts} | " + " | ".join(ratios) + " |")
    return [*lines, ""]


def step_seconds(cfg, seq: int, steps: int) -> float:
    import numpy as np

    prog = program(cfg, seq)
    state = prog.init()
    x = np.random.default_rng(0).integers(0, 64, (cfg.run.batch_size, seq)).astype(np.int32)
    batch = prog.put_batch(x, np.roll(x, -1, axis=1))
    state, metrics = prog.train_step(state, *batch)  # compile and warm up
    metrics["loss"].block_until_ready()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = prog.train_step(state, *batch)
        metrics["loss"].block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def speed_table(args) -> list[str]:
    lines = [
        f"### Train step, T = {args.speed_seq}, C = 4 "
        f"(median of {args.steps}; {os.cpu_count()} CPU cores for 8 simulated devices)",
        "",
        "| strategy | step | over all-gather |",
        "|---|---:|---:|",
    ]
    seconds = {s: step_seconds(*config(args.speed_seq, 4, s, depth=2), args.steps) for s in STRATEGIES}
    for strategy, t in seconds.items():
        lines.append(f"| {strategy} | {t * 1e3:,.1f} ms | {t / seconds['all-gather']:.2f} |")
    return [*lines, ""]


def main() -> None:
    args = parse_args()
    import jaxmp

    jaxmp.simulate_cpu_devices(8)
    import jax

    sections = [
        "# Context parallelism on simulated CPU devices",
        "",
        f"`python experiments/context_parallel.py` on {jax.device_count()} simulated CPU devices "
        f"(jax {jax.__version__}).",
        "",
    ]
    sections += balance_table()
    sections += traffic_table()
    sections += memory_table(args)
    sections += longest_table(args)
    sections += speed_table(args)
    text = "\n".join(sections)
    print(text)
    if args.out:
        Path(args.out, "context_parallel.md").write_text(text)


if __name__ == "__main__":
    main()
