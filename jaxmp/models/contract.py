"""The model contract: a model is a list of layers, with optional parts before and after.

What jaxmp needs from a model (presets and users' own models alike)::

    class MyModel(nnx.Module):
        def __init__(self, rngs):
            self.pre = Flatten()                      # optional: runs first, on the raw inputs
            self.layers = nnx.List([Block(rngs=rngs), Stacked(make_block, 8, rngs=rngs), Head(rngs=rngs)])
            self.post = None                          # optional: runs last, gives the logits

Every part is an ``nnx.Module`` called as ``part(h, ctx)`` (``ctx``: :class:`LayerContext`, the train
flag, the dropout key and the global example ids). A :class:`Stacked` layer counts as ``depth`` layers
when the pipeline splits the model. Every parameter lives in ``pre``, ``layers`` or ``post``.

Tied parameters: two parts may hold the same ``nnx.Param`` object (a head that reuses the embedding
table: ``self.post = Head(table=self.pre.tokens)``). It is stored once, where ``nnx.state`` puts it;
its other uses are *aliases* (:attr:`ModelParts.ties`), and its gradient is the sum over every use.

Why a list and not a ``__call__``: the pipeline must cut the model between layers, give each stage the
parameters of its layers only, and re-run one chunk of layers at a time for the backward pass. A list
says where the cuts may go; the layer count comes from the list, with no dispatch by index.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp.config import ConfigError, first_line
from jaxmp.models.layers import LayerContext, Stacked, layer_context, scan_layers


class Part(NamedTuple):
    """One callable piece of a model: ``pre``, ``post``, a layer, or a stack of identical layers."""

    name: str  # "pre", "layers.3", "post"
    key: tuple  # where its parameters sit in the model's pure-dict parameter tree
    graphdef: nnx.GraphDef  # of the module applied (the single layer, for a stack)
    depth: int | None  # layers in a stack, None for a plain part


class ModelParts(NamedTuple):
    """A model cut into its parts, and its layers as units (a stack of depth L is L units)."""

    pre: Part | None
    layers: list[Part]
    post: Part | None
    ties: tuple[tuple[tuple, tuple], ...] = ()  # (alias key, stored key) of each parameter two parts share

    @property
    def units(self) -> list[tuple[int, int]]:
        """``(layer index, position in its stack)`` of every unit, in order."""
        return [(i, k) for i, part in enumerate(self.layers) for k in range(part.depth or 1)]

    def parts(self) -> list[Part]:
        """Every part in the order data flows through them: ``pre``, the layers, ``post``."""
        return [p for p in (self.pre, *self.layers, self.post) if p is not None]

    def unit_names(self) -> list[str]:
        return [self.layers[i].name + (f"[{k}]" if self.layers[i].depth else "") for i, k in self.units]

    def with_ties(self, tree: dict) -> dict:
        """``tree`` (parameters, shapes or specs, as saved) with each tied parameter also at its aliases,
        so that every part finds all of its parameters under its own key (an alias already there is kept:
        the tool to tell the uses' gradients apart)."""
        for alias, stored in self.ties:
            if not _has_leaf(tree, alias):
                tree = _with_leaf(tree, alias, sub_params(tree, stored))
        return tree

    def without_ties(self, tree: dict) -> dict:
        """The inverse of :meth:`with_ties`: the aliases dropped (the saved form)."""
        for alias, _ in self.ties:
            tree = _without_leaf(tree, alias)
        return tree


def model_parts(model: nnx.Module) -> ModelParts:
    """Check ``model`` against the contract and cut it into its parts.

    Raises:
      ConfigError: no layer list, a part that is not a module, a parameter outside the parts, or a
        stack whose parameters do not carry the ``layers`` axis or do not stack; one line names the part.
    """
    name = type(model).__name__
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list | tuple | nnx.List) or len(layers) == 0:
        raise ConfigError(
            f"model {name} has no layer list: give it self.layers = nnx.List([...]) of modules called as "
            "layer(h, ctx), with optional self.pre and self.post."
        )
    parts = []
    for i, layer in enumerate(layers):
        parts.append(_part(layer, f"layers.{i}", ("layers", i), name))
    pre, post = (getattr(model, p, None) for p in ("pre", "post"))
    result = ModelParts(
        _part(pre, "pre", ("pre",), name) if pre is not None else None,
        parts,
        _part(post, "post", ("post",), name) if post is not None else None,
    )
    _check_every_param_in_a_part(model, name)
    return result._replace(ties=_ties(model, result, name))


