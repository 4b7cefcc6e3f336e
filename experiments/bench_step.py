"""Time the jaxmp train step against a hand-written plain JAX + optax step for the same model.

What it measures: the wall time of one training step (forward, backward, optimizer update) of
``jaxmp.training.step.build_program(...).train_step`` on a one-device mesh, next to a twin written with pure
``jnp`` functions over a params dict (no Flax) and ``jax.jit(..., donate_argnums=0)``: same
architecture, shapes, initial parameters, optimizer (``optax.adam``), loss (mean softmax
cross-entropy over integer labels) and device batches. The ratio jaxmp/plain is the price of the
framework (NNX pytrees, sharding annotations, the step counter and dropout key); the target is <= 1.05.

Why a ratio measured in one run: absolute step times drift with machine load, CPU frequency and the
other processes on a shared box, so two separate runs are not comparable to a few percent. Both
variants are compiled first, then timed in interleaved rounds (A, B, A, B, ...) of ``--steps-per-round``
steps each, blocking only at the end of a round; the median round of each variant gives its step time,
so drift hits both alike and cancels in the ratio. The median of the per-round ratios (each jaxmp round
over the plain round right after it) is printed as a second, load-robust estimate.

Before timing, the jaxmp initial parameters are copied into the plain params dict and the first few
losses of both steps are compared (relative tolerance 1e-5); if they differ, no ratio is reported.

Run (defaults take well under a minute on 2 CPU cores)::

    .venv/bin/python experiments/bench_step.py
    .venv/bin/python experiments/bench_step.py --width 64 --hidden 256 --depth 2 --batch-size 64 \\
        --steps-per-round 50        # tiny model: per-step dispatch overhead dominates
    .venv/bin/python experiments/bench_step.py --model mlp-1024 --out /tmp/bench_step.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmp.config import Config
from jaxmp.parallel.mesh import MeshShape, build_mesh
from jaxmp.training.step import Program, build_program

Params = dict[str, Any]
PlainState = tuple[Params, optax.OptState]
Batches = list[tuple[jax.Array, jax.Array]]

LN_EPSILON = 1e-6  # nnx.LayerNorm's default
MLP1024_WIDTHS = (1024, 512, 256, 128)
CHECK_STEPS = 3


def loss_rtol(dtype: str) -> float:
    """1e-5 for float32 on CPU; looser where the arithmetic itself is rounded (bfloat16, or the TF32
    matmuls that GPUs use for float32 by default), since two correct programs then round differently."""
    return 1e-5 if dtype == "float32" and jax.default_backend() == "cpu" else 2e-2


# --- the plain twin: pure jnp over a params dict ------------------------------------------------


def dense(p: Params, x: jax.Array, dtype=jnp.float32) -> jax.Array:
    """As ``nnx.Linear(dtype=...)``: inputs and float32 weights cast to the compute dtype."""
    return x.astype(dtype) @ p["kernel"].astype(dtype) + p["bias"].astype(dtype)


def layer_norm(p: Params, x_BxD: jax.Array, dtype=jnp.float32) -> jax.Array:
    """LayerNorm over the last axis, computed as nnx.LayerNorm does (one-pass float32 statistics, clipped)."""
    x32_BxD = x_BxD.astype(jnp.float32)
    mean = x32_BxD.mean(-1, keepdims=True)
    var = jnp.maximum(0.0, (x32_BxD * x32_BxD).mean(-1, keepdims=True) - mean * mean)
    return ((x32_BxD - mean) * (jax.lax.rsqrt(var + LN_EPSILON) * p["scale"]) + p["bias"]).astype(dtype)


def residual_block(block: Params, x_BxD: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Pre-norm residual block ``x + down(gelu(up(norm(x))))``."""
    h_BxH = jax.nn.gelu(dense(block["up"], layer_norm(block["norm"], x_BxD, dtype), dtype))
    return x_BxD + dense(block["down"], h_BxH, dtype)


def mlp_forward(params: Params, x: jax.Array, loop: str = "scan", dtype=jnp.float32) -> jax.Array:
    """embed -> residual blocks -> head.

    ``params["blocks"]`` is either a list of blocks (a Python loop) or one block whose arrays carry a
    leading ``depth`` axis (as jaxmp stacks them), applied by ``lax.scan`` or, with ``loop="unroll"``,
    by a Python loop over slices.
    """
    x_BxD = dense(params["embed"], x.reshape(x.shape[0], -1), dtype)
    blocks = params["blocks"]
    if isinstance(blocks, list):
        for block in blocks:
            x_BxD = residual_block(block, x_BxD, dtype)
    elif loop == "scan":
        x_BxD = jax.lax.scan(lambda h, block: (residual_block(block, h, dtype), None), x_BxD, blocks)[0]
    else:
        for i in range(jax.tree.leaves(blocks)[0].shape[0]):
            x_BxD = residual_block(jax.tree.map(lambda a, i=i: a[i], blocks), x_BxD, dtype)
    return dense(params["head"], x_BxD, dtype)


