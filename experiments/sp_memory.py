"""Activation memory per transformer layer, with and without sequence parallelism, against the paper.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4) count
the bytes one layer keeps for its backward (fp16, s tokens, b sequences, h width, a heads, t tensor):
``sbh(34 + 5as/h)`` without parallelism, ``sbh(10 + 24/t + 5as/(ht))`` with tensor parallelism,
``sbh(34/t + 5as/(ht))`` with tensor and sequence parallelism. Adjusted to the ``gpt`` preset (derived):
no dropout (the masks, 1 byte per element: 2sbh and as^2b, go) and float32 (4 bytes per element), a
layer keeps, in elements:

- replicated under tensor parallelism alone: the two LayerNorm inputs and the two LayerNorm outputs
  (the inputs of the Q/K/V and MLP-up matmuls): ``4sbh``;
- split over ``tensor`` (heads or MLP columns): Q, K, V ``3sbh``, the attention output (input of the
  output projection) ``sbh``, the MLP's GELU input and output ``8sbh``: ``12sbh``; the softmax
  probabilities ``as^2b``.

So ``4*(16sbh + as^2b)`` bytes without parallelism, ``4*(4sbh + (12sbh + as^2b)/t)`` with tensor
parallelism, ``4*(16sbh + as^2b)/t`` with sequence parallelism too.

Measured: XLA's ``memory_analysis`` temporaries of the compiled gradient step (one device of the mesh),
at depth 1 and 3; the difference over 2 is one layer's activations (parameters and their gradients are
arguments and outputs, not temporaries). ``jax.grad`` on a plain (unpipelined) mesh ``tensor=t``.

Run (a minute on 2 CPU cores)::

    .venv/bin/python experiments/sp_memory.py --out experiments/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

MiB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in dict(width=64, heads=4, seq=128, batch=8, vocab=64).items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out", default=None, help="folder for sp_memory.md")
    return parser.parse_args()


def layer_bytes(args, tensor: int, sequence_parallel: bool) -> float:
    """One layer's activation temporaries per device: (temps at depth 3 - temps at depth 1) / 2."""
    import jax
    import jax.numpy as jnp

    from jaxmp.config import Config
    from jaxmp.parallel.mesh import MeshShape, build_mesh
    from jaxmp.training.step import build_program

    mesh = build_mesh(MeshShape(tensor=tensor), jax.devices()[:tensor])
    temps = []
    for depth in (1, 3):
        cfg = Config().replace(
            model="gpt",
            width=args.width,
            hidden=4 * args.width,
            heads=args.heads,
            depth=depth,
            batch_size=args.batch,
            mesh=f"tensor={tensor}",
            sequence_parallel=sequence_parallel,
        )
        program = build_program(cfg, mesh, (args.seq,), args.vocab, input_dtype=jnp.int32, label_shape=(args.seq,))
        temps.append(program.grad_step.compiled.memory_analysis().temp_size_in_bytes)
    return (temps[1] - temps[0]) / 2


def formula_bytes(args, tensor: int, sequence_parallel: bool) -> float:
    sbh = args.seq * args.batch * args.width
    scores = args.heads * args.seq**2 * args.batch
    if sequence_parallel or tensor == 1:
        return 4 * (16 * sbh + scores) / tensor
    return 4 * (4 * sbh + (12 * sbh + scores) / tensor)


def main() -> None:
    args = parse_args()
    from jaxmp.parallel.mesh import simulate_cpu_devices

    simulate_cpu_devices(4)
    rows = []
    for tensor, sp in ((1, False), (2, False), (2, True), (4, False), (4, True)):
        measured, formula = layer_bytes(args, tensor, sp), formula_bytes(args, tensor, sp)
        rows.append((tensor, sp, measured, formula))
    base = rows[0][2]
    lines = [
        f"gpt width h={args.width}, heads a={args.heads}, s={args.seq} tokens, b={args.batch}, MLP 4h, no dropout, "
        "float32; one layer's activation temporaries per device (jax.grad, memory_analysis, depth 3 minus depth 1, "
        "halved) against the paper's count adjusted to this layer (experiments/sp_memory.py docstring).",
        "",
        "| tensor t | sequence parallel | measured MiB | formula MiB | measured / formula | measured / t=1 |",
        "|---|---|---|---|---|---|",
    ]
    for tensor, sp, measured, formula in rows:
        lines.append(
            f"| {tensor} | {'yes' if sp else 'no'} | {measured / MiB:.3f} | {formula / MiB:.3f} | "
            f"{measured / formula:.2f} | {measured / base:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sp_memory.md").write_text(text)


if __name__ == "__main__":
    main()