def _ties(model: nnx.Module, parts: ModelParts, model_name: str) -> tuple[tuple[tuple, tuple], ...]:
    """``(alias key, stored key)`` of every parameter a part holds under a key other than its stored one."""
    stored = {id(v): path for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    stacks = [part.key for part in parts.layers if part.depth is not None]

    def in_stack(key: tuple) -> bool:
        return any(key[: len(stack)] == stack for stack in stacks)

    ties = []
    for part in parts.parts():
        for path, variable in nnx.to_flat_state(nnx.state(sub_module(model, part.key), nnx.Param)):
            alias, key = (*part.key, *path), stored[id(variable)]
            if alias == key:
                continue
            if in_stack(alias) or in_stack(key):
                raise ConfigError(
                    f"model {model_name}: {'.'.join(map(str, alias))} is the parameter {'.'.join(map(str, key))}, "
                    "and a Stacked layer holds it; each layer of a stack needs its own (tie outside stacks)."
                )
            ties.append((alias, key))
    return tuple(ties)


def sub_module(model: nnx.Module, key: tuple) -> nnx.Module:
    """The module at ``key`` (a part's key: ``("layers", 2)``, ``("layers", 0, "layer")``)."""
    for k in key:
        model = model[k] if isinstance(k, int) else getattr(model, k)
    return model


def _part(module, part_name: str, key: tuple, model_name: str) -> Part:
    if not isinstance(module, nnx.Module):
        raise ConfigError(
            f"model {model_name}: {part_name} is a {type(module).__name__}, not an nnx.Module called as part(h, ctx)."
        )
    if not isinstance(module, Stacked):
        return Part(part_name, key, nnx.graphdef(module), None)
    _check_stack(module, part_name, model_name)
    return Part(part_name, (*key, "layer"), nnx.graphdef(module.layer), module.depth)


def _check_stack(stack: Stacked, part_name: str, model_name: str) -> None:
    for path, variable in nnx.to_flat_state(nnx.state(stack.layer, nnx.Param)):
        names = tuple(variable.get_metadata().get("out_sharding") or ())
        shape = variable.get_value().shape
        where = f"model {model_name}: {part_name}.layer.{'.'.join(map(str, path))}"
        if not names or names[0] != "layers":
            raise ConfigError(f"{where} is stacked but its first axis is not named 'layers' (names {names}).")
        if not shape or shape[0] != stack.depth:
            raise ConfigError(
                f"{where} has shape {tuple(shape)}; a stack of {stack.depth} layers needs a leading axis of "
                f"{stack.depth} (its layers' shapes do not stack)."
            )


def _check_every_param_in_a_part(model: nnx.Module, model_name: str) -> None:
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] not in ("pre", "layers", "post"):
            raise ConfigError(
                f"model {model_name}: parameter {'.'.join(map(str, path))} is outside pre, layers and post; "
                "the pipeline could not place it."
            )


def sub_params(params: dict, key: tuple):
    """The parameters of the part at ``key`` in a pure-dict parameter tree (``{}`` if it has none)."""
    for k in key:
        if not isinstance(params, dict) or k not in params:
            return {}
        params = params[k]
    return params


def apply_part(
    part: Part, params, h: jax.Array, ctx: LayerContext, *, unroll: bool = False, policy=None, first: int = 0
):
    """Run one part on ``h``; for a stack, ``params`` holds any contiguous run of its layers from
    position ``first``, stacked or as a list of one tree per layer (run in order, unrolled)."""
    if part.depth is None:
        return nnx.merge(part.graphdef, params)(h, ctx)
    if isinstance(params, list):
        for k, layer_params in enumerate(params):
            h = nnx.merge(part.graphdef, layer_params)(h, layer_context(ctx, first + k))
        return h
    return scan_layers(part.graphdef, params, h, ctx, unroll=unroll, policy=policy, first=first)


def apply_model(parts: ModelParts, params: dict, x: jax.Array, ctx: LayerContext) -> jax.Array:
    """The model as one function: ``post(layers(pre(x)))``, layer after layer (a tied parameter read by
    each of its parts, so its gradient sums over them)."""
    params, h = parts.with_ties(params), x
    for part in (parts.pre, *parts.layers, parts.post):
        if part is not None:
            h = apply_part(part, sub_params(params, part.key), h, ctx)
    return h


