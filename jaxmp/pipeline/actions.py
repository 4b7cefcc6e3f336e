"""A chunk's actions: its forward ``F``, whole backward ``B``, input-cotangent backward ``I`` and weight
gradient ``W``, each a function ``(gradient sums, head sums, tick) -> Outcome`` that one tick runs.

The forward runs the chunk under ``jax.vjp`` and keeps its closure's residuals in a slot
(:mod:`.residuals`); its backward rebuilds the closure and pulls the output cotangent through it. The
first chunk reads the micro-batch itself, the last runs the head (loss) on its output. Chunks of the
same layout (the middle of a stack) share one set of traced actions (:func:`branch_keys`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmp.models.contract import apply_part
from jaxmp.models.layers import LayerContext
from jaxmp.parallel.rules import constrain
from jaxmp.pipeline.backward_split import SplitBackward, split_backward
from jaxmp.pipeline.packing import Packing
from jaxmp.pipeline.plan import Head, Plan
from jaxmp.pipeline.residuals import ClosureLayout, ResidualStash, closure_from, find_residuals


class Tick(NamedTuple):
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


class Outcome(NamedTuple):
    """What an action gives back to its tick."""

    g_params: dict
    sums: dict
    send: jax.Array  # [b, A] the activation sent on or the input cotangent sent back (blank if none)
    keep: jax.Array  # [b, A] written back into the input's stash slot (fused last chunk: its cotangent)
    res: dict | None = None  # (kind, row) -> (value, slot) to write into the stash (a forward's residuals)


class StageParams(NamedTuple):
    """How the actions read a chunk's parameters and add up its gradients.

    The pieces every stage has at the same offsets (:meth:`Packing.shared_params`: a stack split evenly;
    on one stage, everything) are unpacked once per step, a short stack already cut into its layers
    (:func:`unrolls`), and their gradients summed in the layer tree, packed once after the loop: as fast
    as a plain step. The other pieces (``pre``, ``post``, layers of their own) are unpacked by each action
    from the stage buffers and added into them segment by segment: the only form with one shape on every
    stage.
    """

    packing: Packing
    local: dict  # this device's buffers, manual tiles gathered
    manual: frozenset
    shared: dict  # signature -> unpacked tree (a list of one tree per layer for an unrolled stack)

    @staticmethod
    def of(plan: Plan, local: dict, manual: frozenset) -> StageParams:
        shared = plan.packing.shared_params(local, manual)
        for sig, tree in shared.items():
            rows = sig[-1]
            if rows is not None and unrolls(plan, rows):
                shared[sig] = [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(rows)]
        return StageParams(plan.packing, local, manual, shared)

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


def unrolls(plan: Plan, rows: int) -> bool:
    """Whether a chunk runs ``rows`` stacked layers unrolled inside its tick (the tick loop stays rolled:
    compile time flat in M). Inside the tick loop, a ``lax.scan`` over layers costs XLA:CPU a slice of
    every layer's weights and a zeroed gradient stack per action, a large share of a micro-batch's work;
    unrolled, a short stack is cut into its layers once per step. Each distinct chunk program (first,
    middle, last; :func:`branch_keys`) compiles its own copies, so the rows times the programs must stay
    within ``UNROLLED_LAYERS``: compile time then stays flat in depth. ``--unroll`` unrolls every stack and
    the tick loops."""
    return plan.unroll or rows * len(set(branch_keys(plan))) <= UNROLLED_LAYERS


def most_pieces(plan: Plan) -> int:
    return max(len(chunk.pieces) for chunk in plan.packing.chunks)


def branch_keys(plan: Plan) -> list:
    """One key per chunk: chunks with the same layout (the middle of a stack) share one branch."""
    keys = []
    last = len(plan.packing.chunks) - 1
    for c, chunk in enumerate(plan.packing.chunks):
        pieces = tuple((p.part.name, None if p.rows is None else p.rows[1] - p.rows[0]) for p in chunk.pieces)
        slots = tuple((s.buffer, s.offset, s.tile.shape) for s in chunk.slots)
        keys.append((pieces, slots, c == 0, c == last))
    return keys


def sample_tick(plan: Plan, x_bMx, y_bMx, w_bMx) -> Tick:
    """The shapes one tick's action reads (to trace an action before the loop)."""
    b = x_bMx.shape[0]
    flat = jax.ShapeDtypeStruct((b, plan.width), plan.message_dtype)
    ids = jax.ShapeDtypeStruct((b,), jnp.int32)
    data = (jax.ShapeDtypeStruct((b, *a.shape[2:]), a.dtype) for a in (x_bMx, y_bMx, w_bMx))
    first_rows = jax.ShapeDtypeStruct((most_pieces(plan),), jnp.int32)
    return Tick(*data, flat, flat, ids, first_rows=first_rows)


