"""The one pipeline executor: any schedule table, any model written as a list of layers.

Shapes: M = micro-batches, b = one device's rows of a micro-batch, A = the widest activation between
two chunks (one example, flattened), S = stages, C = chunks, T = ticks, N = a stage buffer's size.

How: one ``jax.shard_map``, manual over ``pipe`` and over the mesh axes that split the batch (``tensor``
stays automatic unless it splits the batch, so Megatron splits inside a stage still come from the rules
table, and the devices of a tensor group always share a stage). Each device holds its stage's parameter
buffers (:mod:`jaxmp.pipeline.packing`). A ``lax.scan`` per phase of ticks (:mod:`jaxmp.pipeline.transfers`)
runs, each tick:

1. receive: the activations and cotangents that arrived (at most ``ARRIVALS`` of each) are written into
   their stash slots;
2. act: the table's action (:func:`_run_action`): idle (no work at all), the forward of a chunk (under
   ``jax.vjp``, its closure's residuals kept in a residual slot until its backward), or its backward,
   written by hand: the closure rebuilt from the residual slot and pulled back (a re-run only where
   ``--remat`` keeps less), the parameter cotangent added to a running sum, the input cotangent sent on;
3. send: one ``lax.ppermute`` per tick, carrying each device's one message, whichever way it goes.

The first chunk runs ``pre`` on the micro-batch itself and the last runs ``post`` and the loss, so the
loss of micro-batch ``m`` is known on the last stage as soon as its forward ends: a 1F1B table can then
start that backward at once, on this same executor. Weight gradients are summed over the batch axes
once, after the loop.

Why a hand-written backward and not autodiff through the loop: autodiff of ``lax.switch`` on a
predicate that depends on ``axis_index`` under ``shard_map`` gave wrong gradients (jax #40823), and
autodiff fixes the order of the backward (all forwards, then all backwards), which rules out 1F1B and
zero-bubble schedules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxmp.config import ConfigError
from jaxmp.models.contract import apply_part
from jaxmp.models.layers import LayerContext
from jaxmp.parallel.mesh import PIPE
from jaxmp.parallel.rules import as_axes, constrain, use_rules
from jaxmp.pipeline.backward_split import SplitBackward, split_backward
from jaxmp.pipeline.packing import Packing
from jaxmp.pipeline.schedule import BACKWARD, FORWARD, IDLE, INPUT, SENDS_BACK, WEIGHT, Schedule
from jaxmp.pipeline.transfers import Transfers, plan_transfers

Head = Callable[[jax.Array, jax.Array, jax.Array], dict]  # (outputs_bxK, labels_b, weights_b) -> sums


class Plan(NamedTuple):
    """Everything static about one pipelined program."""

    packing: Packing
    schedule: Schedule
    transfers: Transfers
    boundaries: tuple  # one example's activation (shape, dtype) after every chunk but the last
    outputs: jax.ShapeDtypeStruct  # one example's model output (what the head reads)
    width: int  # A
    message_dtype: jnp.dtype
    batch_axes: tuple[str, ...]  # manual in the shard_map, besides pipe
    inner_rules: dict | None  # the rules table without the manual axes
    policy: object  # jax.checkpoint policy of a chunk's forward: what it keeps for its backward (--remat)
    unroll: bool
    poison: bool  # tests: stash and messages start as NaN
    masked: bool = True  # tests: False writes every message, needed or not (the poison must then show)
    fuse_last: bool = False  # the last chunk's forward runs its whole backward too (see fuses_last_chunk)
    stash_cotangents: bool = False  # B stashes what W needs (--weight-pass stash), else W re-pulls it
    boundary_names: tuple | None = None  # the logical axes the model declares for its activations between layers
    message_axes: tuple[str, ...] = ()  # the mesh axes that split a message's flat dimension (see _message_axes)


def split_microbatches(x_Bx: jax.Array, microbatches: int) -> jax.Array:
    """``[B, ...]`` -> ``[b, M, ...]``: micro-batch ``m`` is ``[:, m]``, examples ``m, M + m, 2M + m, ...``.

    Strided, not contiguous, so each micro-batch keeps the batch's sharding: a device's contiguous
    block of examples becomes a contiguous block of every micro-batch. A reshape, not a transpose:
    the batch is never copied, each tick reads its micro-batch's rows in place.
    """
    b = x_Bx.shape[0] // microbatches
    return x_Bx.reshape(b, microbatches, *x_Bx.shape[1:])


def _microbatch(a_bMx: jax.Array, m) -> jax.Array:
    """Micro-batch ``m`` of a :func:`split_microbatches` array: ``[b, ...]``."""
    return jax.lax.dynamic_index_in_dim(a_bMx, m, axis=1, keepdims=False)


def make_plan(
    packing: Packing,
    schedule: Schedule,
    batch_axes,
    inner_rules,
    *,
    boundaries,
    outputs,
    policy,
    unroll,
    poison,
    masked=True,
    stash_cotangents=False,
    boundary_names=None,
) -> Plan:
    """A :class:`Plan`; ``boundaries`` are the activations (one example) between consecutive chunks,
    ``boundary_names`` their logical axes if the model declares them (``BOUNDARY_NAMES``)."""
    width = max([1, *(math.prod(s.shape) for s in boundaries)])
    dtype = boundaries[0].dtype if boundaries else jnp.float32
    fuse = fuses_last_chunk(schedule)
    transfers = plan_transfers(schedule, _no_ops(schedule, fuse), _stashes(schedule, fuse))
    return Plan(
        packing,
        schedule,
        transfers,
        boundaries,
        outputs,
        width,
        dtype,
        batch_axes,
        inner_rules,
        policy,
        unroll,
        poison,
        masked,
        fuse,
        stash_cotangents and schedule.split_backward,
        boundary_names,
        _message_axes(boundaries, boundary_names, inner_rules, width),
    )


def _message_axes(boundaries, names, inner_rules, width: int) -> tuple[str, ...]:
    """The mesh axes that split a flat message ``[b, A]`` along ``A``: those of the boundary's first
    axis after the batch, when the model declares it split (a transformer's tokens under sequence
    parallelism) and every boundary has that one shape, so the flat split is the declared one. Else
    none: messages whole over the automatic axes."""
    if not names or not boundaries or inner_rules is None or len(names) != 1 + len(boundaries[0].shape):
        return ()
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in as_axes(inner_rules.get(names[1])) if not mesh.empty and mesh.shape[a] > 1)
    rest = [as_axes(inner_rules.get(name)) for name in names[2:]]
    same = all(b.shape == boundaries[0].shape for b in boundaries) and math.prod(boundaries[0].shape) == width
    parts = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if not axes or any(rest) or not same or boundaries[0].shape[0] % parts:
        return ()
    return axes


def plan_exchange(schedule: Schedule) -> Transfers:
    """The messages, slots and loops the executor runs ``schedule`` with."""
    return plan_transfers(schedule, _no_ops(schedule, fuses_last_chunk(schedule)))


def _stashes(schedule: Schedule, fuse_last: bool) -> np.ndarray | None:
    """``[T, S, L]``: the forwards that keep residuals for their backward (all but the fused last chunk's;
    none without a backward)."""
    if not any(np.isin(lane.kind, SENDS_BACK).any() for lane in schedule.lanes):
        return None
    fused = fuse_last & (schedule.chunk == schedule.chunks - 1)
    return np.stack([(lane.kind == FORWARD) & ~fused for lane in schedule.lanes], axis=-1)


def fuses_last_chunk(schedule: Schedule) -> bool:
    """Whether the last chunk's forward also runs its backward (loss, weight gradient and input cotangent
    in one ``jax.vjp``, no re-run, no residuals kept), the cotangent kept in the input's stash slot until
    the table's ``B`` sends it.

    Only on one stage. With several, the last stage's forward tick would carry a forward and a backward
    while the other stages run one forward, and every stage waits for the slowest at each tick.
    """
    backward = np.isin(schedule.kind, SENDS_BACK).any()
    return schedule.stages == 1 and schedule.paired is None and bool(backward)


class _Carry(NamedTuple):
    inputs: jax.Array  # [slots, b, A] stashed activations
    grads: jax.Array  # [slots, b, A] cotangents waiting for their backward
    arrived: tuple  # per round: [b, A] the message the last permute delivered
    g_params: dict  # running sum of this stage's buffer cotangents
    sums: dict  # running sums of the head's outputs (loss, ...)
    residuals: tuple = ()  # per stash kind [count, residual slots, ...]: forwards' residuals for B and W


class _Tick(NamedTuple):
    """What one tick reads for one action (already picked for this stage)."""

    x: jax.Array  # the micro-batch's inputs [b, ...]
    y: jax.Array
    weights: jax.Array
    h: jax.Array  # the stashed input activation [b, A]
    g: jax.Array  # the output cotangent [b, A]
    ids: jax.Array  # global example ids [b]
    res: tuple = ()  # the residual stash (per kind [count, residual slots, ...]), read-only in an action
    slot: jax.Array | int = 0  # this action's residual slot (a forward writes it, its B and W read it)
    first_rows: jax.Array | None = None  # [P] per piece of the chunk: its first layer's position in its stack


def run(plan: Plan, buffers: dict, x_bMx, y_bMx, w_bMx, key, head: Head, *, train: bool):
    """Run ``plan``'s schedule: ``(sums of head outputs, buffer gradients or None)``.

    Args:
      buffers: the per-stage parameter buffers ``[S, tiles..., N]``.
      x_bMx, y_bMx, w_bMx: micro-batched inputs, labels and example weights (global arrays).
      key: the step's dropout key.
      head: ``(outputs, labels, weights) -> dict of scalars`` summed over micro-batches; with
        ``train``, its ``"loss"`` is differentiated.
    """
    manual = frozenset({PIPE, *plan.batch_axes})
    batch = plan.batch_axes or None
    buffer_specs = {
        name: P(PIPE, *(a if a in manual else None for a in b.tile_axes), None)
        for name, b in plan.packing.buffers.items()
    }
    body = _device_program(plan, head, train, manual)
    data_spec = P(batch)
    out_specs = (P(), buffer_specs) if train else P()
    mapped = jax.shard_map(
        body,
        in_specs=(buffer_specs, data_spec, data_spec, data_spec, P()),
        out_specs=out_specs,
        axis_names=set(manual),
        check_vma=False,
    )
    return mapped(buffers, x_bMx, y_bMx, w_bMx, jax.random.key_data(key))


def _device_program(plan: Plan, head: Head, train: bool, manual: frozenset[str]):
    """The per-device body of the shard_map (module docstring)."""
    schedule, transfers = plan.schedule, plan.transfers

    def body(buffers, x_bMx, y_bMx, w_bMx, key_data):
        with use_rules(plan.inner_rules):
            access = _Params.of(plan, _gather_manual_tiles(plan, buffers, manual), manual)
            stage = jax.lax.axis_index(PIPE)
            b = x_bMx.shape[0]
            sample = _sample_tick(plan, x_bMx, y_bMx, w_bMx)
            branches, stash = _branches(plan, access, head, train, jax.random.wrap_key_data(key_data), sample)
            fill = jnp.nan if plan.poison else 0.0
            message = _pin_message(jnp.full((b, plan.width), fill, plan.message_dtype), plan)
            carry = _Carry(
                _pin_message(jnp.full((transfers.input_slots, b, plan.width), fill, plan.message_dtype), plan),
                _pin_message(jnp.full((transfers.grad_slots, b, plan.width), fill, plan.message_dtype), plan),
                tuple(message for _ in range(transfers.rounds)),
                access.zeros() if train else {},
                _zero_sums(head, plan, x_bMx, y_bMx, w_bMx),
                stash.empty(transfers.residual_slots, plan.poison),
            )
            tables = _tables(plan, schedule, transfers, stage)
            data = (x_bMx, y_bMx, w_bMx)
            for loop in transfers.loops:
                carry, _ = jax.lax.scan(
                    _loop_body(plan, loop, branches, tables, data, stage),
                    carry,
                    loop.ticks,
                    unroll=plan.unroll,
                )
            sums = jax.lax.psum(carry.sums, (PIPE, *plan.batch_axes))
            if not train:
                return sums
            return sums, _reduce_gradients(plan, access.packed(carry.g_params), manual)

    return body


class _Params(NamedTuple):
    """How the actions read a chunk's parameters and add up its gradients.

    The pieces every stage has at the same offsets (:meth:`Packing.shared_params`: a stack split evenly;
    on one stage, everything) are unpacked once per step, a short stack already cut into its layers
    (:func:`_unrolls`), and their gradients summed in the layer tree, packed once after the loop: as fast
    as a plain step. The other pieces (``pre``, ``post``, layers of their own) are unpacked by each action
    from the stage buffers and added into them segment by segment: the only form with one shape on every
    stage.
    """

    packing: Packing
    local: dict  # this device's buffers, manual tiles gathered
    manual: frozenset
    shared: dict  # signature -> unpacked tree (a list of one tree per layer for an unrolled stack)

    @staticmethod
    def of(plan: Plan, local: dict, manual: frozenset) -> _Params:
        shared = plan.packing.shared_params(local, manual)
        for sig, tree in shared.items():
            rows = sig[-1]
            if rows is not None and _unrolls(plan, rows):
                shared[sig] = [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(rows)]
        return _Params(plan.packing, local, manual, shared)

    def params(self, c: int) -> list:
        return self.packing.chunk_params(c, self.local, self.manual, self.shared)

    def zeros(self):
        return self.packing.zero_grads(self.shared, self.local)

    def add(self, c: int, sums, grads: list):
        return self.packing.add_chunk_grads(c, sums, grads, self.manual)

    def packed(self, sums) -> dict:
        stacked = {sig: _stack(tree) if isinstance(tree, list) else tree for sig, tree in sums.shared.items()}
        return self.packing.packed_grads(sums._replace(shared=stacked), self.manual)


def _stack(rows: list):
    return jax.tree.map(lambda *a: jnp.stack(a), *rows)


UNROLLED_LAYERS = 8  # the most unrolled copies of a layer the chunk programs of one step compile, by default


def _unrolls(plan: Plan, rows: int) -> bool:
    """Whether a chunk runs ``rows`` stacked layers unrolled inside its tick (the tick loop stays rolled:
    compile time flat in M). Inside the tick loop, a ``lax.scan`` over layers costs XLA:CPU a slice of
    every layer's weights and a zeroed gradient stack per action, a large share of a micro-batch's work;
    unrolled, a short stack is cut into its layers once per step. Each distinct chunk program (first,
    middle, last; :func:`_branch_keys`) compiles its own copies, so the rows times the programs must stay
    within ``UNROLLED_LAYERS``: compile time then stays flat in depth. ``--unroll`` unrolls every stack and
    the tick loops."""
    return plan.unroll or rows * len(set(_branch_keys(plan))) <= UNROLLED_LAYERS


def _no_ops(schedule: Schedule, fuse_last: bool) -> np.ndarray:
    """``[T, S, L]`` bool: the action does nothing (idle; a backward or ``W`` of a fused last chunk that
    has nothing to send; ``I`` of chunk 0: its ``W`` computes the weight gradient, no cotangent is sent)."""
    last = schedule.chunks - 1

    def no_op(kind, chunk):
        fused = fuse_last & (chunk == last)
        nothing = (kind == IDLE) | (fused & ((kind == WEIGHT) | (np.isin(kind, SENDS_BACK) & (last == 0))))
        return nothing | ((kind == INPUT) & (chunk == 0))

    return np.stack([no_op(lane.kind, lane.chunk) for lane in schedule.lanes], axis=-1)


def _zero_sums(head: Head, plan: Plan, x_bMx, y_bMx, w_bMx) -> dict:
    outputs = jax.ShapeDtypeStruct((y_bMx.shape[0], *plan.outputs.shape), plan.outputs.dtype)
    shapes = jax.eval_shape(head, outputs, _microbatch(y_bMx, 0), _microbatch(w_bMx, 0))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _gather_manual_tiles(plan: Plan, buffers: dict, manual: frozenset[str]) -> dict:
    """Buffers tiled over a manual axis (FSDP over the batch axes) gathered once per step."""
    local = {}
    for name, value in buffers.items():
        for i, axis in enumerate(plan.packing.buffers[name].tile_axes):
            if axis in manual:
                value = jax.lax.all_gather(value, axis, axis=1 + i, tiled=True)
        local[name] = value
    return local


def _reduce_gradients(plan: Plan, g_params: dict, manual: frozenset[str]) -> dict:
    """Sum each stage's gradients over the batch axes, scattering back the tiles of manual axes."""
    out = {}
    for name, g in g_params.items():
        tiles = plan.packing.buffers[name].tile_axes
        summed = [a for a in plan.batch_axes if a not in tiles]
        if summed:
            g = jax.lax.psum(g, tuple(summed))
        for i, axis in enumerate(tiles):
            if axis in manual:
                g = jax.lax.psum_scatter(g, axis, scatter_dimension=1 + i, tiled=True)
        out[name] = g
    return out


