"""What a chunk's forward keeps for its backward: the residuals of its ``jax.vjp`` closure, in slots.

A forward runs its chunk under ``jax.vjp``; the closure's leaves are either values every action of the
micro-batch has anyway (the chunk's parameters, its input, the tick's data and key) or *residuals*,
which the forward stashes until its backward. :func:`find_residuals` tells them apart once, before the
loop, from the structure of the traced program: a closure leaf that the jaxpr returns as one of its
inputs is that input, anything else is a residual. The backward rebuilds the closure
(:func:`closure_from`) from the values it has and the stashed residuals, so nothing is re-run unless the
remat policy kept less.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmp.config import ConfigError


class ClosureLayout(NamedTuple):
    """How a chunk's ``jax.vjp`` closure is rebuilt in its backward: which leaves are values the
    backward has anyway (its parameters, its input, the tick's data) and which come from the stash."""

    treedef: object
    where: tuple[int, ...]  # per closure leaf: >= 0 index into the known values; -1 - j: stashed leaf j
    stashed: tuple[jax.ShapeDtypeStruct, ...]
    out: object  # the chunk's outputs (ShapeDtypeStructs): the structure of the backward's seed
    boundary: tuple[jax.ShapeDtypeStruct, ...] = ()  # what B stashes for W (:mod:`.backward_split`)


class ResidualStash(NamedTuple):
    """The residual stash: per (shape, dtype), one array ``[count, slots, *shape]`` shared by the chunks
    of one stage's branches.

    ``count`` is the most leaves of that kind one chunk stashes (a chunk's leaves may sit in rows another
    chunk uses in other slots, never in the same slot). Each residual keeps its own shape, so a residual
    split over ``tensor`` stays split. One array per kind, not one per leaf: XLA would fill one buffer
    and copy it into each of the others."""

    kinds: tuple[tuple[jax.ShapeDtypeStruct, int], ...]  # (kind, count)
    layouts: dict  # chunk -> ClosureLayout
    rows_of: dict  # chunk -> per stashed leaf, its (kind, row)
    boundary_of: dict  # chunk -> per boundary value (B to W), its (kind, row)

    @staticmethod
    def of(layouts: dict) -> ResidualStash:
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
        return ResidualStash(tuple((kind, count) for (_, kind), count in kinds.items()), layouts, rows_of, boundary_of)

    def empty(self, slots: int, poison: bool) -> tuple:
        def fill(kind, count):
            value = jnp.nan if poison and jnp.issubdtype(kind.dtype, jnp.floating) else 0
            return jnp.full((count, slots, *kind.shape), value, kind.dtype)

        return tuple(fill(kind, count) for kind, count in self.kinds)

    def put(self, c: int, vjp, slot) -> dict:
        """``(kind, row)`` -> ``(value, slot)``: chunk ``c``'s stashed closure leaves to write into ``slot``,
        taken by their position in the closure (:func:`find_residuals`)."""
        layout = self.layouts[c]
        leaves = jax.tree.leaves(vjp)  # its treedef holds the traced function: equal in form, not in identity
        stashed = [leaf for leaf, w in zip(leaves, layout.where, strict=False) if w < 0]
        shapes = [(x.shape, x.dtype) for x in stashed]
        if len(leaves) != len(layout.where) or shapes != [(x.shape, x.dtype) for x in layout.stashed]:
            raise AssertionError(f"chunk {c}: the forward's closure differs from the one traced before the loop")
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


def closure_from(layout: ClosureLayout, known: list, stashed: list):
    """A chunk's ``jax.vjp`` closure, from the values its backward has and its stashed residuals."""
    leaves = [known[w] if w >= 0 else stashed[-1 - w] for w in layout.where]
    return jax.tree.unflatten(layout.treedef, leaves)


def find_residuals(closure: Callable, known: list) -> tuple[object, tuple[int, ...], list, object]:
    """``(treedef, where, stashed shapes, outputs)`` of ``closure(known) -> (outputs, vjp closure)``,
    traced at the shapes ``known``: per closure leaf, ``where`` holds the index of the known value the
    jaxpr returns it as, or ``-1 - j`` for the ``j``-th leaf to stash.

    Why the jaxpr and not object identity: "this leaf is that input" is then a fact of the traced
    program (its output variable is its input variable), the same in every trace of it.
    """
    found = {}

    def leaves(known):
        outputs, vjp = closure(known)
        found["treedef"], found["outputs"] = jax.tree.structure(vjp), outputs
        return jax.tree.leaves(vjp)

    traced = jax.make_jaxpr(leaves, return_shape=True)
    jaxpr, shapes = traced(known)
    inputs = jaxpr.jaxpr.invars
    where, stashed = [], []
    for var, shape in zip(jaxpr.jaxpr.outvars, shapes, strict=True):
        source = next((i for i, x in enumerate(inputs) if x is var), None)  # the jaxpr's own variable
        if source is not None:
            where.append(source)
            continue
        if jax.dtypes.issubdtype(shape.dtype, jax.dtypes.prng_key):
            raise ConfigError("a layer keeps a PRNG key for its backward; derive its keys from ctx.key")
        where.append(-1 - len(stashed))
        stashed.append(shape)
    outputs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), found["outputs"])
    return found["treedef"], tuple(where), stashed, outputs
