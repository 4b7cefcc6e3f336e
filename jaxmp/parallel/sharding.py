"""Each parameter's sharding: PartitionSpecs from the rules table, FSDP on top, and the sharding report.

Models name logical axes; :mod:`jaxmp.parallel.rules` maps them to mesh axes. This module turns a
model's parameters into PartitionSpecs (refusing a logical name no rule maps), checks they divide,
and prints which devices hold what.

FSDP (ZeRO-3) is one more rule on top of any strategy: the mesh axes that split ``batch`` (the
data-parallel group) also split every parameter, on its largest dimension that is still whole and that
they divide. Only a rule that sees shapes can say "where divisible", so it runs per parameter
(:func:`fsdp_specs`); a parameter with no such dimension (a 10-class bias on 4 devices) stays as it was.
The optimizer state follows the parameters, and XLA all-gathers each weight where it is used and
reduce-scatters its gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxmp.config import ConfigError
from jaxmp.parallel.mesh import PIPE, TENSOR
from jaxmp.parallel.rules import MeshAxes, Rules, as_axes, logical_to_spec


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
                    f"table, e.g. rules={{{name!r}: {TENSOR!r}}}, or {{{name!r}: None}} to keep it whole."
                )
        return logical_to_spec(names, rules)

    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def fsdp_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes FSDP shards parameters over: those that split the data, the batch's and then the
    sequence's (each device sees other tokens with the same weights, so the weights can be spread)."""
    return tuple(dict.fromkeys((*as_axes(rules.get("batch")), *as_axes(rules.get("seq")))))


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
    split = [d for d in by_size if entries[d] is not None and PIPE not in as_axes(entries[d])]
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


def print_sharding_report(params, mesh: jax.sharding.Mesh, console=None, opt_state=None, note: str = "") -> None:
    """Print the sharding report as a rich table, with the mesh and the totals.

    Args:
      opt_state: the optimizer state (same kind of leaves as ``params``); adds a line with its bytes
        per device, which is what FSDP / ZeRO divides along with the parameters.
      note: added to the title (a pipelined run: where the bytes are).
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    mesh_text = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    table = Table(title=f"parameters on mesh ({mesh_text}){note}", title_justify="left")
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
