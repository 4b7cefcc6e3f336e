"""A chunk's backward cut in two, ``B`` (input cotangent) and ``W`` (weight gradient), sharing its work.

Why: in a zero-bubble table (Qi et al. 2024) ``W`` runs ticks after ``B``. Running the whole pullback
in each and keeping only one output makes ``W`` redo the chain of input cotangents that ``B`` already
computed (every weight of an early layer needs the cotangent pulled back through the later ones). Here
the pullback is traced once to a jaxpr and its equations are split: ``B`` runs those its input
cotangent needs and also returns the *boundary*, the values it computed that ``W``'s own equations read
(the cotangents at each weight's use); ``W`` runs only the equations left, from the boundary. The
executor stashes the boundary from ``B`` to ``W`` in the micro-batch's residual slot.

Nested ``jit`` and ``checkpoint`` calls are inlined first, so the split sees the layers' operations; a
``lax.scan`` over layers stays one equation, which ``W`` then runs whole (short stacks are unrolled by
default, see :func:`jaxmp.pipeline.engine._unrolls`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
from jax.extend.core import Literal

INLINED = ("jit", "pjit", "closed_call", "core_call", "checkpoint", "remat", "remat2")


class SplitBackward(NamedTuple):
    """``input_pass(*args) -> (b_outs, boundary)`` and ``weight_pass(*args, boundary) -> w_outs``."""

    input_pass: Callable
    weight_pass: Callable
    boundary: tuple[jax.ShapeDtypeStruct, ...]


class _Flat(NamedTuple):
    """The equations of a jaxpr with nested calls inlined. A variable is keyed by ``(frame, var)``, the
    frame being the call it belongs to, since one traced function called twice shares its variables."""

    eqns: list  # (equation, frame) in order
    alias: dict  # key -> the key or literal it stands for (an inlined call's inputs and outputs)
    consts: dict  # key -> value (the jaxprs' constants)

    def key(self, frame: int, atom):
        if isinstance(atom, Literal):
            return atom
        return self.alias.get((frame, atom), (frame, atom))


def split_backward(fn: Callable, args: list, weight_outputs: int) -> SplitBackward:
    """Split ``fn(*args) -> [weight gradients..., other outputs...]`` (``weight_outputs`` of the first)."""
    closed = jax.make_jaxpr(fn)(*args)
    flat = _flatten(closed)
    outs = [flat.key(0, v) for v in closed.jaxpr.outvars]
    w_outs, b_outs = outs[:weight_outputs], outs[weight_outputs:]
    need_b, need_w = _needed(flat, b_outs), _needed(flat, w_outs)
    b_eqns = [item for i, item in enumerate(flat.eqns) if i in need_b]
    w_eqns = [item for i, item in enumerate(flat.eqns) if i in need_w and i not in need_b]
    made_by_b = {(frame, v) for eqn, frame in b_eqns for v in eqn.outvars}
    read_by_w = [flat.key(frame, v) for eqn, frame in w_eqns for v in eqn.invars] + w_outs
    boundary = list(dict.fromkeys(k for k in read_by_w if not isinstance(k, Literal) and k in made_by_b))
    invars = [(0, v) for v in closed.jaxpr.invars]

    def input_pass(*values):
        env = _run(flat, b_eqns, dict(zip(invars, values, strict=True)))
        return [_read(flat, env, k) for k in b_outs], [env[k] for k in boundary]

    def weight_pass(*values, boundary_values):
        env = dict(zip(invars, values, strict=True)) | dict(zip(boundary, boundary_values, strict=True))
        env = _run(flat, w_eqns, env)
        return [_read(flat, env, k) for k in w_outs]

    shapes = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for _, v in boundary)
    return SplitBackward(input_pass, weight_pass, shapes)


def _flatten(closed) -> _Flat:
    """``closed``'s equations with nested calls (:data:`INLINED`) replaced by their own equations."""
    flat = _Flat([], {}, {(0, v): c for v, c in zip(closed.jaxpr.constvars, closed.consts, strict=True)})
    frames = [0]

    def visit(inner, frame: int):
        for eqn in inner.eqns:
            sub = eqn.params.get("jaxpr") if eqn.primitive.name in INLINED else None
            if sub is None:
                flat.eqns.append((eqn, frame))
                continue
            body, frames[0] = getattr(sub, "jaxpr", sub), frames[0] + 1
            callee = frames[0]
            for var, value in zip(body.constvars, getattr(sub, "consts", ()), strict=True):
                flat.consts[(callee, var)] = value
            for var, atom in zip(body.invars, eqn.invars, strict=True):
                flat.alias[(callee, var)] = flat.key(frame, atom)
            visit(body, callee)
            for var, atom in zip(eqn.outvars, body.outvars, strict=True):
                flat.alias[(frame, var)] = flat.key(callee, atom)

    visit(closed.jaxpr, 0)
    return flat


def _needed(flat: _Flat, outs: list) -> set[int]:
    """Indices of the equations that ``outs`` depend on (dead-code elimination, backwards)."""
    live = {k for k in outs if not isinstance(k, Literal)}
    needed = set()
    for i in range(len(flat.eqns) - 1, -1, -1):
        eqn, frame = flat.eqns[i]
        if any((frame, v) in live for v in eqn.outvars):
            needed.add(i)
            live.update(k for k in (flat.key(frame, v) for v in eqn.invars) if not isinstance(k, Literal))
    return needed


def _read(flat: _Flat, env: dict, key):
    if isinstance(key, Literal):
        return key.val
    return env[key] if key in env else flat.consts[key]


def _run(flat: _Flat, eqns: list, env: dict) -> dict:
    """Evaluate ``eqns`` in order (as ``jax.core.eval_jaxpr`` does), reading and extending ``env``."""
    env = dict(env)
    for eqn, frame in eqns:
        params = eqn.primitive.get_bind_params(eqn.params)
        subfuns, params = params if isinstance(params, tuple) else ((), params)  # jax < 0.10 returned a pair
        inputs = [_read(flat, env, flat.key(frame, v)) for v in eqn.invars]
        with eqn.ctx.manager:
            values = eqn.primitive.bind(*subfuns, *inputs, **params)
        values = values if eqn.primitive.multiple_results else [values]
        env.update(((frame, v), x) for v, x in zip(eqn.outvars, values, strict=True))
    return env