class _Tables(NamedTuple):
    """This stage's integer tables, per tick (and per lane: the main action, the pair's backward)."""

    branch_np: np.ndarray  # [T, S, L] branch index per tick and stage (numpy: each tick of a loop picks its branches)
    branch: jax.Array  # [T, L] this stage's branch index per tick
    microbatch: jax.Array  # [T, L]
    recv_input: jax.Array  # [T, ARRIVALS, 2]
    recv_grad: jax.Array  # [T, ARRIVALS, 2]
    read_input: jax.Array  # [T, L]
    read_grad: jax.Array  # [T, L]
    residual_slot: jax.Array  # [T, L]
    first_rows: jax.Array  # [T, L, P] per piece of the action's chunk: its first row in its stack
    send_lane: jax.Array  # [T, rounds]: the lane whose message this stage sends in each round


def _tables(plan: Plan, schedule: Schedule, transfers: Transfers, stage) -> _Tables:
    branch = _branch_table(plan, schedule)
    residual_slot = transfers.residual_slot
    if residual_slot is None:
        residual_slot = np.zeros(transfers.read_input.shape, np.int32)

    def mine(table):
        return jnp.asarray(table)[:, stage]

    return _Tables(
        branch,
        mine(branch),
        mine(np.stack([lane.microbatch for lane in schedule.lanes], axis=-1)),
        mine(transfers.recv_input),
        mine(transfers.recv_grad),
        mine(transfers.read_input),
        mine(transfers.read_grad),
        mine(residual_slot),
        mine(_first_rows(plan, schedule)),
        mine(transfers.send_lane),
    )


