"""Dettmers' one-layer example of data versus model parallelism: the closed form, and what XLA compiles.

Why both in one place: Dettmers ("How to Parallelize Deep Learning on GPUs, Part 2/2: Model
Parallelism", 2014) gives the textbook's numbers for a 1000x500 layer on two devices;
:func:`textbook_layer` is that closed form and :func:`textbook_layer_exchange` compiles the same layer
(forward and backward, inside a network) on a real mesh, so a test or the analyzer can put them side by
side.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmp.inspection.closed_forms import Expected
from jaxmp.inspection.collectives import Collective, collectives
from jaxmp.inspection.compiled import compiled_text
from jaxmp.parallel.mesh import DATA, TENSOR, MeshShape, build_mesh
from jaxmp.parallel.rules import logical_to_spec, rules_for

_TEXTBOOK_AXIS = {"dp": DATA, "column": TENSOR, "row": TENSOR}


def _textbook_specs(strategy: str) -> tuple[P, P, P, P]:
    """(activation, weight, x where the matmul uses it, y where the matmul makes it) from the rules table.

    The batch axis of the activations and the weight's ``(dense_in, dense_out)`` axes come from
    :func:`jaxmp.parallel.rules.rules_for`, so the layer is split exactly as the ``dense`` model is.
    """
    rules = rules_for(strategy)
    batch = rules.get("batch")
    weight = logical_to_spec(("dense_in", "dense_out"), rules)
    w_in, w_out = (tuple(weight) + (None, None))[:2]
    return P(batch, None), weight, P(batch, w_in), P(batch, w_out)


def textbook_layer_exchange(
    strategy: str, batch: int = 128, fan_in: int = 1000, fan_out: int = 500, mesh: Mesh | None = None
) -> list[Collective]:
    """Collectives XLA emits for forward + backward of one bias-free dense layer ``y = x @ W``.

    Dettmers' example (2014): batch 128, W 1000x500, two devices. The step returns ``y`` and, for
    an output cotangent ``dy``, ``dx = dy @ W.T`` and ``dW = x.T @ dy`` (via ``jax.vjp``): the layer as
    it runs inside a network, where the input gradient is needed. Strategies (the ``dense`` model's
    rules table, :mod:`jaxmp.parallel.sharding`), with ``g`` devices on the split axis:
      - "dp": x, dy, y, dx split by batch; W, dW replicated -> all-reduce dW: ``fan_in*fan_out``
        (500,000);
      - "column": W, dW split by output over ``tensor``; activations whole -> all-gather y
        ``batch*fan_out*(g-1)/g`` (32,000 received) + all-reduce of the partial dx ``batch*fan_in``
        (128,000) = 160,000;
      - "row": W, dW split by input -> all-reduce of the partial y ``batch*fan_out`` (64,000) +
        all-gather dx ``batch*fan_in*(g-1)/g`` (64,000) = 128,000.
    Sharding constraints pin where the matmul works (x used column-split for "row", y produced
    column-split for "column"); their transposes pin the backward the same way (dx made column-split
    for "row", dy sliced for "column"). The CPU compiler emits exactly the textbook pattern with or
    without them.

    Args:
      strategy: "dp", "column" or "row".
      mesh: default: a 2-device mesh, ``data=2`` for "dp" and ``tensor=2`` otherwise; any mesh works
        (e.g. ``tensor=2`` for all three: "dp" then splits the batch over ``tensor`` as the trainer does).
    """
    if strategy not in _TEXTBOOK_AXIS:
        raise ValueError(f"strategy {strategy!r} is not one of {', '.join(_TEXTBOOK_AXIS)}")
    act, weight, x_use, y_made = _textbook_specs(strategy)
    mesh = build_mesh(MeshShape(**{_TEXTBOOK_AXIS[strategy]: 2})) if mesh is None else mesh

    def named(spec: P) -> NamedSharding:
        return NamedSharding(mesh, spec)

    def layer(x: jax.Array, w: jax.Array) -> jax.Array:
        x = jax.lax.with_sharding_constraint(x, named(x_use))
        return jax.lax.with_sharding_constraint(x @ w, named(y_made))

    def step(x: jax.Array, w: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        y, vjp = jax.vjp(layer, x, w)
        dx, dw = vjp(dy)
        return y, dx, dw

    f32 = np.float32
    args = (
        jax.ShapeDtypeStruct((batch, fan_in), f32),
        jax.ShapeDtypeStruct((fan_in, fan_out), f32),
        jax.ShapeDtypeStruct((batch, fan_out), f32),
    )
    text = compiled_text(
        step,
        *args,
        in_shardings=(named(act), named(weight), named(act)),
        out_shardings=(named(act), named(act), named(weight)),
    )
    return collectives(text, mesh)


def textbook_layer(strategy: str, batch: int, fan_in: int, fan_out: int, devices: int) -> list[Expected]:
    """Dettmers' closed form for one layer inside a network (input gradient needed), per device."""
    g = devices
    if strategy == "dp":
        return [Expected("weight gradient", "all-reduce", (), fan_in * fan_out, "fan_in*fan_out")]
    gathered = "b*{}*(g-1)/g"
    if strategy == "column":
        return [
            Expected(
                "output y (forward)", "all-gather", (), batch * fan_out * (g - 1) // g, gathered.format("fan_out")
            ),
            Expected("input gradient dx (backward)", "all-reduce", (), batch * fan_in, "b*fan_in"),
        ]
    return [
        Expected("output y (forward)", "all-reduce", (), batch * fan_out, "b*fan_out"),
        Expected(
            "input gradient dx (backward)", "all-gather", (), batch * fan_in * (g - 1) // g, gathered.format("fan_in")
        ),
    ]
