"""The gpt preset's train step against a hand-written one, and pipelined against plain, in one run.

Model: ``gpt`` width 128, MLP hidden 512, 4 heads, depth 8, 64 tokens per window, batch 32, a
vocabulary of 96 (synthetic ids), Adam, float32 (defaults). Two tables:

a. **Overhead of jaxmp on one device**: jaxmp's compiled train step (``build_program``, one device)
   over a hand-written ``jax.jit`` + optax step of the same transformer (the same NNX modules called
   in order, optax's cross-entropy, ``optax.adam``): the price of the library's step itself.
b. **Pipeline**: ``pipe=4`` on 4 simulated CPU devices, M=8 micro-batches, 1F1B (and the other
   schedules with ``--schedules``), over jaxmp's plain one-device step, in the same process (the same
   threads), with tokens per second.
c. **The peer**, with ``--torch-python``: torch.distributed.pipelining's corresponding schedule on the
   same transformer written in PyTorch (``torch_pipeline_peer.py --model gpt``: 4 gloo ranks, the
   machine's threads split among them) over torch's own plain step, after jaxmp's rounds on the same
   machine. PyTorch is an optional benchmark dependency, never one of jaxmp's: ``python3 -m venv
   /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy``.

Rounds interleave the variants; each variant's figure is its median round. The first losses of all
variants are checked equal (same parameters, same batch) before anything is timed.

Run (a few minutes on 2 CPU cores)::

    .venv/bin/python experiments/bench_lm.py --torch-python /tmp/torchenv/bin/python --out experiments/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from bench_schedules import PEERS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in dict(width=128, hidden=512, heads=4, depth=8, seq=64, batch=32, vocab=96).items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--schedules", default="1f1b")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--torch-python", help="a Python with torch installed: adds the peer's table")
    parser.add_argument("--out", default=None, help="folder for lm_step.md and lm_step.json")
    return parser.parse_args()


def config(args, **overrides):
    from jaxmp.config import Config

    fields = dict(model="gpt", width=args.width, hidden=args.hidden, heads=args.heads, depth=args.depth)
    fields.update(batch_size=args.batch, optimizer="adam", lr=1e-3)
    return Config().replace(**{**fields, **overrides})


def batch(args):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def jaxmp_step(args, device_mesh, **overrides):
    """``(step, state, x, y)`` of jaxmp's compiled train step on ``device_mesh``."""
    import jax.numpy as jnp

    from jaxmp.training.step import build_program

    program = build_program(
        config(args, **overrides), device_mesh, (args.seq,), args.vocab, input_dtype=jnp.int32, label_shape=(args.seq,)
    )
    program.train_step.compiled  # noqa: B018
    return program.train_step, program.init(), *program.put_batch(*batch(args))


def hand_written_step(args, device):
    """The same transformer trained by a plain ``jax.jit`` + optax step, as a JAX user writes one."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxmp.models.gpt import GPT
    from jaxmp.models.layers import LayerContext

    with nnx.use_eager_sharding(False):
        model = GPT(
            args.vocab,
            args.seq,
            width=args.width,
            hidden=args.hidden,
            heads=args.heads,
            depth=args.depth,
            rngs=nnx.Rngs(params=0),
        )
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-3)

    def loss_fn(params, x, y):
        model = nnx.merge(graphdef, params)
        ctx = LayerContext()
        logits = model.post(model.layers[0](model.pre(x, ctx), ctx), ctx)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

    state = jax.device_put((params, tx.init(params)), device)
    x, y = (jax.device_put(jnp.asarray(a), device) for a in batch(args))
    return step, state, x, y


def first_loss(variant):
    """The first step's loss, and the variant with its state carried on (jaxmp donates the state)."""
    step, state, x, y = variant
    state, metrics = step(state, x, y)
    return float(metrics["loss"]), (step, state, x, y)