def _most_pieces(plan: Plan) -> int:
    return max(len(chunk.pieces) for chunk in plan.packing.chunks)


def _first_rows(plan: Plan, schedule: Schedule) -> np.ndarray:
    """``[T, S, L, P]``: for the chunk of each action, the position in its stack of each piece's first
    layer (0 for a part that is no stack): dropout keys fold it in, so the masks follow the layer, not
    the chunk that runs it."""
    table = np.zeros((*schedule.kind.shape, len(schedule.lanes), _most_pieces(plan)), np.int32)
    for t, s, lane, _, _, c in schedule.actions():
        for j, piece in enumerate(plan.packing.chunks[c].pieces):
            table[t, s, lane, j] = piece.rows[0] if piece.rows is not None else 0
    return table


def _branch_keys(plan: Plan) -> list:
    """One key per chunk: chunks with the same layout (the middle of a stack) share one branch."""
    keys = []
    last = len(plan.packing.chunks) - 1
    for c, chunk in enumerate(plan.packing.chunks):
        pieces = tuple((p.part.name, None if p.rows is None else p.rows[1] - p.rows[0]) for p in chunk.pieces)
        slots = tuple((s.buffer, s.offset, s.tile.shape) for s in chunk.slots)
        keys.append((pieces, slots, c == 0, c == last))
    return keys


