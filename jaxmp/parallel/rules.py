"""Logical axis names -> mesh axes: one rules table per strategy, and the rules in force while a step is traced.

Models name *logical* axes only (``("embed", "mlp")``); this module decides which mesh axis, if any,
each logical axis is split over. Swapping the strategy or the mesh changes the rules, never the model.

Logical axes used by the models:
  batch       examples in dense layers          features  input features (never split)
  conv_batch  examples in conv layers           embed     a dense width kept whole
  mlp         the hidden width of a column/row  classes   logits (never split)
              pair (split by ``tp``/``hybrid``)  flat      flattened conv features (never split)
  channels    conv output channels              dense_in  input dim of the textbook layer
  layers      stacked layers (on ``pipe``)      dense_out output dim of the textbook layer
  stage       pipeline stages (on ``pipe``)     vocab     a language model's vocabulary (split by ``tp``)
  heads       attention heads (split by ``tp``) seq       a sequence's tokens (split over ``context``)
  tokens      the residual stream's tokens (over ``context``; ``--sequence-parallel`` adds the heads' axes)
  kv_seq      the tokens attention reads keys and values of (whole: all-gathered over ``context``)
  seq_heads   heads split over the sequence's axes too (Ulysses: an all-to-all from ``seq`` to heads)
  positions   a learned position table's rows (never split)
A kernel whose *output* axis maps to ``tensor`` is split by column (outputs stacked / all-gathered);
one whose *input* axis maps to ``tensor`` is split by row (partial sums added / all-reduced).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import jax
from jax.sharding import PartitionSpec

from jaxmp.config import ConfigError
from jaxmp.parallel.mesh import AXES, CONTEXT, DATA, PIPE, TENSOR

MeshAxes = str | tuple[str, ...] | None


Rules = Mapping[str, MeshAxes]


# Data parallelism's batch: every device that holds whole weights and whole sequences.
ALL_DEVICES = (DATA, TENSOR)


# Logical names every table keeps whole unless a strategy says otherwise: a name no rule maps is an
# error (check_rules_cover), so a typo or a new name never goes silently replicated.
WHOLE: Rules = {
    name: None
    for name in ("batch", "conv_batch", "features", "embed", "mlp", "classes", "flat", "channels")
    + ("dense_in", "dense_out", "vocab", "heads", "seq", "tokens", "kv_seq", "seq_heads", "positions")
}


def _one(axes: tuple[str, ...]) -> MeshAxes:
    return axes[0] if len(axes) == 1 else axes


# Stacked layers and pipeline stages live on `pipe`, a sequence's tokens on `context`, under every strategy.
PIPELINE_RULES: Rules = {"layers": PIPE, "stage": PIPE}
CONTEXT_RULES: Rules = {"seq": CONTEXT, "tokens": CONTEXT}


# A transformer's attention heads and vocabulary over `tensor` (Megatron-LM).
MEGATRON_LM: Rules = {"heads": TENSOR, "vocab": TENSOR}


STRATEGY_RULES: dict[str, Rules] = {
    # Data parallelism: every weight replicated, the batch split over every non-pipe device.
    "dp": {"batch": ALL_DEVICES, "conv_batch": ALL_DEVICES},
    # Megatron tensor parallelism: column/row pairs over `tensor`, conv output channels too.
    # Attention split by heads, embedding and LM head by vocabulary (the logits are never gathered).
    "tp": {"batch": DATA, "conv_batch": DATA, "mlp": TENSOR, "channels": TENSOR} | MEGATRON_LM,
    # Krizhevsky's one weird trick: conv layers data-parallel over all devices, dense layers split.
    "hybrid": {"batch": DATA, "conv_batch": ALL_DEVICES, "mlp": TENSOR} | MEGATRON_LM,
    # The textbook single layer, split by output (column) or by input (row).
    "column": {"batch": DATA, "dense_out": TENSOR},
    "row": {"batch": DATA, "dense_in": TENSOR},
}


_active_rules: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("jaxmp_rules", default=None)


def rules_for(strategy: str, extra: Rules | None = None) -> Rules:
    """The rules table of a strategy name, with ``extra`` rules added or replacing its own (e.g.
    ``{"hidden": "tensor"}`` for a model of your own); ``ConfigError`` if ``extra`` is not a table."""
    try:
        rules = {**WHOLE, **STRATEGY_RULES[strategy], **PIPELINE_RULES, **CONTEXT_RULES}
    except KeyError:
        raise ConfigError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGY_RULES)}.") from None
    # Ulysses' all-to-all turns the sequence split into a split of the heads, after their own axes.
    rules["seq_heads"] = _one((*as_axes(rules["heads"]), *as_axes(rules["seq"])))
    if extra is None:
        return rules
    if not isinstance(extra, Mapping):
        raise ConfigError(f"rules must map logical axis names to mesh axes, got {type(extra).__name__}.")
    for name, entry in extra.items():
        axes = entry if isinstance(entry, tuple) else (entry,) if entry is not None else ()
        if not isinstance(name, str) or not all(isinstance(a, str) and a in AXES for a in axes):
            raise ConfigError(
                f"rules[{name!r}] = {entry!r}: a rule maps a logical name to None, a mesh axis or a tuple of "
                f"mesh axes ({', '.join(AXES)})."
            )
        if len(set(axes)) < len(axes):
            raise ConfigError(f"rules[{name!r}] = {entry!r} names a mesh axis twice.")
    return {**rules, **extra}


def sequence_parallel(rules: Rules) -> Rules:
    """``rules`` with the residual stream's ``tokens`` split over the axes that split the heads too (Megatron
    sequence parallelism), after those of the sequence; ``ConfigError`` when nothing splits the heads."""
    if not rules.get("heads"):
        raise ConfigError("--sequence-parallel splits the tokens over tensor: it needs --strategy tp.")
    return {**rules, "tokens": _one((*as_axes(rules.get("seq")), *as_axes(rules["heads"])))}


def logical_to_spec(names: tuple[str | None, ...], rules: Rules) -> PartitionSpec:
    """Map a tuple of logical axis names to a mesh ``PartitionSpec`` (unknown names stay whole)."""
    return PartitionSpec(*(rules.get(name) if name else None for name in names))


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """Make ``rules`` the table that :func:`constrain` uses while a step is traced."""
    token = _active_rules.set(rules)
    try:
        yield
    finally:
        _active_rules.reset(token)


def active_rules() -> Rules | None:
    """The rules table of the step being traced (``None`` outside :func:`use_rules`)."""
    return _active_rules.get()


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op outside a mesh or a rules context."""
    rules = _active_rules.get()
    if rules is None or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def as_axes(axes: MeshAxes) -> tuple[str, ...]:
    """A rules-table or PartitionSpec entry (a name, a tuple of names or None) as a tuple of names."""
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def batch_axes(activation_names: tuple[str | None, ...], mesh) -> tuple[str, ...]:
    """The mesh axes (of more than one device) that split the activations' batch dimension."""
    rules = active_rules()
    if rules is None or mesh.empty or not activation_names or activation_names[0] is None:
        return ()
    axes = logical_to_spec(activation_names[:1], rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if a != PIPE and mesh.shape.get(a, 1) > 1)


def rules_without_axes(rules: Rules | None, axes: set[str]) -> Rules | None:
    """``rules`` with the mesh axes ``axes`` dropped from every entry (they are manual inside a shard_map)."""
    if rules is None:
        return None
    kept = {}
    for name, entry in rules.items():
        left = tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if a not in axes)
        kept[name] = left[0] if len(left) == 1 else (left or None)
    return kept
