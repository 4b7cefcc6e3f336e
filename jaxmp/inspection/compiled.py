"""Compile a function for given shardings, and read XLA's own memory and cost reports off it.

Why here: tests, benchmarks and the analyzer compile ahead of time (``lower(...).compile()`` on
``ShapeDtypeStruct`` arguments, nothing runs) and read ``memory_analysis()`` and ``cost_analysis()``,
whose fields differ between JAX versions and backends; :func:`memory_and_flops` returns None where one
is missing instead of raising.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class MemoryAndFlops(NamedTuple):
    """Per-device memory (bytes) and flops XLA reports for a compiled program; None when unavailable.

    ``flops`` and ``bytes_accessed`` are ``cost_analysis()``'s: XLA counts each while-loop body once
    (checked on jax 0.10 CPU), so for scanned layers or pipelines use :mod:`jaxmp.inspection.flops`. Peak
    memory is ``argument + output - alias + temp`` (donated inputs alias outputs).
    """

    argument_bytes: int | None
    output_bytes: int | None
    temp_bytes: int | None
    flops: float | None
    alias_bytes: int | None = None
    bytes_accessed: float | None = None

    @property
    def peak_bytes(self) -> int | None:
        """Live bytes at the program's peak: arguments, outputs not aliased to arguments, temporaries."""
        parts = (self.argument_bytes, self.output_bytes, self.temp_bytes)
        if any(part is None for part in parts):
            return None
        return self.argument_bytes + self.output_bytes - (self.alias_bytes or 0) + self.temp_bytes


def compile_sharded(
    fn: Callable, *args: Any, in_shardings: Any = None, out_shardings: Any = None
) -> jax.stages.Compiled:
    """``jax.jit(fn, ...).lower(*args).compile()``; ``None`` shardings are left to XLA (not replicated)."""
    kwargs = {}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    return jax.jit(fn, **kwargs).lower(*args).compile()


def compiled_text(fn: Callable, *args: Any, in_shardings: Any = None, out_shardings: Any = None) -> str:
    """The optimised HLO text of ``fn`` compiled with the given shardings (args may be ShapeDtypeStructs)."""
    return compile_sharded(fn, *args, in_shardings=in_shardings, out_shardings=out_shardings).as_text()


def memory_and_flops(compiled: jax.stages.Compiled) -> MemoryAndFlops:
    """Per-device argument / output / temp bytes and flops XLA reports; fields are None when missing."""
    try:
        memory = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        memory = None
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError):
        cost = None
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = cost.get("flops") if cost else None
    accessed = cost.get("bytes accessed") if cost else None

    def field(name: str) -> int | None:
        value = getattr(memory, name, None)
        return None if value is None else int(value)

    return MemoryAndFlops(
        argument_bytes=field("argument_size_in_bytes"),
        output_bytes=field("output_size_in_bytes"),
        temp_bytes=field("temp_size_in_bytes"),
        flops=None if flops is None else float(flops),
        alias_bytes=field("alias_size_in_bytes"),
        bytes_accessed=None if accessed is None else float(accessed),
    )