def _has_leaf(tree: dict, key: tuple) -> bool:
    for k in key:
        if not isinstance(tree, dict) or k not in tree:
            return False
        tree = tree[k]
    return True


def _with_leaf(tree: dict, key: tuple, value) -> dict:
    """A copy of ``tree`` with ``value`` at ``key`` (the dicts on the way copied, ``tree`` untouched)."""
    head, *rest = key
    inner = _with_leaf(tree.get(head, {}), tuple(rest), value) if rest else value
    return {**tree, head: inner}


def _without_leaf(tree: dict, key: tuple) -> dict:
    """A copy of ``tree`` without the leaf at ``key``, and without the dicts that leaves empty."""
    head, *rest = key
    out = dict(tree)
    inner = _without_leaf(tree[head], tuple(rest)) if rest else {}
    if inner:
        out[head] = inner
    else:
        del out[head]
    return out


def part_bytes(params: dict, part: Part, stack_len: int | None = None) -> int:
    """Parameter bytes of a part (``stack_len`` layers of it, for a stack)."""
    leaves = jax.tree.leaves(sub_params(params, part.key))
    total = sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)
    return total * (stack_len or 1) // (part.depth or 1)


def load_model_fn(spec: str) -> Callable:
    """``FILE.py:NAME`` or ``MODULE:NAME`` (``--model-fn``) -> the callable it names; ``ConfigError``
    naming what is missing."""
    import importlib
    import importlib.util
    import os

    where, _, name = spec.rpartition(":")
    flag = f"--model-fn {spec!r}"
    if where.endswith(".py") and not os.path.isfile(where):
        raise ConfigError(f"{flag}: {where} is not a file.")
    try:
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(os.path.basename(where)[:-3], where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as error:  # the user's file: name it and its first line of trouble
        raise ConfigError(f"{flag}: cannot import {where}: {first_line(error)}") from error
    found = getattr(module, name, None)
    if not callable(found):
        raise ConfigError(f"{flag}: {where} has no callable {name}.")
    return found


def function_label(fn: Callable) -> str:
    """A user's function as a person finds it: ``name``, or ``lambda at FILE:LINE``."""
    import os

    name = getattr(fn, "__qualname__", type(fn).__name__)
    code = getattr(fn, "__code__", None)
    if code is not None and "<lambda>" in name:
        return f"lambda at {os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    return name


def user_frame(error: BaseException) -> str:
    """`` (FILE:LINE)`` of the deepest frame of ``error``'s traceback in the user's code (not in jaxmp or an
    installed package), or ``""``: ready to follow the words it locates."""
    import os
    import traceback

    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if not f.filename.startswith(ours) and "site-packages" not in f.filename and "/lib/python" not in f.filename
    ]
    return f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


def check_model_fn(fn: Callable, label: str) -> None:
    """``fn`` must be callable as ``fn(rngs)``: a class whose constructor needs more (the README's
    ``MyModel(features, classes, rngs)``) is one line saying what to do instead."""
    import inspect

    try:  # a class: its __init__ (an nnx.Module's metaclass hides it behind *args, **kwargs)
        signature = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return
    params = list(signature.parameters.values())[1 if inspect.isclass(fn) else 0 :]
    signature = signature.replace(parameters=params)
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    if not positional or len(required) > 1:
        needs = ", ".join(required) or "no arguments"
        raise ConfigError(
            f"{label}{signature} is called as {label}(rngs), but it takes {needs}; give the rest defaults, or "
            "name a function rngs -> model (def my_model(rngs): return MyModel(64, 10, rngs))."
        )


def build_own_model(fn: Callable, label: str, rngs) -> nnx.Module:
    """``fn(rngs)``, with any exception the user's code raises turned into one line naming ``label``."""
    try:
        return fn(rngs)
    except ConfigError:
        raise
    except Exception as error:  # the user's code: one line naming where it failed
        where = user_frame(error)
        raise ConfigError(f"{label}(rngs) failed while building the model{where}: {first_line(error)}") from error


def own_model_fn(cfg, model_fn: Callable | None) -> Callable | None:
    """The model of the user's own a run builds: ``model_fn`` if given, else the one ``--model-fn``
    names (loaded), else None (the preset ``--model``)."""
    if model_fn is None and cfg.model.model_fn is not None:
        return load_model_fn(cfg.model.model_fn)
    return model_fn