ACTIONS = (FORWARD, BACKWARD, INPUT, WEIGHT)  # the branches of each distinct chunk, in this order


def _branch_table(plan: Plan, schedule: Schedule) -> np.ndarray:
    """``[T, S, L]`` index into the branch list: 0 idle, then F, B, I and W per distinct chunk."""
    keys = _branch_keys(plan)
    distinct = list(dict.fromkeys(keys))
    table = np.zeros((*schedule.kind.shape, len(schedule.lanes)), np.int32)
    for t, s, lane, kind, _, c in schedule.actions():
        table[t, s, lane] = 1 + len(ACTIONS) * distinct.index(keys[c]) + ACTIONS.index(kind)
    return table


class _Out(NamedTuple):
    """What an action gives back to its tick."""

    g_params: dict
    sums: dict
    send: jax.Array  # [b, A] the activation sent on or the input cotangent sent back (blank if none)
    keep: jax.Array  # [b, A] written back into the input's stash slot (fused last chunk: its cotangent)
    res: dict | None = None  # (kind, row) -> (value, slot) to write into the stash (a forward's residuals)


def _sample_tick(plan: Plan, x_bMx, y_bMx, w_bMx) -> _Tick:
    """The shapes one tick's action reads (to trace an action before the loop)."""
    b = x_bMx.shape[0]
    flat = jax.ShapeDtypeStruct((b, plan.width), plan.message_dtype)
    ids = jax.ShapeDtypeStruct((b,), jnp.int32)
    data = (jax.ShapeDtypeStruct((b, *a.shape[2:]), a.dtype) for a in (x_bMx, y_bMx, w_bMx))
    first_rows = jax.ShapeDtypeStruct((_most_pieces(plan),), jnp.int32)
    return _Tick(*data, flat, flat, ids, first_rows=first_rows)


def _branches(plan: Plan, access: _Params, head: Head, train: bool, key, sample: _Tick):
    """``([None (idle), F, B, I, W (chunk), ...], stash)``, each action ``(g_params, sums, tick) -> _Out``."""
    keys = _branch_keys(plan)
    first_chunk = {k: keys.index(k) for k in dict.fromkeys(keys)}
    chunks = {c: _Chunk(plan, c, access, head, train, key) for c in first_chunk.values()}
    stashing = plan.transfers.residual_slots > 0 and train
    stash = _Stash.of(
        {c: chunk.layout(sample) for c, chunk in chunks.items() if stashing and not (chunk.last and plan.fuse_last)}
    )

    branches = [None]
    for chunk in chunks.values():
        branches += chunk.actions(stash)
    return branches, stash


