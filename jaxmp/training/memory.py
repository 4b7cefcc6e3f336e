"""Memory a run will need against memory the machine has, estimated from shapes before anything is allocated.

Why estimates and not a try: a train state or dataset far beyond the machine fails late and badly (a
numpy ``MemoryError`` traceback while building the data, or an out-of-memory error at the first step,
after the checkpoint folder and the metrics file were made), or the kernel kills the process. The shapes
are known before any of that, so only what is *obviously* too large is refused: the train state alone
beyond a device's memory, a dataset beyond the host's. Whatever fits that test may still not fit with
activations, gradients and other processes; the compiled program's own numbers (``jaxmp.analyze``) tell.

Memory of a device: ``bytes_limit`` of ``device.memory_stats()`` (GPUs, TPUs); a simulated CPU device
gets its share of the host's physical memory, which all the mesh's devices on this host share.
"""

from __future__ import annotations

import math
import os

from jaxmp.config import ConfigError


def host_memory_bytes() -> int | None:
    """The host's physical memory (``None`` where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(count: float) -> str:
    """``7.5 TiB``, ``3.0 GiB``, ``512 B``: binary units, as device memory is counted."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def check_host_fits(subject: str, what: str, need: int) -> None:
    """``ConfigError`` when ``need`` bytes are beyond the host's physical memory.

    Args:
      subject: the options that ask for it, e.g. ``"--synthetic-size 1000000000000"``.
      what: what needs the memory, e.g. ``"the synthetic dataset"``.
    """
    have = host_memory_bytes()
    if have is not None and need > have:
        raise ConfigError(
            f"{subject}: {what} needs about {format_bytes(need)} of host memory, this machine has {format_bytes(have)}."
        )


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of ``jax.ShapeDtypeStruct`` with ``NamedSharding`` s (every device
    holds one shard of each leaf, all of one shape): each leaf's shard shape times its item size, summed."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.shape if leaf.sharding is None else leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def device_memory(mesh) -> tuple[int, str] | None:
    """The memory of the smallest of ``mesh``'s devices on this host, and where the number comes from;
    ``None`` when no number is known."""
    import jax

    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limits = [_bytes_limit(d) for d in local]
    if local and all(limits):
        return min(limits), f"{local[0].device_kind} memory limit"
    if local and all(d.platform == "cpu" for d in local):
        host = host_memory_bytes()
        if host:
            share = f"{len(local)} CPU devices share {format_bytes(host)} of host memory"
            return host // len(local), share if len(local) > 1 else f"{format_bytes(host)} of host memory"
    return None


def _bytes_limit(device) -> int | None:
    """The memory the device's allocator may use (``None`` where the backend does not say: CPU)."""
    try:
        stats = device.memory_stats()
    except (RuntimeError, NotImplementedError):  # a backend without allocator statistics
        return None
    return (stats or {}).get("bytes_limit")


def check_state_fits(program, subject: str) -> None:
    """``ConfigError`` when one device's share of the train state (parameters and optimizer state, from
    the program's abstract state: nothing is allocated) is beyond a device's memory.

    Args:
      program: a built, not necessarily compiled, ``jaxmp.training.step.Program``.
      subject: the options that size the model, e.g. ``"--width 1000000000"``.
    """
    known = device_memory(program.mesh)
    if known is None or program.state_abstract is None:
        return
    have, source = known
    need = bytes_per_device(program.state_abstract)
    if need > have:
        raise ConfigError(
            f"{subject}: the train state (parameters and optimizer state) needs about {format_bytes(need)} per "
            f"device, the devices have {format_bytes(have)} each ({source}); use a smaller model, or split it over "
            "more devices (tensor, pipe, --fsdp)."
        )


def model_subject(cfg, model_fn=None) -> str:
    """The options that size the model, for a message: the preset's size options that differ from their
    defaults (``--width 1000000000``), else ``--model NAME``; a model of your own (``model_fn``) by name."""
    from jaxmp.config import ModelConfig
    from jaxmp.models import PRESETS
    from jaxmp.models.contract import function_label

    if model_fn is not None:
        return f"--model-fn {cfg.model.model_fn}" if cfg.model.model_fn else f"the model {function_label(model_fn)}"
    defaults = ModelConfig()
    changed = [
        f"--{name} {getattr(cfg.model, name)}"
        for name in PRESETS[cfg.model.model].options
        if type(getattr(defaults, name)) is int and getattr(cfg.model, name) != getattr(defaults, name)
    ]
    return " ".join(changed) or f"--model {cfg.model.model}"
