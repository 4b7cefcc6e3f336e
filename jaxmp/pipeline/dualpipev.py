"""DualPipeV (DeepSeek-V3's DualPipe cut in half; torch's ``ScheduleDualPipeV``) as per-device lists.

Two chunks per device in a V, as in ZB-V: device ``r`` of ``P`` runs chunk ``r`` on the way down and
chunk ``2P-1-r`` on the way up. Its steady state overlaps the forward of one micro-batch with the
backward of another in one tick (:class:`.notation.Pair`), so that, on hardware that can, one's
communication hides behind the other's compute; warm-up and cool-down split backwards into ``I`` and
``W`` to fill the bubble, so one table mixes full and split backwards.

Why as lists: DeepSeek and torch state the schedule as each device's order of actions in eight phases
(below, after ``dualpipev.py`` of deepseek-ai/DualPipe); :func:`.notation.from_rows` places the lists
into ticks, each entry at the first tick its inputs have arrived, like any list a user writes.

The phases of device ``r`` (``F0`` the down chunk's forward, ``B1`` the up chunk's backward, ``&`` a pair):

1. ``2(P-r-1)`` x ``F0``;  2. ``r+1`` x ``F0 F1``;  3. ``P-r-1`` x ``I1 W1 F1``;
4. ``M-2P+r+1`` x ``F0&B1  F1&B0`` (the last device's first ``F0``, ``B1`` not overlapped: ``B1`` needs
   that very ``F0``'s micro-batch to turn round);  5. ``P-r-1`` x ``B1  F1&B0``;
6. ``r+1`` x ``B1 B0``, split into ``I`` from the middle on;  7. ``P-r-1`` x ``W I0``;  8. ``r+1`` x ``W``.

A ``W`` runs the oldest pending weight gradient. The phases need ``M >= 2P-1``; for fewer micro-batches
the lists are those of ``2P-1`` with the missing micro-batches' actions left out (a pair losing one
half becomes a single action), which cannot deadlock: leaving actions out of a list that runs only
removes waits.
"""

from __future__ import annotations

from collections import deque

from jaxmp.pipeline.notation import Action, Item, Pair


def dualpipev_rows(devices: int, microbatches: int) -> list[list[Item]]:
    """Each device's DualPipeV list for ``microbatches`` (module docstring)."""
    template = max(microbatches, 2 * devices - 1)
    return [_keep(_device_row(devices, template, r), microbatches) for r in range(devices)]


def _device_row(p: int, m: int, r: int) -> list[Item]:
    down, up = r, 2 * p - 1 - r
    forwards, backwards = {down: 0, up: 0}, {down: 0, up: 0}
    pending: deque[tuple[int, int]] = deque()  # (chunk, micro-batch) of each I, oldest first
    row: list[Item] = []

    def f(c: int) -> Action:
        forwards[c] += 1
        return Action(c, "F", forwards[c] - 1)

    def b(c: int, split: bool = False) -> Action:
        backwards[c] += 1
        if split:
            pending.append((c, backwards[c] - 1))
        return Action(c, "I" if split else "B", backwards[c] - 1)

    def w() -> Action:
        c, micro = pending.popleft()
        return Action(c, "W", micro)

    row += [f(down) for _ in range(2 * (p - r - 1))]
    for _ in range(r + 1):
        row += [f(down), f(up)]
    for _ in range(p - r - 1):
        row += [b(up, split=True), w(), f(up)]
    for i in range(m - 2 * p + r + 1):
        row += [f(down), b(up)] if i == 0 and r == p - 1 else [Pair(f(down), b(up))]
        row.append(Pair(f(up), b(down)))
    for _ in range(p - r - 1):
        row += [b(up), Pair(f(up), b(down))]
    split = False
    for i in range(r + 1):
        split = split or (i == (r + 1) // 2 and r % 2 == 1)
        row.append(b(up, split))
        split = split or (i == (r + 1) // 2 and r % 2 == 0)
        row.append(b(down, split))
    for _ in range(p - r - 1):
        row += [w(), b(down, split=True)]
    row += [w() for _ in range(len(pending))]
    return row


def _keep(row: list[Item], microbatches: int) -> list[Item]:
    """``row`` without the actions of micro-batches ``>= microbatches``."""
    out: list[Item] = []
    for item in row:
        kept = [a for a in item.halves if a.microbatch < microbatches]
        if len(kept) == 2:
            out.append(item)
        elif kept:
            out.append(kept[0])
    return out
