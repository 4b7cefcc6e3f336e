"""A schedule table drawn as a timeline: one row per device along ``pipe``, one box per tick.

Why a picture: the bubble, the warm-up and cool-down, and the stash a schedule needs are easier to see
than to count; the classic figure of vanilla model parallelism (``naive(3)``: F1 F2 F3, then B3 B2 B1)
and the 1F1B and zero-bubble papers' figures come out of the same table the executor runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxmp.config import ConfigError
from jaxmp.pipeline.schedule import BACKWARD, FORWARD, IDLE, INPUT, LETTERS, WEIGHT, Schedule, action_text

COLOURS = {FORWARD: "#4C72B0", BACKWARD: "#C44E52", INPUT: "#DD8452", WEIGHT: "#55A868"}


def plot(schedule: Schedule, path: str | Path | None = None, *, ax=None, title: str | None = None):
    """Draw ``schedule`` (``F``, ``B``, ``I`` and ``W`` slots in distinct colours, each labelled in torch's
    notation, an overlapped pair as two half-height boxes, idle blank, the bubble fraction in the title);
    write a PNG to ``path`` if given.
    Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    ticks, stages = schedule.kind.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(min(2 + 0.32 * ticks, 24), 0.9 + 0.45 * stages))
    several = schedule.repeats > 1
    for t, s, lane, kind, m, c in schedule.actions():
        paired = schedule.paired is not None and schedule.paired.kind[t, s] != IDLE
        y, height = (s + 0.5 * lane, 0.5) if paired else (s, 1.0)  # a pair: forward above, backward below
        ax.add_patch(plt.Rectangle((t, y), 1, height, facecolor=COLOURS[kind], edgecolor="white", linewidth=1))
        label = action_text(kind, m, c)  # torch's notation: 0F3, 1B0, 0I3, 0W3
        size = 5 if paired else 6 if len(label) > 3 else 7
        ax.text(t + 0.5, y + height / 2, label, ha="center", va="center", fontsize=size, color="white")
    ax.set_xlim(0, ticks)
    ax.set_ylim(stages, 0)
    ax.set_yticks(np.arange(stages) + 0.5, [f"device {s}" for s in range(stages)])
    ax.set_xlabel("tick")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_aspect("auto")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    kinds = [k for k in COLOURS if any((lane.kind == k).any() for lane in schedule.lanes)]
    ax.legend(
        handles=[Patch(color=COLOURS[k], label=LETTERS[k]) for k in kinds],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        frameon=False,
    )
    heading = title or f"{schedule.name}: S={stages}, M={schedule.microbatches}"
    if several:
        heading += f", {schedule.repeats} chunks per device"
    ax.set_title(f"{heading}; bubble {schedule.bubble_fraction:.1%}, stash {schedule.stashed().max()}")
    figure = ax.figure
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def check_plot_path(path: str | None) -> None:
    """``--schedule-plot``: a PNG path whose folder exists or can be made (checked before anything runs)."""
    from jaxmp.training.metrics import check_output_dir

    if path is None:
        return
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"--schedule-plot {path} must end in .png.")
    if target.is_dir():
        raise ConfigError(f"--schedule-plot {path} is a folder.")
    check_output_dir("--schedule-plot", str(target.parent), file=path)


def save_schedule_plot(pipeline, path: str | None) -> None:
    """Write the picture of a program's train schedule (``pipeline``: ``Program.pipeline``)."""
    if path is None:
        return
    if pipeline is None:
        raise ConfigError("--schedule-plot needs a pipelined run (--mesh with pipe > 1, or --microbatches > 1).")
    import matplotlib.pyplot as plt

    from jaxmp.training.metrics import make_parent

    plt.close(plot(pipeline.train.schedule, make_parent(path)))
