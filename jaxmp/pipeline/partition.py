"""Which layers each chunk runs, and which device along ``pipe`` runs each chunk.

A model's layers are counted in units (a :class:`~jaxmp.models.layers.Stacked` layer of depth L is L
units). ``--stage-split`` cuts the units into ``pipe x repeats`` contiguous chunks: ``uniform`` (equal
counts, the first chunks one more when it does not divide), ``auto`` (balanced by forward FLOPs the way
GPipe's partitioner does: minimise the most expensive chunk, since the pipeline runs at the pace of its
slowest stage), ``auto-memory`` (balanced by parameter bytes), or the unit count of every chunk
(``"1,3"``). A unit is never dropped: the counts must add up to the model's units.

``--placement`` names a device along ``pipe`` either per chunk, or per unit (then consecutive units on
one device form a chunk, so ``0,1,1,0`` puts the first and last layers on device 0 and the middle two on
device 1, as the classic two-GPU example does). Default: chunk ``c`` on device ``c % S``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxmp.config import ConfigError

SPLITS = ("uniform", "auto", "auto-memory")


def chunk_bounds(
    split: str, num_units: int, chunks: int, costs: Sequence[float] | None = None
) -> list[tuple[int, int]]:
    """``[(first unit, end unit)]`` of each of ``chunks`` chunks; ``costs`` per unit for the auto splits."""
    if chunks > num_units:
        raise ConfigError(
            f"{chunks} pipeline chunks (pipe x repeats) need at least {chunks} layers, the model has {num_units}."
        )
    if split == "uniform" or (split in ("auto", "auto-memory") and costs is None):
        counts = [len(part) for part in np.array_split(np.arange(num_units), chunks)]
    elif split in ("auto", "auto-memory"):
        counts = _balanced_counts(list(costs), chunks)
    else:
        counts = _explicit_counts(split, num_units, chunks)
    ends = np.cumsum(counts).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def parse_placement(text: str, stages: int) -> list[int]:
    """``"0,1,1,0"`` -> ``[0, 1, 1, 0]``, each a device index along ``pipe``."""
    try:
        devices = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--placement {text!r} is not comma-separated device indices along pipe.") from None
    bad = [d for d in devices if not 0 <= d < stages]
    if bad:
        raise ConfigError(f"--placement {text}: device {bad[0]} is not in 0..{stages - 1} (the pipe axis).")
    return devices


def chunks_and_placement(
    split: str, placement: str | None, num_units: int, stages: int, repeats: int, costs=None
) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
    """The chunks' unit bounds and the device of each chunk (module docstring)."""
    if placement is None:
        chunks = stages * repeats
        return chunk_bounds(split, num_units, chunks, costs), tuple(c % stages for c in range(chunks))
    devices = parse_placement(placement, stages)
    if len(devices) == num_units and split == "uniform":
        bounds, owners = [], []
        for u, d in enumerate(devices):
            if owners and owners[-1] == d:
                bounds[-1] = (bounds[-1][0], u + 1)
            else:
                bounds.append((u, u + 1))
                owners.append(d)
    else:
        bounds = chunk_bounds(split, num_units, len(devices), costs)
        owners = devices
        if any(a == b for a, b in zip(owners, owners[1:], strict=False)):
            raise ConfigError(
                f"--placement {placement}: consecutive chunks on one device; merge them with --stage-split."
            )
    missing = sorted(set(range(stages)) - set(owners))
    if missing:
        raise ConfigError(f"--placement {placement} gives device {missing[0]} along pipe no layers.")
    return bounds, tuple(owners)


def _explicit_counts(split: str, num_units: int, chunks: int) -> list[int]:
    try:
        counts = [int(part) for part in split.split(",")]
    except ValueError:
        raise ConfigError(
            f"--stage-split {split!r} is not uniform, auto, auto-memory or comma-separated layer counts."
        ) from None
    if len(counts) != chunks or min(counts) < 1 or sum(counts) != num_units:
        raise ConfigError(
            f"--stage-split {split} must give {chunks} positive layer counts (one per chunk) adding up to the "
            f"model's {num_units} layers."
        )
    return counts


def _balanced_counts(costs: list[float], chunks: int) -> list[int]:
    """Contiguous split of ``costs`` into ``chunks`` non-empty parts minimising the largest part."""
    n = len(costs)
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    best = np.full((chunks + 1, n + 1), np.inf)
    cut = np.zeros((chunks + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for c in range(1, chunks + 1):
        for end in range(c, n + 1):
            for start in range(c - 1, end):
                cost = max(best[c - 1, start], prefix[end] - prefix[start])
                if cost < best[c, end]:
                    best[c, end], cut[c, end] = cost, start
    counts, end = [], n
    for c in range(chunks, 0, -1):
        counts.append(end - cut[c, end])
        end = cut[c, end]
    return counts[::-1]
