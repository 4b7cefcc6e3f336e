"""Logical axis names -> mesh axes: one rules table per strategy, and the sharding report.

Models name *logical* axes only (``("embed", "mlp")``); this module decides which mesh axis, if any,
each logical axis is split over. Swapping the strategy or the mesh changes the rules, never the model.

Logical axes used by the models:
  batch       examples in dense layers          features  input features (never split)
  conv_batch  examples in conv layers           embed     a dense width kept whole
  mlp         the hidden width of a column/row  classes   logits (never split)
              pair (split by ``tp``/``hybrid``)  flat      flattened conv features (never split)
  channels    conv output channels              dense_in  input dim of the textbook layer
  layers      stacked layers (on ``pipe``)      dense_out output dim of the textbook layer
  stage       pipeline stages (on ``pipe``)
A kernel whose *output* axis maps to ``tensor`` is split by column (outputs stacked / all-gathered);
one whose *input* axis maps to ``tensor`` is split by row (partial sums added / all-reduced).

FSDP (ZeRO-3) is one more rule on top of any strategy: the mesh axes that split ``batch`` (the
data-parallel group) also split every parameter, on its largest dimension that is still whole and that
they divide. Only a rule that sees shapes can say "where divisible", so it runs per parameter
(:func:`fsdp_specs`); a parameter with no such dimension (a 10-class bias on 4 devices) stays as it was.
The optimizer state follows the parameters, and XLA all-gathers each weight where it is used and
reduce-scatters its gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxmp.config import ConfigError

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

ALL_DEVICES = ("data", "tensor")
MESH_AXES = ("data", "tensor", "pipe")
# Logical names every table keeps whole unless a strategy says otherwise: a name no rule maps is an
# error (check_rules_cover), so a typo or a new name never goes silently replicated.
WHOLE: Rules = {
    name: None
    for name in ("batch", "conv_batch", "features", "embed", "mlp", "classes", "flat", "channels")
    + ("dense_in", "dense_out")
}
# Stacked layers and pipeline stages live on `pipe` under every strategy.
PIPELINE_RULES: Rules = {"layers": "pipe", "stage": "pipe"}
STRATEGY_RULES: dict[str, Rules] = {
    # Data parallelism: every weight replicated, the batch split over every non-pipe device.
    "dp": {"batch": ALL_DEVICES, "conv_batch": ALL_DEVICES},
    # Megatron tensor parallelism: column/row pairs over `tensor`, conv output channels too.
    "tp": {"batch": "data", "conv_batch": "data", "mlp": "tensor", "channels": "tensor"},
    # Krizhevsky's one weird trick: conv layers data-parallel over all devices, dense layers split.
    "hybrid": {"batch": "data", "conv_batch": ALL_DEVICES, "mlp": "tensor"},
    # The textbook single layer, split by output (column) or by input (row).
    "column": {"batch": "data", "dense_out": "tensor"},
    "row": {"batch": "data", "dense_in": "tensor"},
}

_active_rules: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("jaxmp_rules", default=None)


def rules_for(strategy: str, extra: Rules | None = None) -> Rules:
    """The rules table of a strategy name, with ``extra`` rules added or replacing its own (e.g.
    ``{"hidden": "tensor"}`` for a model of your own); ``ConfigError`` if ``extra`` is not a table."""
    try:
        rules = {**WHOLE, **STRATEGY_RULES[strategy], **PIPELINE_RULES}
    except KeyError:
        raise ConfigError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGY_RULES)}.") from None
    if extra is None:
        return rules
    if not isinstance(extra, Mapping):
        raise ConfigError(f"rules must map logical axis names to mesh axes, got {type(extra).__name__}.")
    for name, entry in extra.items():
        axes = entry if isinstance(entry, tuple) else (entry,) if entry is not None else ()
        if not isinstance(name, str) or not all(isinstance(a, str) and a in MESH_AXES for a in axes):
            raise ConfigError(
                f"rules[{name!r}] = {entry!r}: a rule maps a logical name to None, a mesh axis or a tuple of "
                f"mesh axes ({', '.join(MESH_AXES)})."
            )
        if len(set(axes)) < len(axes):
            raise ConfigError(f"rules[{name!r}] = {entry!r} names a mesh axis twice.")
    return {**rules, **extra}


def check_mesh(mesh) -> None:
    """jaxmp's meshes have the axes data, tensor and pipe, in that order (size 1 where unused)."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ConfigError(f"expected a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ConfigError(
            f"mesh axes {tuple(mesh.axis_names)}: jaxmp meshes have the axes {', '.join(MESH_AXES)} (size 1 "
            "where unused); build one with jaxmp.mesh.mesh_from_spec('data=2,tensor=4') and map your logical "
            "names to those axes in rules."
        )


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