def branches(plan: Plan, access: StageParams, head: Head, train: bool, key, sample: Tick, fill: float):
    """``([None (idle), F, B, I, W (chunk), ...], stash)``, each action ``(g_params, sums, tick) -> Outcome``;
    ``fill`` is what an action sends when it has nothing to send."""
    keys = branch_keys(plan)
    first_chunk = {k: keys.index(k) for k in dict.fromkeys(keys)}
    chunks = {c: ChunkActions(plan, c, access, head, train, key, fill) for c in first_chunk.values()}
    stashing = plan.transfers.residual_slots > 0 and train
    stash = ResidualStash.of(
        {
            c: chunk.closure_layout(sample)
            for c, chunk in chunks.items()
            if stashing and not (chunk.last and plan.fuse_last)
        }
    )

    branches = [None]
    for chunk in chunks.values():
        branches += chunk.actions(stash)
    return branches, stash


class ChunkActions:
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

    def __init__(self, plan: Plan, c: int, access: StageParams, head: Head, train: bool, key, fill: float):
        self.plan, self.c, self.access, self.head, self.train, self.key = plan, c, access, head, train, key
        self.last = c == len(plan.packing.chunks) - 1
        self.fill = fill

    def apply(self, params, h, tick: Tick, key):
        """The chunk from its input (the micro-batch for chunk 0) to its flat output, or to the head."""
        plan, c = self.plan, self.c
        ctx = LayerContext(self.train, key, tick.ids)
        if c > 0:
            h = unflatten(h, plan, c)
        for j, (piece, piece_params) in enumerate(zip(plan.packing.chunks[c].pieces, params, strict=True)):
            unroll = piece.rows is not None and unrolls(plan, piece.rows[1] - piece.rows[0])
            # the running chunk's rows, from the table: chunks of one layout share this traced branch
            h = apply_part(piece.part, piece_params, h, ctx, unroll=unroll, first=tick.first_rows[j])
        if self.last:
            return self.head(h, tick.y, tick.weights)
        return flatten_pad(h, plan)

    def primal(self, tick: Tick):
        return tick.x if self.c == 0 else tick.h

    def known(self, params, tick: Tick) -> list:
        """Values every action of this micro-batch has without the stash."""
        return [*jax.tree.leaves(params), tick.x, tick.h, tick.y, tick.weights, tick.ids, self.key, tick.first_rows]

    def _from_known(self, known: list, sample: Tick):
        """``(params, tick, key)`` back from :meth:`known`'s list."""
        count = len(jax.tree.leaves(self.access.params(self.c)))
        params = jax.tree.unflatten(jax.tree.structure(self.access.params(self.c)), known[:count])
        x, h, y, weights, ids, key, first_rows = known[count:]
        return params, sample._replace(x=x, h=h, y=y, weights=weights, ids=ids, first_rows=first_rows), key

    def linearize(self, params, tick: Tick, key):
        """``(outputs, vjp closure)``: the closure takes the output cotangent to the parameter cotangents
        (and, past chunk 0, the input cotangent)."""
        h = self.primal(tick)
        fn = jax.checkpoint(lambda p, h: self.apply(p, h, tick, key), policy=self.plan.policy, prevent_cse=False)
        if self.c == 0:
            return jax.vjp(lambda p: fn(p, h), params)
        return jax.vjp(fn, params, h)

    def closure_layout(self, sample: Tick) -> ClosureLayout:
        """Trace the forward once (shapes only) to find which closure leaves must be stashed."""
        known = jax.eval_shape(lambda tick: self.known(self.access.params(self.c), tick), sample)

        def closure(known):
            return self.linearize(*self._from_known(known, sample))

        treedef, where, stashed, out = find_residuals(closure, known)
        layout = ClosureLayout(treedef, where, tuple(stashed), out)
        if not self.plan.stash_cotangents:
            return layout
        return layout._replace(boundary=self.split_backward(layout, known, list(stashed), sample).boundary)

    def split_backward(self, layout: ClosureLayout, known: list, stashed: list, tick: Tick) -> SplitBackward:
        """The backward as ``B`` and ``W`` that share its work (:mod:`.backward_split`), traced from the
        shapes of its inputs: the values every action has, the stashed residuals and the seed."""

        def backward(known, stashed, seed):
            cotangents = closure_from(layout, known, stashed)(seed)
            return [*jax.tree.leaves(cotangents[0]), *cotangents[1:]]

        shapes = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (known, stashed, self.seed(layout.out, tick))
        )
        count = len(jax.tree.leaves(self.access.params(self.c)))
        return split_backward(backward, list(shapes), count)

    def blank(self, tick: Tick):
        return jnp.full(tick.h.shape, self.fill, tick.h.dtype)

    def seed(self, out, tick: Tick):
        """The output cotangent: the loss's for the last chunk, the one that arrived otherwise."""
        if self.last:
            return jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), out) | {"loss": jnp.ones_like(out["loss"])}
        return tick.g

    def split(self, cotangents, tick: Tick):
        """``(parameter cotangents, input cotangent or blank)``."""
        if self.c == 0:
            return cotangents[0], self.blank(tick)
        return cotangents[0], cotangents[1].astype(tick.h.dtype)

    def add(self, g_params, g_p):
        return self.access.add(self.c, g_params, g_p)

    @property
    def fused(self) -> bool:
        """The last chunk's forward also runs its backward (:func:`.plan.fuses_last_chunk`)."""
        return self.last and self.plan.fuse_last and self.train

    def actions(self, stash: ResidualStash) -> list:
        """``[F, B, I, W]`` (the order of :data:`.ticks.ACTIONS`), each ``(g_params, sums, tick) -> Outcome``,
        keeping and reading residuals in ``stash``."""
        self.stash = stash
        return [self.forward, self.backward, self.input_only, self.weight]

    def forward(self, g_params, sums, tick: Tick) -> Outcome:
        """``F``: the chunk under ``jax.vjp``, its residuals written to the tick's slot (evaluation: just
        the chunk); the last chunk adds its head's sums."""
        c, params = self.c, self.access.params(self.c)
        if not self.train:
            out = self.apply(params, self.primal(tick), tick, self.key)
            if self.last:
                return Outcome(g_params, jax.tree.map(jnp.add, sums, out), self.blank(tick), tick.h)
            return Outcome(g_params, sums, out, tick.h)
        out, vjp = self.linearize(params, tick, self.key)
        if self.fused:
            g_p, g_h = self.split(vjp(self.seed(out, tick)), tick)
            keep = g_h if c > 0 else tick.h
            return Outcome(self.add(g_params, g_p), jax.tree.map(jnp.add, sums, out), self.blank(tick), keep)
        res = self.stash.put(c, vjp, tick.slot)
        if self.last:
            return Outcome(g_params, jax.tree.map(jnp.add, sums, out), self.blank(tick), tick.h, res)
        return Outcome(g_params, sums, out, tick.h, res)

    def _pullback_inputs(self, tick: Tick):
        """``(known, stashed, seed)``: what the backward of this micro-batch starts from."""
        known = self.known(self.access.params(self.c), tick)
        stashed = self.stash.stashed(self.c, tick.res, tick.slot)
        return known, stashed, self.seed(self.stash.layouts[self.c].out, tick)

    def _pullback(self, tick: Tick):
        """``(parameter cotangents, input cotangent)``: the rebuilt closure pulled back once."""
        known, stashed, seed = self._pullback_inputs(tick)
        return self.split(closure_from(self.stash.layouts[self.c], known, stashed)(seed), tick)

    def _nothing_to_pull(self, g_params, sums, tick: Tick, send) -> Outcome | None:
        """Evaluation runs no backward; the fused last chunk's forward did it (its cotangent is in the
        input's slot, ``send`` says whether this action sends it)."""
        if not self.fused and self.train:
            return None
        return Outcome(g_params, sums, tick.h if self.fused and send else self.blank(tick), tick.h)

    def backward(self, g_params, sums, tick: Tick) -> Outcome:
        """``B``: the whole backward, the input cotangent sent on and the weight gradient added."""
        if (done := self._nothing_to_pull(g_params, sums, tick, send=True)) is not None:
            return done
        g_p, g_h = self._pullback(tick)
        return Outcome(self.add(g_params, g_p), sums, g_h, tick.h)

    def input_only(self, g_params, sums, tick: Tick) -> Outcome:
        """``I``: the input cotangent only; its ``W`` adds the weight gradient later."""
        if (done := self._nothing_to_pull(g_params, sums, tick, send=True)) is not None:
            return done
        if not self.plan.stash_cotangents:  # XLA drops the weight half of this pullback
            return Outcome(g_params, sums, self._pullback(tick)[1], tick.h)
        known, stashed, seed = self._pullback_inputs(tick)
        halves = self.split_backward(self.stash.layouts[self.c], known, stashed, tick)
        g_h, boundary = halves.input_pass(*jax.tree.leaves((known, stashed, seed)))
        g_h = g_h[0].astype(tick.h.dtype) if self.c > 0 else self.blank(tick)
        return Outcome(g_params, sums, g_h, tick.h, self.stash.put_boundary(self.c, boundary, tick.slot))

    def weight(self, g_params, sums, tick: Tick) -> Outcome:
        """``W``: the weight gradient of an earlier ``I``, from the residuals again (``--weight-pass
        recompute``: XLA drops the input half) or from what ``I`` stashed (``stash``)."""
        if (done := self._nothing_to_pull(g_params, sums, tick, send=False)) is not None:
            return done
        if not self.plan.stash_cotangents:
            return Outcome(self.add(g_params, self._pullback(tick)[0]), sums, self.blank(tick), tick.h)
        known, stashed, seed = self._pullback_inputs(tick)
        halves = self.split_backward(self.stash.layouts[self.c], known, stashed, tick)
        boundary = self.stash.boundary(self.c, tick.res, tick.slot)
        g_p = halves.weight_pass(*jax.tree.leaves((known, stashed, seed)), boundary_values=boundary)
        g_p = jax.tree.unflatten(jax.tree.structure(self.access.params(self.c)), g_p)
        return Outcome(self.add(g_params, g_p), sums, self.blank(tick), tick.h)