class _Layout(NamedTuple):
    """How a chunk's ``jax.vjp`` closure is rebuilt in its backward: which leaves are values the
    backward has anyway (its parameters, its input, the tick's data) and which come from the stash."""

    treedef: object
    where: tuple[int, ...]  # per closure leaf: >= 0 index into the known values; -1 - j: stashed leaf j
    stashed: tuple[jax.ShapeDtypeStruct, ...]
    out: object  # the chunk's outputs (ShapeDtypeStructs): the structure of the backward's seed
    boundary: tuple[jax.ShapeDtypeStruct, ...] = ()  # what B stashes for W (:mod:`.backward_split`)


class _Stash(NamedTuple):
    """The residual stash: per (shape, dtype), one array ``[count, slots, *shape]`` shared by the chunks
    of one stage's branches.

    ``count`` is the most leaves of that kind one chunk stashes (a chunk's leaves may sit in rows another
    chunk uses in other slots, never in the same slot). Each residual keeps its own shape, so a residual
    split over ``tensor`` stays split. One array per kind, not one per leaf: XLA would fill one buffer
    and copy it into each of the others."""

    kinds: tuple[tuple[jax.ShapeDtypeStruct, int], ...]  # (kind, count)
    layouts: dict  # chunk -> _Layout
    rows_of: dict  # chunk -> per stashed leaf, its (kind, row)
    boundary_of: dict  # chunk -> per boundary value (B to W), its (kind, row)

    @staticmethod
    def of(layouts: dict) -> _Stash:
        kinds: dict[tuple[bool, jax.ShapeDtypeStruct], int] = {}  # (boundary?, kind) -> count
        rows_of, boundary_of = {}, {}
        for c, layout in layouts.items():
            used: dict[tuple[bool, jax.ShapeDtypeStruct], int] = {}
            mine = []
            for j, leaf in enumerate((*layout.stashed, *layout.boundary)):
                # B reads residuals and writes boundary values: kept apart, or XLA copies the array first
                kind = (j >= len(layout.stashed), jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
                kinds.setdefault(kind, 0)
                row = used[kind] = used.get(kind, -1) + 1
                kinds[kind] = max(kinds[kind], row + 1)
                mine.append((list(kinds).index(kind), row))
            rows_of[c], boundary_of[c] = tuple(mine[: len(layout.stashed)]), tuple(mine[len(layout.stashed) :])
        return _Stash(tuple((kind, count) for (_, kind), count in kinds.items()), layouts, rows_of, boundary_of)

    def empty(self, slots: int, poison: bool) -> tuple:
        def fill(kind, count):
            value = jnp.nan if poison and jnp.issubdtype(kind.dtype, jnp.floating) else 0
            return jnp.full((count, slots, *kind.shape), value, kind.dtype)

        return tuple(fill(kind, count) for kind, count in self.kinds)

    def put(self, c: int, vjp, known: list, slot) -> dict:
        """``(kind, row)`` -> ``(value, slot)``: chunk ``c``'s stashed closure leaves to write into ``slot``."""
        layout = self.layouts[c]
        where, stashed = _classify(vjp, known)
        shapes = [(x.shape, x.dtype) for x in stashed]
        if where != layout.where or shapes != [(x.shape, x.dtype) for x in layout.stashed]:
            raise AssertionError(f"chunk {c}: the forward's residuals differ from those traced before the loop")
        return {at: (leaf, slot) for leaf, at in zip(stashed, self.rows_of[c], strict=True)}

    def put_boundary(self, c: int, values: list, slot) -> dict:
        """``(kind, row)`` -> ``(value, slot)``: what chunk ``c``'s ``B`` computed for its ``W``."""
        return {at: (value, slot) for value, at in zip(values, self.boundary_of[c], strict=True)}

    def boundary(self, c: int, res: tuple, slot) -> list:
        return [res[kind][row, slot] for kind, row in self.boundary_of[c]]

    def stashed(self, c: int, res: tuple, slot) -> list:
        return [res[kind][row, slot] for kind, row in self.rows_of[c]]

    @staticmethod
    def write(res: tuple, writes: dict) -> tuple:
        """``res`` with ``writes`` (as :meth:`put` gives them) done, in place."""
        res = list(res)
        for (kind, row), (value, slot) in writes.items():
            start = (row, slot, *(0 for _ in value.shape))
            res[kind] = jax.lax.dynamic_update_slice(res[kind], value[None, None], start)
        return tuple(res)


def _closure(layout: _Layout, known: list, stashed: list):
    """A chunk's ``jax.vjp`` closure, from the values its backward has and its stashed residuals."""
    leaves = [known[w] if w >= 0 else stashed[-1 - w] for w in layout.where]
    return jax.tree.unflatten(layout.treedef, leaves)


def _classify(vjp, known: list) -> tuple[tuple[int, ...], list]:
    """Per leaf of a ``jax.vjp`` closure: its index in ``known`` (the very same traced value), or
    ``-1 - j`` for the ``j``-th leaf to stash."""
    index = {id(v): i for i, v in enumerate(known)}
    where, stashed = [], []
    for leaf in jax.tree.leaves(vjp):
        if id(leaf) in index:
            where.append(index[id(leaf)])
        else:
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                raise ConfigError("a layer keeps a PRNG key for its backward; derive its keys from ctx.key")
            where.append(-1 - len(stashed))
            stashed.append(leaf)
    return tuple(where), stashed


class _Chunk:
    """The F, B and W actions of chunk ``c``.

    The forward runs the chunk under ``jax.vjp`` (inside ``jax.checkpoint`` with the plan's remat
    policy) and stashes the closure's residuals, but not the values its backward has anyway (its
    parameters, input and the tick's data). ``B`` rebuilds the closure from the stash and pulls the
    output cotangent through it: no re-run, unless the policy asked for one (``full``: only the chunk's
    input is kept, so ``B`` re-runs the chunk). With ``W`` in the table, ``B`` returns only the input
    cotangent and ``W`` only the weight gradient (XLA drops the half of the backward an action does not
    return, so ``W`` computes the input-cotangent chain again); with ``--weight-pass stash`` the two run
    the halves of :func:`.backward_split.split_backward`, ``B`` stashing the cotangents ``W`` reads in
    the micro-batch's residual slot. The fused last chunk (:func:`fuses_last_chunk`) does all of it in
    its forward; its ``B`` only sends the kept cotangent, its ``W`` nothing.
    """

    def __init__(self, plan: Plan, c: int, access: _Params, head: Head, train: bool, key):
        self.plan, self.c, self.access, self.head, self.train, self.key = plan, c, access, head, train, key
        self.last = c == len(plan.packing.chunks) - 1
        self.fill = jnp.nan if plan.poison else 0.0

    def run(self, params, h, tick: _Tick):
        """The chunk from its input (the micro-batch for chunk 0) to its flat output, or to the head."""
        plan, c = self.plan, self.c
        ctx = LayerContext(self.train, self.key, tick.ids)
        if c > 0:
            h = _unflatten(h, plan, c)
        for j, (piece, piece_params) in enumerate(zip(plan.packing.chunks[c].pieces, params, strict=True)):
            unroll = piece.rows is not None and _unrolls(plan, piece.rows[1] - piece.rows[0])
            # the running chunk's rows, from the table: chunks of one layout share this traced branch
            h = apply_part(piece.part, piece_params, h, ctx, unroll=unroll, first=tick.first_rows[j])
        if self.last:
            return self.head(h, tick.y, tick.weights)
        return _flatten_pad(h, plan)

    def primal(self, tick: _Tick):
        return tick.x if self.c == 0 else tick.h

    def known(self, params, tick: _Tick) -> list:
        """Values every action of this micro-batch has without the stash."""
        return [*jax.tree.leaves(params), tick.x, tick.h, tick.y, tick.weights, tick.ids, self.key, tick.first_rows]

    def linearize(self, tick: _Tick):
        """``(outputs, vjp closure, parameters)``: the closure takes the output cotangent to the parameter
        cotangents (and, past chunk 0, the input cotangent)."""
        params, h = self.access.params(self.c), self.primal(tick)
        fn = jax.checkpoint(lambda p, h: self.run(p, h, tick), policy=self.plan.policy, prevent_cse=False)
        if self.c == 0:
            out, vjp = jax.vjp(lambda p: fn(p, h), params)
        else:
            out, vjp = jax.vjp(fn, params, h)
        return out, vjp, params

    def layout(self, sample: _Tick) -> _Layout:
        """Trace the forward once (shapes only) to find which closure leaves must be stashed."""
        found = {}

        def trace(tick):
            out, vjp, params = self.linearize(tick)
            found["treedef"] = jax.tree.structure(vjp)
            found["where"], stashed = _classify(vjp, self.known(params, tick))
            return out, stashed

        out, stashed = jax.eval_shape(trace, sample)
        layout = _Layout(found["treedef"], found["where"], tuple(stashed), out)
        if not self.plan.stash_cotangents:
            return layout
        known = jax.eval_shape(lambda tick: self.known(self.access.params(self.c), tick), sample)
        return layout._replace(boundary=self.split_backward(layout, known, list(stashed), sample).boundary)

    def split_backward(self, layout: _Layout, known: list, stashed: list, tick: _Tick) -> SplitBackward:
        """The backward as ``B`` and ``W`` that share its work (:mod:`.backward_split`), traced from the
        shapes of its inputs: the values every action has, the stashed residuals and the seed."""

        def backward(known, stashed, seed):
            cotangents = _closure(layout, known, stashed)(seed)
            return [*jax.tree.leaves(cotangents[0]), *cotangents[1:]]

        shapes = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (known, stashed, self.seed(layout.out, tick))
        )
        count = len(jax.tree.leaves(self.access.params(self.c)))
        return split_backward(backward, list(shapes), count)

    def blank(self, tick: _Tick):
        return jnp.full(tick.h.shape, self.fill, tick.h.dtype)

    def seed(self, out, tick: _Tick):
        """The output cotangent: the loss's for the last chunk, the one that arrived otherwise."""
        if self.last:
            return jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), out) | {"loss": jnp.ones_like(out["loss"])}
        return tick.g

    def split(self, cotangents, tick: _Tick):
        """``(parameter cotangents, input cotangent or blank)``."""
        if self.c == 0:
            return cotangents[0], self.blank(tick)
        return cotangents[0], cotangents[1].astype(tick.h.dtype)

    def add(self, g_params, g_p):
        return self.access.add(self.c, g_params, g_p)

    def actions(self, stash: _Stash):
        plan, c = self.plan, self.c
        fused = self.last and plan.fuse_last and self.train
        stashing = plan.stash_cotangents

        def forward(g_params, sums, tick: _Tick):
            if not self.train:
                out = self.run(self.access.params(c), self.primal(tick), tick)
                if self.last:
                    return _Out(g_params, jax.tree.map(jnp.add, sums, out), self.blank(tick), tick.h)
                return _Out(g_params, sums, out, tick.h)
            out, vjp, params = self.linearize(tick)
            if fused:
                g_p, g_h = self.split(vjp(self.seed(out, tick)), tick)
                keep = g_h if c > 0 else tick.h
                return _Out(self.add(g_params, g_p), jax.tree.map(jnp.add, sums, out), self.blank(tick), keep)
            res = stash.put(c, vjp, self.known(params, tick), tick.slot)
            if self.last:
                return _Out(g_params, jax.tree.map(jnp.add, sums, out), self.blank(tick), tick.h, res)
            return _Out(g_params, sums, out, tick.h, res)

        def inputs(tick: _Tick):
            """``(known, stashed, seed)``: what the backward of this micro-batch starts from."""
            layout = stash.layouts[c]
            known = self.known(self.access.params(c), tick)
            return known, stash.stashed(c, tick.res, tick.slot), self.seed(layout.out, tick)

        def backward(g_params, sums, tick: _Tick):
            """``B``: the whole backward, the input cotangent sent on and the weight gradient added."""
            if fused or not self.train:  # fused: the forward left the cotangent in the input's slot
                return _Out(g_params, sums, tick.h if fused else self.blank(tick), tick.h)
            known, stashed, seed = inputs(tick)
            g_p, g_h = self.split(_closure(stash.layouts[c], known, stashed)(seed), tick)
            return _Out(self.add(g_params, g_p), sums, g_h, tick.h)

        def input_only(g_params, sums, tick: _Tick):
            """``I``: the input cotangent only; its ``W`` adds the weight gradient later."""
            if fused or not self.train:
                return _Out(g_params, sums, tick.h if fused else self.blank(tick), tick.h)
            known, stashed, seed = inputs(tick)
            if not stashing:  # XLA drops the weight half of this pullback
                _, g_h = self.split(_closure(stash.layouts[c], known, stashed)(seed), tick)
                return _Out(g_params, sums, g_h, tick.h)
            halves = self.split_backward(stash.layouts[c], known, stashed, tick)
            g_h, boundary = halves.input_pass(*jax.tree.leaves((known, stashed, seed)))
            g_h = g_h[0].astype(tick.h.dtype) if c > 0 else self.blank(tick)
            return _Out(g_params, sums, g_h, tick.h, stash.put_boundary(c, boundary, tick.slot))

        def weight(g_params, sums, tick: _Tick):
            if fused or not self.train:
                return _Out(g_params, sums, self.blank(tick), tick.h)
            known, stashed, seed = inputs(tick)
            if not stashing:  # the whole pullback again, the input half dropped
                g_p, _ = self.split(_closure(stash.layouts[c], known, stashed)(seed), tick)
                return _Out(self.add(g_params, g_p), sums, self.blank(tick), tick.h)
            halves = self.split_backward(stash.layouts[c], known, stashed, tick)
            boundary = stash.boundary(c, tick.res, tick.slot)
            g_p = halves.weight_pass(*jax.tree.leaves((known, stashed, seed)), boundary_values=boundary)
            g_p = jax.tree.unflatten(jax.tree.structure(self.access.params(c)), g_p)
            return _Out(self.add(g_params, g_p), sums, self.blank(tick), tick.h)

        return [forward, backward, input_only, weight]  # in the order of ACTIONS


