"""``--profile-steps A:B``: a ``jax.profiler`` trace of train steps A..B, for Perfetto or TensorBoard.

Why a window and not the whole run: a trace of every step is large and slow to open; a few steps after
compilation show what matters (on real hardware, each pipeline stage's busy and idle time, i.e. the
bubble, and every collective). Each step is wrapped in ``StepTraceAnnotation`` so TensorBoard's
profile plugin finds step boundaries, and the trace stops only after step B's results are ready, so the
window holds B's device work even though the loop dispatches ahead. Open
``DIR/plugins/profile/<run>/*.trace.json.gz`` at https://ui.perfetto.dev or point TensorBoard at DIR.
"""

from __future__ import annotations

import os

import jax

from jaxmp.config import Config, ConfigError, parse_profile_steps
from jaxmp.training.metrics import check_output_dir


def check_profile(cfg: Config, start_step: int, total_steps: int) -> tuple[int, int] | None:
    """The steps to trace, checked against the steps this run trains; writes nothing.

    Raises:
      ConfigError: the window lies outside ``start_step + 1 .. total_steps`` or the folder cannot be made.
    """
    if cfg.run.profile_steps is None:
        return None
    first, last = parse_profile_steps(cfg.run.profile_steps)
    if first <= start_step or last > total_steps:
        raise ConfigError(
            f"--profile-steps {first}:{last} lies outside the steps this run trains ({start_step + 1}..{total_steps})."
        )
    check_output_dir("--profile-dir", cfg.run.profile_dir)
    return first, last


class StepProfiler:
    """Starts the trace before step ``first`` and stops it once step ``last`` has finished."""

    def __init__(self, window: tuple[int, int] | None, directory: str):
        self.window, self.directory, self.active = window, directory, False

    def before(self, step: int) -> None:
        if self.window and step == self.window[0]:
            directory = self.directory
            if jax.process_count() > 1:  # processes on one host would write the same file names
                directory = os.path.join(directory, f"process_{jax.process_index()}")
            jax.profiler.start_trace(directory, create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step == self.window[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