def _logical_names(variable: nnx.Variable) -> tuple[str | None, ...]:
    names = variable.get_metadata().get("out_sharding") or ()
    return tuple(names) + (None,) * (variable.get_value().ndim - len(names))


def param_specs(params: nnx.State, rules: Rules) -> nnx.State:
    """A ``PartitionSpec`` per parameter, from its logical names and the rules table; ``ConfigError``
    naming the parameter if one of its names has no rule."""

    def spec(path, variable: nnx.Variable) -> PartitionSpec:
        names = _logical_names(variable)
        for name in names:
            if name is not None and name not in rules:
                raise ConfigError(
                    f"parameter {path_name(path)}: no rule maps its logical axis {name!r}; add one to the rules "
                    f"table, e.g. rules={{{name!r}: 'tensor'}}, or {{{name!r}: None}} to keep it whole."
                )
        return logical_to_spec(names, rules)

    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def fsdp_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes FSDP shards parameters over: those that split the batch."""
    return as_axes(rules.get("batch"))


def add_fsdp(
    spec: PartitionSpec, shape: tuple[int, ...], mesh: jax.sharding.Mesh, axes: tuple[str, ...]
) -> PartitionSpec:
    """``spec`` with ``axes`` added to the largest dimension of ``shape`` they still divide.

    Whole dimensions come first; then a dimension already split over ``tensor`` (a Megatron bias) is
    split further, never the stacked-layers dimension on ``pipe`` (the pipeline slices it by hand).
    Axes the spec already uses are left out; if no dimension takes all of them, each single axis is
    tried in turn, so a weight is sharded as far as its shape allows and never padded.
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for e in entries if e for a in as_axes(e)}
    free = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    groups = [free, *((a,) for a in free)] if len(free) > 1 else [free]
    by_size = sorted(range(len(shape)), key=lambda d: -shape[d])
    whole = [d for d in by_size if entries[d] is None]
    split = [d for d in by_size if entries[d] is not None and "pipe" not in as_axes(entries[d])]
    for dims in (whole, split):
        for group in groups:
            for d in dims:
                have = as_axes(entries[d]) if entries[d] else ()
                parts = axis_size(mesh, (*have, *group))
                if group and shape[d] % parts == 0:
                    merged = (*have, *group)
                    entries[d] = merged[0] if len(merged) == 1 else merged
                    return PartitionSpec(*entries)
    return spec