def _loop_body(plan: Plan, loop, branches, tables: _Tables, data, stage):
    """One iteration of a loop: its ``period`` ticks, each with its own pairs and its own branches
    (only those its ticks use are compiled in)."""
    ticks = [
        _tick_fn(plan, branches, tables, data, stage, loop.ticks[:, k], loop.rounds[k]) for k in range(len(loop.rounds))
    ]

    def body(carry: _Carry, row):
        for k, tick in enumerate(ticks):
            carry = tick(carry, row[k])
        return carry, None

    return body


def _tick_fn(plan: Plan, branches, tables: _Tables, data, stage, tick_ids: np.ndarray, rounds):
    """One tick: receive, act (each lane in turn: an overlapped pair's forward, then its backward), send
    (module docstring)."""
    x_bMx, y_bMx, w_bMx = data
    m_count = plan.schedule.microbatches
    ids_of = _example_ids(plan, x_bMx.shape[0])
    lanes = range(tables.branch_np.shape[-1])
    used = [np.unique(tables.branch_np[tick_ids, :, lane]).tolist() for lane in lanes]
    fill = jnp.nan if plan.poison else 0.0
    recv = np.concatenate([plan.transfers.recv_input[tick_ids], plan.transfers.recv_grad[tick_ids]])
    arrivals = 1 + max((a for a in range(recv.shape[2]) if (recv[:, :, a, 1] >= 0).any()), default=0)

    def lane_step(inputs, grads, carry: _Carry, t, lane: int) -> _Tick:
        m = jnp.clip(tables.microbatch[t, lane], 0, m_count - 1)
        return _Tick(
            _microbatch(x_bMx, m),
            _microbatch(y_bMx, m),
            _microbatch(w_bMx, m),
            inputs[jnp.maximum(tables.read_input[t, lane], 0)],
            grads[jnp.maximum(tables.read_grad[t, lane], 0)],
            ids_of(m),
            carry.residuals,
            tables.residual_slot[t, lane],
            tables.first_rows[t, lane],
        )

    def tick(carry: _Carry, t):
        inputs, grads = carry.inputs, carry.grads
        for a in range(arrivals):
            inputs = _receive(inputs, carry.arrived, tables.recv_input[t, a], plan.masked)
            grads = _receive(grads, carry.arrived, tables.recv_grad[t, a], plan.masked)
        sends, state = [], None
        for lane in lanes:
            step = lane_step(inputs, grads, carry, t, lane)
            blank = jnp.full(step.h.shape, fill, step.h.dtype)  # what an idle stage sends
            if state is None:
                state = _Out(carry.g_params, carry.sums, blank, step.h, carry.residuals)
            state = state._replace(send=blank)
            state = _run_action(tables.branch[t, lane], {i: branches[i] for i in used[lane]}, state, step)
            sends.append(state.send)
            if plan.fuse_last:
                inputs = inputs.at[jnp.maximum(tables.read_input[t, lane], 0)].set(state.keep)
        sent = tuple(
            jax.lax.ppermute(_lane_message(sends, tables.send_lane[t, r]), PIPE, list(pairs))
            for r, pairs in enumerate(rounds)
        )
        arrived = sent + carry.arrived[len(sent) :]
        return _Carry(inputs, grads, arrived, state.g_params, state.sums, state.res)

    return tick


