"""Schedule tables: the closed forms of their bubbles, their stash, their validation, and the messages
and phases the executor reads off them."""

import numpy as np
import pytest

from jaxmp.config import ConfigError
from jaxmp.pipeline import gpipe, naive, render
from jaxmp.pipeline.schedule import BACKWARD, FORWARD, IDLE, validate
from jaxmp.pipeline.transfers import plan_transfers


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 1), (2, 8), (4, 3), (8, 32)])
def test_gpipe_bubble_is_the_closed_form(stages, microbatches):
    schedule = gpipe(stages, microbatches)
    assert schedule.ticks == 2 * (microbatches + stages - 1)
    assert schedule.bubble_fraction == pytest.approx((stages - 1) / (microbatches + stages - 1))
    assert schedule.stashed().tolist() == [microbatches] * stages  # GPipe keeps every micro-batch's input


@pytest.mark.parametrize(("stages", "microbatches", "repeats"), [(4, 8, 2), (2, 4, 3), (2, 3, 2)])
def test_circular_bubble(stages, microbatches, repeats):
    schedule = gpipe(stages, microbatches, repeats)
    assert schedule.chunk_stage == tuple(c % stages for c in range(stages * repeats))
    if microbatches % stages == 0:
        assert schedule.bubble_fraction == pytest.approx((stages - 1) / (repeats * microbatches + stages - 1))
    else:  # a last group smaller than S idles on every extra round
        assert schedule.bubble_fraction > (stages - 1) / (repeats * microbatches + stages - 1)


def test_vanilla_model_parallelism_idles_in_all_but_two_slots():
    """Three devices, F1 F2 F3 then B3 B2 B1: each device works in 2 of 2S slots."""
    schedule = naive(3)
    assert render(schedule).splitlines() == [
        "stage 0: F0  .  .  .  . B0",
        "stage 1:  . F0  .  . B0  .",
        "stage 2:  .  . F0 B0  .  .",
    ]
    assert schedule.busy.sum(axis=0).tolist() == [2, 2, 2]


def test_placement_shares_a_device_between_first_and_last_chunk():
    schedule = gpipe(2, 2, placement=(0, 1, 0))
    assert schedule.chunk_stage == (0, 1, 0)
    validate(schedule)
    assert [int(schedule.chunk[t, 0]) for t in range(schedule.ticks) if schedule.kind[t, 0] == FORWARD] == [0, 0, 2, 2]


def broken(schedule, t, s, kind, m, c):
    kinds, mbs, chunks = schedule.kind.copy(), schedule.microbatch.copy(), schedule.chunk.copy()
    kinds[t, s], mbs[t, s], chunks[t, s] = kind, m, c
    return schedule._replace(kind=kinds, microbatch=mbs, chunk=chunks)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ((1, 1, BACKWARD, 0, 1), r"tick 1, stage 1: B\(m=0, chunk=1\) comes before its own forward"),
        ((0, 1, FORWARD, 0, 1), r"tick 0, stage 1: F\(m=0, chunk=1\) comes before F\(m=0, chunk=0\)"),
        ((2, 0, FORWARD, 0, 0), r"tick 2, stage 0: F\(m=0, chunk=0\) runs twice"),
        ((0, 0, FORWARD, 0, 1), r"runs on the wrong stage"),
        ((4, 0, IDLE, -1, -1), r"never runs B\(m=0, chunk=0\)"),
    ],
)
def test_an_invalid_table_names_its_first_bad_slot(edit, message):
    with pytest.raises(ConfigError, match=message):
        validate(broken(gpipe(2, 2), *edit))


def test_messages_land_in_slots_and_phases_send_one_way():
    schedule = gpipe(2, 3)
    transfers = plan_transfers(schedule)
    assert transfers.forward_shifts == (1,) and transfers.backward_shifts == (1,)
    assert transfers.input_slots == 3  # stage 1 keeps all three inputs until their backward
    # the forward phase sends activations only, the backward phase cotangents only
    assert [(p[1] - p[0], p[2], p[3]) for p in transfers.phases] == [(4, (True,), (False,)), (4, (False,), (True,))]
    # every forward input of stage 1 is read from the slot it landed in
    for t in np.flatnonzero(schedule.kind[:, 1] == FORWARD):
        arrived = int(np.flatnonzero(transfers.recv_input[:, 1, 1] == transfers.read_input[t, 1])[0])
        assert arrived <= t