def flatten_pad(h: jax.Array, plan: Plan) -> jax.Array:
    if plan.message_axes:  # declared split, one shape: no padding (see _message_axes)
        return pin_message(constrain(h, plan.boundary_names).reshape(h.shape[0], -1).astype(plan.message_dtype), plan)
    flat = whole(h.reshape(h.shape[0], -1).astype(plan.message_dtype))
    return whole(jnp.pad(flat, ((0, 0), (0, plan.width - flat.shape[1]))))


def unflatten(h_bxA: jax.Array, plan: Plan, c: int) -> jax.Array:
    boundary = plan.boundaries[c - 1]
    h = h_bxA[:, : math.prod(boundary.shape)].reshape(h_bxA.shape[0], *boundary.shape).astype(boundary.dtype)
    return constrain(h, plan.boundary_names) if plan.message_axes else whole(h)


def pin_message(x: jax.Array, plan: Plan) -> jax.Array:
    """A message (or a stash of them, ``[..., b, A]``) split along ``A`` over the plan's message axes, so
    a stage sends, receives and keeps only its share; left as it is without message axes."""
    if not plan.message_axes:
        return x
    spec = (None,) * (x.ndim - 1) + (plan.message_axes,)
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def whole(x: jax.Array) -> jax.Array:
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