def _lane_message(sends: list, lane) -> jax.Array:
    """The message of lane ``lane`` (a traced index) among one tick's ``sends``."""
    message = sends[0]
    for i in range(1, len(sends)):
        message = jnp.where(lane == i, sends[i], message)
    return message


def _run_action(index, actions: dict, state: _Out, step: _Tick) -> _Out:
    """Run ``actions[index]`` (``None``: idle) on ``state``, whose ``res`` holds the stash buffers.

    A ``lax.switch`` built of ``while`` loops that run once or not at all. Why not ``lax.switch``: XLA
    copies every buffer a conditional's branch returns unchanged (a forward's gradient sums, every tick)
    and keeps a branch's input and output buffers alive together; a loop updates its carry in place.
    """
    if len(actions) == 1:  # every stage takes this action at this tick
        (action,) = actions.values()
        return state if action is None else _apply(action, state, step)

    def once(i: int, action):
        def body(loop):
            k, state = loop
            # Tied to the trip count: else XLA hoists the action's work out of its loop, onto every tick.
            k, tick = jax.lax.optimization_barrier((k, step._replace(res=())))
            return k + 1, _apply(action, state, tick)

        trips = (index == i).astype(jnp.int32)
        return lambda state: jax.lax.while_loop(lambda loop: loop[0] < trips, body, (jnp.int32(0), state))[1]

    for i, action in actions.items():
        if action is not None:
            state = once(i, action)(state)
    return state


