"""Refuse, when a pipelined program is compiled, collectives that would hang inside a stage's action.

The executor runs each action in a ``while`` loop that only the devices of the stage taking it enter
(:func:`jaxmp.pipeline.engine._run_action`). A collective there must involve only those devices, and
each of them must reach it. Megatron's all-reduces over ``tensor`` do: a tensor group shares a stage.
But XLA sometimes moves data between the devices of a tensor group with a ``collective-permute``: when
a model splits, slices or reshapes an axis that ``tensor`` splits, so that the pieces it asks for
straddle two devices (``jnp.split(qkv, 3, -1)`` of a ``[.., 3D]`` projection split by column). XLA:CPU
runs every collective-permute as one rendezvous of all the program's devices, whatever its
source-target pairs (a collective-permute has no replica groups, so its rendezvous key lists every
partition; all-reduce, all-gather and all-to-all wait for their own group only), so the devices of the
other stages, which never enter that loop, never arrive: the step hangs until XLA aborts it ("Expected 8
threads to join the rendezvous, but only 4 of them arrived"). Such a program is refused when it is
built, with one line naming the operation and the model's source line, never run. XLA:GPU forms its
clique from every device of a collective-permute too, so the rule holds on every backend.
"""

from __future__ import annotations

import jax

from jaxmp.config import ConfigError
from jaxmp.inspection.collectives import Collective, collectives
from jaxmp.inspection.hlo import in_data_dependent_loops
from jaxmp.parallel.mesh import PIPE

# The executor's own exchange between stages: every device reaches it at every tick.
STAGE_AXIS = PIPE


def stranded(hlo_text: str, mesh: jax.sharding.Mesh) -> list[Collective]:
    """The collectives inside a stage's action (a loop of data-dependent trip count) that wait for
    devices which never enter it: every collective-permute (XLA:CPU waits for all the program's devices),
    and any collective whose groups span several stages."""
    inside = in_data_dependent_loops(hlo_text)
    return [
        c
        for c in collectives(hlo_text, mesh)
        if c.name in inside and (c.kind == "collective-permute" or STAGE_AXIS in c.axes)
    ]


def check_stage_collectives(compiled: jax.stages.Compiled, mesh: jax.sharding.Mesh) -> jax.stages.Compiled:
    """``compiled``, or ``ConfigError`` naming the first collective that would hang inside a stage."""
    found = stranded(compiled.as_text(), mesh)
    if not found:
        return compiled
    first = found[0]
    operation = first.op_name.rsplit("/", 1)[-1] or first.name
    where = f" at {first.source}" if first.source else ""
    raise ConfigError(
        f"the model's {operation}{where} makes XLA run a {first.kind} over {'x'.join(first.axes)} inside a "
        "pipeline stage's action, which the other stages never reach: it would hang. Keep tensor-split axes whole "
        "through splits and reshapes (e.g. Q, K and V on an axis of their own, a [D, 3, H, K] kernel, as "
        "jaxmp.models.gpt does), or run it without pipe."
    )
