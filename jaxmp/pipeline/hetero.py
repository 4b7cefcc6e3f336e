"""Heterogeneous pipelines: stages with different layers and activation shapes (a conv stage, then a
dense stage), in one SPMD program, with a hand-written backward pass.

Shapes: M = micro-batches, b = micro-batch size, A = the widest stage-boundary activation of one
example (flattened), S = stages, R = repeats, T = ticks.

Stacking does not work when stages differ, so this executor runs under ``jax.shard_map`` manual over
``pipe`` and over the mesh axes that split the batch (``data``; ``tensor`` stays automatic, so Megatron
splits inside a stage would still come from the rules table). Each tick every device runs its own
chunk of layers through ``lax.switch`` on its stage, and ``lax.ppermute`` passes the flattened
activations (zero-padded to A) round the ring. The backward pass is a second scan over the ticks in
reverse, driven by the same schedule table: each busy stage re-runs its chunk under ``jax.vjp`` on the
stage input stashed by the forward scan (GPipe's re-materialisation: only stage inputs are kept) and
passes the input gradient to the previous stage; the same table could drive 1F1B later. ``--remat`` does
not apply: the backward always re-materialises from stage inputs. Layer parameters are replicated over
``pipe`` (compute and activations are pipelined, parameter memory is not); their gradients are summed
over ``pipe`` once, after the backward scan.

Why manual over the batch axes too (as in ``gpipe``): each tick's parameter gradient is a partial sum
over the examples a device holds. With ``data`` automatic the scan's accumulator was replicated over it
and XLA all-reduced every parameter gradient once per tick (measured, data=2,pipe=2, M=4: 3,451,570
elements per step for mlp-1024's 690,314 parameters, 764,030 for mnist-cnn's 152,806). The parameters now
enter as one copy per batch shard (a leading axis ``D`` sharded over the batch axes: no copy moves), each
device accumulates into its own copy, and the transpose of that broadcast sums the copies once per step.
Dropout ids stay global: a device offsets its micro-batch rows by its position along the batch axes.

Known limits (jax 0.10.2, CPU): ``shard_map``'s varying-axes checking around ``lax.switch`` gave wrong
gradients and heap corruption, so it is off (``check_vma=False``); and collectives inside the per-stage
branches deadlock when stages take different branches, so the ``tensor`` axis must be 1 here.
"""

from __future__ import annotations

import math
from operator import itemgetter
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmp.models.layers import LayerContext
from jaxmp.pipeline.gpipe import merge_microbatches, split_microbatches
from jaxmp.pipeline.schedule import Schedule
from jaxmp.sharding import active_rules, batch_axes, rules_without_axes, use_rules

P = jax.sharding.PartitionSpec


class _Plan(NamedTuple):
    """Everything static about one heterogeneous pipeline."""

    schedule: Schedule
    bounds: list[tuple[int, int]]  # [first layer, end layer) of each chunk; chunk r*S + s runs on stage s
    shapes: list[tuple[int, ...]]  # activation shape (b, ...) before each chunk and after the last
    width: int  # A
    graphdef: nnx.GraphDef
    train: bool
    batch_axes: tuple[str, ...]  # the mesh axes that split the batch: manual in the shard_maps too
    inner_rules: dict | None  # the rules table without the manual axes, for the model's constraints inside


def boundary_shapes(model, h_shape: tuple[int, ...], bounds, ctx: LayerContext) -> list[tuple[int, ...]]:
    """Activation shape before each chunk and after the last one, for a batch of shape ``h_shape``."""
    shapes = [h_shape]
    for first, end in bounds:

        def run(h, first=first, end=end):
            for k in range(first, end):
                h = model.apply_layer(k, h, ctx)
            return h

        shapes.append(jax.eval_shape(run, jax.ShapeDtypeStruct(shapes[-1], jnp.float32)).shape)
    return shapes


def layer_flops(model, h_shape: tuple[int, ...]) -> list[float]:
    """Forward FLOPs of each layer for one example, from XLA's cost analysis of the lowered layer."""
    flops, shape, ctx = [], (1, *h_shape[1:]), LayerContext()
    for k in range(model.num_layers):

        def layer(h, k=k):
            return model.apply_layer(k, h, ctx)

        example = jax.ShapeDtypeStruct(shape, jnp.float32)
        cost = jax.jit(layer).lower(example).cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        flops.append(float(cost.get("flops", 0.0)))
        shape = jax.eval_shape(layer, example).shape
    return flops


