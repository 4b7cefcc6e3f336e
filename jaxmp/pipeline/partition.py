"""Stage boundaries for heterogeneous pipelines: which contiguous layers each chunk runs.

``uniform`` gives chunks equal layer counts (the first ones one more when it does not divide),
``auto`` balances chunks by forward FLOPs the way GPipe's partitioner does (minimise the most
expensive chunk; the pipeline runs at the pace of its slowest stage), and ``"1,3"`` spells the layer
count of every chunk. A layer is never dropped: the counts must add up to the model's layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxmp.config import ConfigError


def chunk_bounds(
    split: str, num_layers: int, chunks: int, flops: Sequence[float] | None = None
) -> list[tuple[int, int]]:
    """``[(first layer, end layer)]`` for each of ``chunks`` chunks (chunk ``r*S + s`` runs on stage ``s``)."""
    if chunks > num_layers:
        raise ConfigError(
            f"{chunks} pipeline chunks (pipe x repeats) need at least {chunks} layers, the model has {num_layers}."
        )
    if split == "uniform" or (split == "auto" and flops is None):
        counts = [len(part) for part in np.array_split(np.arange(num_layers), chunks)]
    elif split == "auto":
        counts = _balanced_counts(list(flops), chunks)
    else:
        counts = _explicit_counts(split, num_layers, chunks)
    ends = np.cumsum(counts).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _explicit_counts(split: str, num_layers: int, chunks: int) -> list[int]:
    try:
        counts = [int(part) for part in split.split(",")]
    except ValueError:
        raise ConfigError(f"--stage-split {split!r} is not uniform, auto or comma-separated layer counts.") from None
    if len(counts) != chunks or min(counts) < 1 or sum(counts) != num_layers:
        raise ConfigError(
            f"--stage-split {split} must give {chunks} positive layer counts (pipe x repeats) adding up to the "
            f"model's {num_layers} layers."
        )
    return counts


def _balanced_counts(flops: list[float], chunks: int) -> list[int]:
    """Contiguous split of ``flops`` into ``chunks`` non-empty parts minimising the largest part."""
    n = len(flops)
    prefix = np.concatenate([[0.0], np.cumsum(flops)])
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