def timed_round(variant, steps: int):
    """Seconds per step over ``steps`` steps (the state carried on), and the new state."""
    step, state, x, y = variant
    state, metrics = step(state, x, y)  # warm: the first call after a pause pays for page faults
    float(metrics["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, x, y)
    float(metrics["loss"])
    return (time.perf_counter() - start) / steps, (step, state, x, y)


def measure(args) -> dict[str, float]:
    import jax

    from jaxmp.parallel.mesh import MeshShape, build_mesh

    one = jax.devices()[:1]
    variants = {
        "hand-written jit + optax": hand_written_step(args, one[0]),
        "jaxmp plain": jaxmp_step(args, build_mesh(MeshShape(), one)),
    }
    pipe = build_mesh(MeshShape(pipe=args.stages), jax.devices()[: args.stages])
    for schedule in args.schedules.split(","):
        variants[f"jaxmp pipe={args.stages} {schedule}"] = jaxmp_step(
            args, pipe, mesh=f"pipe={args.stages}", microbatches=args.microbatches, schedule=schedule
        )
    losses = {}
    for name in variants:
        losses[name], variants[name] = first_loss(variants[name])
    reference = losses["jaxmp plain"]
    assert all(abs(loss - reference) < 1e-4 * abs(reference) for loss in losses.values()), losses
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            seconds, variants[name] = timed_round(variants[name], args.steps)
            times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def torch_times(args) -> dict[str, float] | None:
    """torch's plain step and its schedules' steps on the same transformer (median seconds), or None."""
    if not args.torch_python:
        return None
    script = Path(__file__).with_name("torch_pipeline_peer.py")
    flags = ["--model", "gpt", "--width", args.width, "--hidden", args.hidden, "--heads", args.heads]
    flags += ["--depth", args.depth, "--seq", args.seq, "--batch", args.batch, "--classes", args.vocab]
    flags += ["--ranks", args.stages, "--microbatches", args.microbatches, "--threads", os.cpu_count()]
    flags += ["--steps", args.rounds * args.steps, "--schedules", ",".join(PEERS[s] for s in args.schedules.split(","))]
    out = subprocess.run([args.torch_python, str(script), *map(str, flags)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peer_report(args, medians: dict[str, float], peer: dict[str, float]) -> str:
    lines = [
        f"torch.distributed.pipelining on the same transformer ({args.stages} gloo ranks, {os.cpu_count()} threads "
        f"in all), torch plain step {1e3 * peer['plain']:.1f} ms against jaxmp plain "
        f"{1e3 * medians['jaxmp plain']:.1f} ms:",
        "",
        "| schedule | jaxmp ms | / jaxmp plain | torch schedule | torch ms | / torch plain |",
        "|---|---|---|---|---|---|",
    ]
    for schedule in args.schedules.split(","):
        ours, theirs = medians[f"jaxmp pipe={args.stages} {schedule}"], peer[PEERS[schedule]]
        lines.append(
            f"| {schedule} | {1e3 * ours:.1f} | {ours / medians['jaxmp plain']:.3f} | {PEERS[schedule]} "
            f"| {1e3 * theirs:.1f} | {theirs / peer['plain']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def report(args, medians: dict[str, float]) -> str:
    plain, hand = medians["jaxmp plain"], medians["hand-written jit + optax"]
    tokens = args.batch * args.seq
    lines = [
        f"gpt width {args.width}, hidden {args.hidden}, heads {args.heads}, depth {args.depth}, "
        f"{args.seq} tokens x batch {args.batch}, vocabulary {args.vocab}, adam, float32; "
        f"{os.cpu_count()} CPU cores; median of {args.rounds} rounds of {args.steps} steps.",
        "",
        "| step | ms | / jaxmp plain | / hand-written | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for name, seconds in medians.items():
        row = (
            f"| {name} | {1e3 * seconds:.1f} | {seconds / plain:.3f} | {seconds / hand:.3f} | {tokens / seconds:,.0f} |"
        )
        lines.append(row)
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    from jaxmp.parallel.mesh import simulate_cpu_devices

    simulate_cpu_devices(args.stages)
    medians = measure(args)
    peer = torch_times(args)
    text = report(args, medians) + ("\n" + peer_report(args, medians, peer) if peer else "")
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lm_step.md").write_text(text)
        record = {"args": vars(args), "median_s": medians, "torch_median_s": peer}
        (out / "lm_step.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