def as_axes(axes: MeshAxes) -> tuple[str, ...]:
    """A rules-table or PartitionSpec entry (a name, a tuple of names or None) as a tuple of names."""
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def fsdp_specs(params: nnx.State, specs: nnx.State, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.State:
    """Every parameter's spec with the FSDP axes of ``rules`` added where its shape allows."""
    axes = fsdp_axes(rules)
    return jax.tree.map(
        lambda v, spec: add_fsdp(spec, tuple(v.get_value().shape), mesh, axes),
        params,
        specs,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def path_name(path) -> str:
    """``("blocks", 0, "up", "kernel")`` -> ``"blocks.0.up.kernel"``."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def check_divisible(params: nnx.State, specs: nnx.State, mesh: jax.sharding.Mesh) -> None:
    """Raise ``ConfigError`` naming the first parameter whose dimension its mesh axes do not divide."""

    def check(path, variable: nnx.Variable, spec: PartitionSpec) -> None:
        shape = tuple(variable.get_value().shape)
        for dim, axes in zip(shape, spec, strict=False):
            parts = axis_size(mesh, axes)
            if dim % parts:
                raise ConfigError(
                    f"parameter {path_name(path)} of shape {shape} cannot be split over {axes} "
                    f"({parts} devices): {dim} is not divisible by {parts}."
                )

    jax.tree_util.tree_map_with_path(check, params, specs, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def axis_size(mesh: jax.sharding.Mesh, axes: MeshAxes) -> int:
    """How many devices the mesh axes ``axes`` (a name, a tuple of names or None) span."""
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def named(mesh: jax.sharding.Mesh, specs):
    """Turn a tree of PartitionSpecs into NamedShardings on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


class ParamRow(NamedTuple):
    """One line of the sharding report."""

    name: str
    shape: tuple[int, ...]
    spec: PartitionSpec
    bytes_per_device: int


def sharding_report(params) -> list[ParamRow]:
    """Every parameter's name, global shape, PartitionSpec and bytes held on each device.

    Args:
      params: a tree of sharded ``jax.Array`` (or ``ShapeDtypeStruct`` with ``.sharding``).
    """
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        rows.append(
            ParamRow(
                name=path_name(path[:-1] if path and _is_value_key(path[-1]) else path),
                shape=tuple(leaf.shape),
                spec=leaf.sharding.spec,
                bytes_per_device=math.prod(shard_shape) * leaf.dtype.itemsize,
            )
        )
    return rows


def _is_value_key(key) -> bool:
    return getattr(key, "name", None) == "value" or getattr(key, "key", None) == "value"


def print_sharding_report(params, mesh: jax.sharding.Mesh, console=None, opt_state=None) -> None:
    """Print the sharding report as a rich table, with the mesh and the totals.

    Args:
      opt_state: the optimizer state (same kind of leaves as ``params``); adds a line with its bytes
        per device, which is what FSDP / ZeRO divides along with the parameters.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    mesh_text = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    table = Table(title=f"parameters on mesh ({mesh_text})", title_justify="left")
    rows = sharding_report(params)
    table.add_column("parameter", no_wrap=True, min_width=max([9, *(len(r.name) for r in rows)]))
    for column in ("global shape", "PartitionSpec", "bytes/device"):
        table.add_column(column, justify="right" if column == "bytes/device" else "left")
    for row in rows:
        table.add_row(row.name, str(row.shape), str(tuple(row.spec)), f"{row.bytes_per_device:,}")
    total = sum(r.bytes_per_device for r in rows)
    table.add_row("total", f"{sum(math.prod(r.shape) for r in rows):,} params", "", f"{total:,}", style="bold")
    if opt_state is not None:
        opt_bytes = sum(r.bytes_per_device for r in sharding_report(opt_state))
        table.add_row("optimizer state", "", "", f"{opt_bytes:,}")
        table.add_row("params + optimizer", "", "", f"{total + opt_bytes:,}", style="bold")
    console.print(table)


def batch_axes(activation_names: tuple[str | None, ...], mesh) -> tuple[str, ...]:
    """The mesh axes (of more than one device) that split the activations' batch dimension."""
    rules = active_rules()
    if rules is None or mesh.empty or not activation_names or activation_names[0] is None:
        return ()
    axes = logical_to_spec(activation_names[:1], rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if a != "pipe" and mesh.shape.get(a, 1) > 1)


def rules_without_axes(rules: Rules | None, axes: set[str]) -> Rules | None:
    """``rules`` with the mesh axes ``axes`` dropped from every entry (they are manual inside a shard_map)."""
    if rules is None:
        return None
    kept = {}
    for name, entry in rules.items():
        left = tuple(a for a in ((entry,) if isinstance(entry, str) else (entry or ())) if a not in axes)
        kept[name] = left[0] if len(left) == 1 else (left or None)
    return kept