def run_hetero_pipeline(model, x, schedule: Schedule, bounds, *, train: bool, key, poison: bool = False):
    """``model.post(layers(model.pre(x)))`` with chunks of layers on the stages of the ``pipe`` axis."""
    graphdef, params = nnx.split(model)
    h = model.pre(x)
    b = h.shape[0] // schedule.microbatches
    shapes = boundary_shapes(model, (b, *h.shape[1:]), bounds, LayerContext(train, key, jnp.zeros((b,), jnp.int32)))
    replicas = _hetero_batch_axes()
    inner_rules = rules_without_axes(active_rules(), {*replicas, "pipe"})
    width = max(math.prod(s[1:]) for s in shapes)
    plan = _Plan(schedule, list(bounds), shapes, width, graphdef, train, replicas, inner_rules)
    flat_Mxbxa = split_microbatches(_flatten_pad(h, plan.width), schedule.microbatches)
    key_data = jax.random.key_data(key if key is not None else jax.random.key(0))
    # one copy of the params per batch shard, so each device accumulates its own gradient (module docstring)
    copies = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in replicas)
    params_D = jax.tree.map(lambda a: jnp.broadcast_to(a[None], (copies, *a.shape)), params)
    out_Mxbxa = _pipeline_core(plan, poison)(params_D, flat_Mxbxa, key_data)
    out = out_Mxbxa[..., : math.prod(shapes[-1][1:])].reshape(schedule.microbatches, *shapes[-1])
    return model.post(merge_microbatches(out))