def mlp1024_forward(params: Params, x: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Zero-pad to 1024 features, then 1024 -> 512 -> 256 -> 128 -> classes with ReLU between."""
    x_BxF = x.reshape(x.shape[0], -1)
    x_BxF = jnp.pad(x_BxF, ((0, 0), (0, MLP1024_WIDTHS[0] - x_BxF.shape[-1])))
    for i, layer in enumerate(params["layers"]):
        x_BxF = dense(layer, x_BxF, dtype)
        if i < len(params["layers"]) - 1:
            x_BxF = jax.nn.relu(x_BxF)
    return x_BxF


MODELS = ("mlp", "mlp-1024")


def plain_forward(args: argparse.Namespace) -> Callable[[Params, jax.Array], jax.Array]:
    dtype = jnp.dtype(args.dtype)
    if args.model == "mlp-1024":
        return lambda params, x: mlp1024_forward(params, x, dtype)
    return lambda params, x: mlp_forward(params, x, args.plain_loop, dtype)


def _dense_shapes(fan_in: int, fan_out: int) -> Params:
    return {"kernel": (fan_in, fan_out), "bias": (fan_out,)}


def plain_shapes(args: argparse.Namespace, stacked: bool) -> Params:
    """The parameter shapes of the plain twin, written out independently of the Flax model.

    ``stacked``: mlp blocks as one block with a leading ``depth`` axis rather than a list of blocks.
    """
    if args.model == "mlp-1024":
        sizes = (*MLP1024_WIDTHS, args.classes)
        return {"layers": [_dense_shapes(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)]}
    block = {
        "norm": {"scale": (args.width,), "bias": (args.width,)},
        "up": _dense_shapes(args.width, args.hidden),
        "down": _dense_shapes(args.hidden, args.width),
    }
    return {
        "embed": _dense_shapes(args.features, args.width),
        "blocks": jax.tree.map(lambda s: (args.depth, *s), block, is_leaf=_is_shape)
        if stacked
        else [block] * args.depth,
        "head": _dense_shapes(args.width, args.classes),
    }


def make_plain_step(forward: Callable[[Params, jax.Array], jax.Array], tx: optax.GradientTransformation):
    """``jit(step, donate_argnums=0)`` with ``step((params, opt_state), x, y) -> (state, loss)``."""

    def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(forward(params, x).astype(jnp.float32), y).mean()

    def step(state: PlainState, x: jax.Array, y: jax.Array) -> tuple[PlainState, jax.Array]:
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        with jax.numpy_dtype_promotion("standard"):  # as jaxmp.training.step: optax promotes implicitly
            updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0)


# --- setup and the equivalence check -------------------------------------------------------------


def _int_keyed_to_list(tree: Any) -> Any:
    """nnx.List children come out of ``to_pure_dict`` as ``{0: ..., 1: ...}``; make them lists."""
    if isinstance(tree, dict):
        if tree and all(isinstance(k, int) for k in tree):
            return [_int_keyed_to_list(tree[k]) for k in sorted(tree)]
        return {k: _int_keyed_to_list(v) for k, v in tree.items()}
    return tree


def plain_params_from(jaxmp_params: Any, args: argparse.Namespace) -> Params:
    """A fresh copy (own buffers: the jaxmp state is donated) of the jaxmp params as a plain dict.

    Accepts an ``nnx.State`` or an already pure nested dict of arrays.
    """
    pure = jaxmp_params.to_pure_dict() if hasattr(jaxmp_params, "to_pure_dict") else jaxmp_params
    params = jax.tree.map(jnp.copy, _int_keyed_to_list(pure))
    stacked = not isinstance(params.get("blocks", []), list)
    got, want = jax.tree.map(lambda a: tuple(a.shape), params), plain_shapes(args, stacked)
    if got != want:
        raise SystemExit(f"parameter layout differs:\n jaxmp: {got}\n plain: {want}")
    return params


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def make_batches(program: Program, args: argparse.Namespace, count: int = 4) -> Batches:
    """``count`` random device batches, placed with the shardings the jaxmp step expects."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(count):
        x = rng.standard_normal((args.batch_size, args.features), dtype=np.float32)
        y = rng.integers(0, args.classes, args.batch_size, dtype=np.int32)
        batches.append(program.put_batch(x, y))
    return batches


def check_same_losses(jaxmp_losses: list[float], plain_losses: list[float], rtol: float) -> None:
    """Refuse to benchmark two steps that do not compute the same thing."""
    for i, (a, b) in enumerate(zip(jaxmp_losses, plain_losses, strict=True)):
        if not abs(a - b) <= rtol * max(abs(a), abs(b)):
            why = f"jaxmp loss {a!r} != plain loss {b!r} (rtol {rtol})"
            raise SystemExit(f"step {i}: {why}; no ratio reported.")


# --- timing --------------------------------------------------------------------------------------


class Runner:
    """One variant: its state, its compiled ``step(state, x, y) -> (state, out)`` and the loss in ``out``."""

    def __init__(self, name: str, state: Any, call: Callable[..., tuple[Any, Any]], loss_of: Callable):
        self.name, self.state, self._call, self._loss_of = name, state, call, loss_of
        self.round_s: list[float] = []

    def step(self, x: jax.Array, y: jax.Array) -> float:
        self.state, out = self._call(self.state, x, y)
        return float(self._loss_of(out))

    def run_round(self, batches: Batches, steps: int) -> float:
        start = time.perf_counter()
        out = None
        for i in range(steps):
            self.state, out = self._call(self.state, *batches[i % len(batches)])
        jax.block_until_ready((self.state, out))
        return time.perf_counter() - start


def interleave(runners: list[Runner], batches: Batches, rounds: int, steps: int) -> None:
    """One untimed warm-up round each, then ``rounds`` timed rounds in the order A, B, A, B, ..."""
    for runner in runners:
        runner.run_round(batches, steps)
    for _ in range(rounds):
        for runner in runners:
            runner.round_s.append(runner.run_round(batches, steps))


def median_step_ms(runner: Runner, steps: int) -> float:
    return 1e3 * statistics.median(runner.round_s) / steps


# --- main ----------------------------------------------------------------------------------------


def build_runners(args: argparse.Namespace) -> tuple[list[Runner], Batches, list[float]]:
    """Compile both steps, check they agree on the first losses, return them ready to time."""
    cfg = Config().replace(
        model=args.model,
        width=args.width,
        hidden=args.hidden,
        depth=args.depth,
        batch_size=args.batch_size,
        optimizer="adam",
        lr=args.lr,
        dtype=args.dtype,
    )
    mesh = build_mesh(MeshShape(), jax.devices()[:1])
    program = build_program(cfg, mesh, (args.features,), args.classes)
    state = program.init()
    params = plain_params_from(state.params, args)
    tx = optax.adam(args.lr)
    jaxmp = Runner("jaxmp", state, program.train_step, lambda metrics: metrics["loss"])
    plain = Runner("plain", (params, tx.init(params)), make_plain_step(plain_forward(args), tx), lambda x: x)
    batches = make_batches(program, args)
    losses = [jaxmp.training.step(*batches[i % len(batches)]) for i in range(CHECK_STEPS)]
    plain_losses = [plain.step(*batches[i % len(batches)]) for i in range(CHECK_STEPS)]
    check_same_losses(losses, plain_losses, loss_rtol(args.dtype))
    return [jaxmp, plain], batches, losses


def report(runners: list[Runner], args: argparse.Namespace, losses: list[float]) -> str:
    jaxmp_ms, plain_ms = (median_step_ms(r, args.steps_per_round) for r in runners)
    if args.model == "mlp":
        shape = f"width {args.width}, hidden {args.hidden}, depth {args.depth}; plain {args.plain_loop}"
    else:
        shape = "1024-512-256-128"
    lines = [
        f"**{args.model}** ({shape}), batch {args.batch_size}, {args.features} features, "
        f"{args.classes} classes, adam, {args.dtype}; device {jax.devices()[0].device_kind}; "
        f"{args.rounds} interleaved rounds x {args.steps_per_round} steps per variant; "
        f"first {len(losses)} losses match (rtol {loss_rtol(args.dtype)}).",
        "",
        "| variant | median step (ms) | min step (ms) | max step (ms) |",
        "|---|---:|---:|---:|",
    ]
    for r in runners:
        per_step = [1e3 * t / args.steps_per_round for t in r.round_s]
        median = median_step_ms(r, args.steps_per_round)
        lines.append(f"| {r.name} | {median:.3f} | {min(per_step):.3f} | {max(per_step):.3f} |")
    paired = statistics.median(a / b for a, b in zip(runners[0].round_s, runners[1].round_s, strict=True))
    lines += [
        "",
        f"ratio jaxmp/plain = **{jaxmp_ms / plain_ms:.3f}** (target <= 1.05); "
        f"median of the per-round ratios (each jaxmp round over the plain round after it) = {paired:.3f}",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="mlp")
    p.add_argument("--width", type=int, default=512, help="mlp: residual width")
    p.add_argument("--hidden", type=int, default=2048, help="mlp: hidden width of each block")
    p.add_argument("--depth", type=int, default=4, help="mlp: residual blocks")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--features", type=int, default=784, help="input features (mlp-1024: at most 1024)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of both steps")
    p.add_argument(
        "--plain-loop",
        choices=("scan", "unroll"),
        default="scan",
        help="mlp: how the plain twin applies stacked blocks (jaxmp scans them)",
    )
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", help="also write the Markdown table to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model == "mlp-1024" and args.features > MLP1024_WIDTHS[0]:
        raise SystemExit(f"--model mlp-1024 takes at most 1024 features, got {args.features}.")
    runners, batches, losses = build_runners(args)
    interleave(runners, batches, args.rounds, args.steps_per_round)
    text = report(runners, args, losses)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