def _apply(action, state: _Out, tick: _Tick) -> _Out:
    """``action`` on ``state``, its residuals written into their stash slots."""
    out = action(state.g_params, state.sums, tick._replace(res=state.res))
    return out._replace(res=_Stash.write(state.res, out.res or {}))


def _receive(stash, arrived: tuple, recv, masked: bool):
    """Write the message of round ``recv[0]`` into slot ``recv[1]`` (none if ``-1``)."""
    round_, slot = recv[0], recv[1]
    message = arrived[0]
    for i in range(1, len(arrived)):
        message = jnp.where(round_ == i, arrived[i], message)
    index = jnp.maximum(slot, 0)
    if masked:
        message = jnp.where(slot >= 0, message, stash[index])
    return stash.at[index].set(message)


def _example_ids(plan: Plan, b: int):
    """Global ids of this device's ``b`` rows of micro-batch ``m`` (``split_microbatches`` takes every
    M-th): dropout masks follow the global id, so they are the same on any mesh and schedule."""
    m_count = plan.schedule.microbatches

    def ids(m):
        first = jax.lax.axis_index(plan.batch_axes) * b if plan.batch_axes else 0
        return m + m_count * (first + jnp.arange(b, dtype=jnp.int32))

    return ids


def _flatten_pad(h: jax.Array, plan: Plan) -> jax.Array:
    if plan.message_axes:  # declared split, one shape: no padding (see _message_axes)
        return _pin_message(constrain(h, plan.boundary_names).reshape(h.shape[0], -1).astype(plan.message_dtype), plan)
    flat = _whole(h.reshape(h.shape[0], -1).astype(plan.message_dtype))
    return _whole(jnp.pad(flat, ((0, 0), (0, plan.width - flat.shape[1]))))


def _unflatten(h_bxA: jax.Array, plan: Plan, c: int) -> jax.Array:
    boundary = plan.boundaries[c - 1]
    h = h_bxA[:, : math.prod(boundary.shape)].reshape(h_bxA.shape[0], *boundary.shape).astype(boundary.dtype)
    return constrain(h, plan.boundary_names) if plan.message_axes else _whole(h)


def _pin_message(x: jax.Array, plan: Plan) -> jax.Array:
    """A message (or a stash of them, ``[..., b, A]``) split along ``A`` over the plan's message axes, so
    a stage sends, receives and keeps only its share; left as it is without message axes."""
    if not plan.message_axes:
        return x
    spec = (None,) * (x.ndim - 1) + (plan.message_axes,)
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def _whole(x: jax.Array) -> jax.Array:
    """A chunk's input and output stay whole over the mesh axes left automatic (``tensor``).

    Why: left free, XLA may split a boundary activation of a model of your own along a feature or
    spatial dimension (a flat message reshaped to an image splits its height), and then exchange halos
    with collective-permutes inside the stage's action loop, which XLA:CPU cannot run there (every
    permute waits for all devices, only the stage's run the action). Megatron-style layers
    already end whole: their collective counts are unchanged (``tests/test_pipeline.py`` asserts them).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not any(mesh.shape[axis] > 1 for axis in mesh.auto_axes):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())