def _hetero_batch_axes() -> tuple[str, ...]:
    """The mesh axes (of more than one device) that split the dense or the conv activations' batch."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = (*batch_axes(("batch",), mesh), *batch_axes(("conv_batch",), mesh))
    return tuple(dict.fromkeys(axes))


def _pipeline_core(plan: _Plan, poison: bool):
    """``(params, micro-batches, key data) -> outputs`` with the hand-written GPipe backward."""

    @jax.custom_vjp
    def core(params, flat_Mxbxa, key_data):
        return _forward(plan, poison)(params, flat_Mxbxa, key_data)[0]

    def core_fwd(params, flat_Mxbxa, key_data):
        out, stash = _forward(plan, poison)(params, flat_Mxbxa, key_data)
        return out, (params, stash, key_data)

    def core_bwd(residuals, g_out_Mxbxa):
        params, stash, key_data = residuals
        g_params, g_flat = _backward(plan)(params, stash, g_out_Mxbxa, key_data)
        return g_params, g_flat, None

    core.defvjp(core_fwd, core_bwd)
    return core


def _chunk_fn(plan: _Plan, c: int):
    """Chunk ``c`` as a function of flattened activations: unpad, run its layers, flatten and pad."""
    first, end = plan.bounds[c]
    size_in = math.prod(plan.shapes[c][1:])

    def run(params, h_bxa, ids_b, key_data):
        model = nnx.merge(plan.graphdef, params)
        ctx = LayerContext(plan.train, jax.random.wrap_key_data(key_data), ids_b)
        h = h_bxa[:, :size_in].reshape(h_bxa.shape[0], *plan.shapes[c][1:])  # b is this device's share
        for k in range(first, end):
            h = model.apply_layer(k, h, ctx)
        return _flatten_pad(h, plan.width)

    return run


def _example_ids(plan: _Plan, microbatch, b: int):
    """Global ids of this device's ``b`` examples of micro-batch ``microbatch`` (``split_microbatches``
    takes every M-th); the rows before this device's position along the batch axes are on other devices,
    and dropout masks follow the global id, so they are the same on any mesh."""
    first = jax.lax.axis_index(plan.batch_axes) * b if plan.batch_axes else 0
    rows = first + jnp.arange(b, dtype=jnp.int32)
    return jnp.maximum(microbatch, 0) + plan.schedule.microbatches * rows


def _manual(plan: _Plan, body, in_specs, out_specs):
    """``body`` under a shard_map manual over ``pipe`` and the batch axes, with the inner rules table.

    ``check_vma=False``: varying-axes checking around ``lax.switch`` gave wrong gradients and heap
    corruption on jax 0.10.2 (module docstring)."""

    def with_inner_rules(*args):
        with use_rules(plan.inner_rules):  # the model's constraints name only the automatic axes in here
            return body(*args)

    axis_names = {"pipe", *plan.batch_axes}
    return jax.shard_map(
        with_inner_rules, in_specs=in_specs, out_specs=out_specs, axis_names=axis_names, check_vma=False
    )


def _tables(plan: _Plan):
    s = plan.schedule
    return (jnp.asarray(s.microbatch), jnp.asarray(np.maximum(s.repeat, 0)), jnp.asarray(s.repeat[:, 0] == 0))


def _forward(plan: _Plan, poison: bool):
    schedule, stages = plan.schedule, plan.schedule.stages
    branches = [_chunk_fn(plan, c) for c in range(len(plan.bounds))]
    ring = [(s, (s + 1) % stages) for s in range(stages)]

    def body(params_1, flat_Mxbxa, key_data):
        params = jax.tree.map(itemgetter(0), params_1)
        stage = jax.lax.axis_index("pipe")
        microbatch_TxS, repeat_TxS, fresh_T = _tables(plan)
        b = flat_Mxbxa.shape[1]

        def tick(buf_bxa, t):
            microbatch, fresh = microbatch_TxS[t, stage], jnp.logical_and(fresh_T[t], stage == 0)
            h_bxa = jnp.where(fresh, flat_Mxbxa[jnp.maximum(microbatch, 0)], buf_bxa)
            h_bxa = jnp.where(microbatch >= 0, h_bxa, jnp.zeros_like(h_bxa))  # idle slots compute on zeros
            chunk = repeat_TxS[t, stage] * stages + stage
            out_bxa = jax.lax.switch(chunk, branches, params, h_bxa, _example_ids(plan, microbatch, b), key_data)
            return jax.lax.ppermute(out_bxa, "pipe", ring), (out_bxa, h_bxa)

        fill = jnp.nan if poison else 0.0
        initial = jnp.full((b, plan.width), fill, flat_Mxbxa.dtype)
        _, (outs_Txbxa, inputs_Txbxa) = jax.lax.scan(tick, initial, jnp.arange(schedule.ticks))
        finished = outs_Txbxa[schedule.finishing_ticks()]
        finished = jnp.where(stage == stages - 1, finished, jnp.zeros_like(finished))
        return jax.lax.psum(finished, "pipe"), inputs_Txbxa

    batch = plan.batch_axes or None
    return _manual(plan, body, (P(batch), P(None, batch), P()), (P(None, batch), P("pipe", batch)))


def _backward(plan: _Plan):
    schedule, stages = plan.schedule, plan.schedule.stages
    reverse_ring = [(s, (s - 1) % stages) for s in range(stages)]

    def vjp_branch(c: int):
        run = _chunk_fn(plan, c)

        def pull(params, h_bxa, ids_b, key_data, g_bxa):
            _, pullback = jax.vjp(lambda p, h: run(p, h, ids_b, key_data), params, h_bxa)
            return pullback(g_bxa)

        return pull

    branches = [vjp_branch(c) for c in range(len(plan.bounds))]

    def body(params_1, inputs_Txbxa, g_out_Mxbxa, key_data):
        params = jax.tree.map(itemgetter(0), params_1)
        stage = jax.lax.axis_index("pipe")
        microbatch_TxS, repeat_TxS, fresh_T = _tables(plan)
        b = g_out_Mxbxa.shape[1]

        def tick(carry, t):
            g_buf_bxa, g_params, g_flat_Mxbxa = carry
            microbatch, repeat = microbatch_TxS[t, stage], repeat_TxS[t, stage]
            busy, index = microbatch >= 0, jnp.maximum(microbatch, 0)
            finishing = jnp.logical_and(busy, (stage == stages - 1) & (repeat == schedule.repeats - 1))
            g_bxa = jnp.where(finishing, g_out_Mxbxa[index], g_buf_bxa)
            g_bxa = jnp.where(busy, g_bxa, jnp.zeros_like(g_bxa))
            chunk = repeat * stages + stage
            step_g_params, g_in_bxa = jax.lax.switch(
                chunk, branches, params, inputs_Txbxa[t], _example_ids(plan, microbatch, b), key_data, g_bxa
            )
            fresh = jnp.logical_and(busy, jnp.logical_and(fresh_T[t], stage == 0))
            g_flat_Mxbxa = g_flat_Mxbxa.at[index].add(jnp.where(fresh, g_in_bxa, jnp.zeros_like(g_in_bxa)))
            passed = jax.lax.ppermute(jnp.where(fresh, jnp.zeros_like(g_in_bxa), g_in_bxa), "pipe", reverse_ring)
            return (passed, jax.tree.map(jnp.add, g_params, step_g_params), g_flat_Mxbxa), None

        zeros = jax.tree.map(jnp.zeros_like, (params, g_out_Mxbxa))
        initial = (jnp.zeros((b, plan.width), g_out_Mxbxa.dtype), *zeros)
        (_, g_params, g_flat), _ = jax.lax.scan(tick, initial, jnp.arange(schedule.ticks), reverse=True)
        # summed over pipe here; over the batch axes by the transpose of the params' broadcast, once per step
        g_params_1, g_flat = jax.lax.psum((jax.tree.map(lambda g: g[None], g_params), g_flat), "pipe")
        return g_params_1, g_flat

    batch = plan.batch_axes or None
    in_specs = (P(batch), P("pipe", batch), P(None, batch), P())
    return _manual(plan, body, in_specs, (P(batch), P(None, batch)))


def _flatten_pad(h: jax.Array, width: int) -> jax.Array:
    flat = h.reshape(h.shape[0], -1)
    return jnp.pad(flat, ((0, 0), (0, width - flat.shape[1])))
