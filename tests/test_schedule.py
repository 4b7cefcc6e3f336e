"""Schedule tables: the closed forms of their bubbles, their stash, their validation, and the messages
and phases the executor reads off them."""

import numpy as np
import pytest

from jaxmp.config import ConfigError
from jaxmp.pipeline import build_schedule, dualpipev, gpipe, naive, one_f_one_b, plot, render, zb_h1, zb_v
from jaxmp.pipeline.registry import FULL, SCHEDULES, SPLIT, V
from jaxmp.pipeline.schedule import (
    BACKWARD,
    FORWARD,
    IDLE,
    INPUT,
    KINDS,
    UNIT_COSTS,
    WEIGHT,
    lockstep_bubble,
    timed_bubble,
    timeline,
    v_placement,
    validate,
)
from jaxmp.pipeline.transfers import work_out_transfers


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


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 2), (2, 5), (4, 4), (4, 9), (4, 16)])
def test_1f1b_has_gpipes_bubble_and_stashes_at_most_s(stages, microbatches):
    schedule = one_f_one_b(stages, microbatches)
    assert schedule.ticks == gpipe(stages, microbatches).ticks
    assert schedule.bubble_fraction == pytest.approx((stages - 1) / (microbatches + stages - 1))
    # stage s holds at most S - s inputs (GPipe: M on every stage)
    assert schedule.stashed().tolist() == [min(stages - s, microbatches) for s in range(stages)]
    # the last stage runs each backward right after its forward
    last = stages - 1
    assert all(schedule.when(BACKWARD, m, last) == schedule.when(FORWARD, m, last) + 1 for m in range(microbatches))


@pytest.mark.parametrize(
    ("stages", "microbatches", "repeats"), [(2, 4, 2), (4, 8, 2), (4, 16, 2), (2, 6, 3), (2, 5, 2)]
)
def test_interleaved_1f1b_bubble_shrinks_with_repeats(stages, microbatches, repeats):
    schedule = one_f_one_b(stages, microbatches, repeats)
    assert schedule.name == "interleaved-1f1b"
    closed = (stages - 1) / (repeats * microbatches + stages - 1)
    if microbatches % stages == 0:
        assert schedule.bubble_fraction == pytest.approx(closed)
        # Megatron's warm-up: 2(S - s - 1) + (R - 1)S forwards, then one in flight more
        assert schedule.stashed().tolist() == [2 * (stages - s - 1) + (repeats - 1) * stages + 1 for s in range(stages)]
    else:
        assert closed < schedule.bubble_fraction < one_f_one_b(stages, microbatches).bubble_fraction
    assert schedule.stashed().max() < gpipe(stages, microbatches, repeats).stashed().max()


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 2), (2, 5), (4, 8), (4, 9), (3, 7)])
def test_zb_h1_fills_the_bubble_with_weight_gradients(stages, microbatches):
    schedule = zb_h1(stages, microbatches)
    assert schedule.split_backward
    assert schedule.ticks == 3 * microbatches + stages - 1
    assert schedule.bubble_fraction == pytest.approx((stages - 1) / (3 * microbatches + stages - 1))
    # in time units (F = B = W), 1F1B idles 3(S-1) per stage and ZB-H1 S-1: a third
    idle = (~schedule.busy).sum(axis=0)
    assert idle.tolist() == [stages - 1] * stages
    # at 1F1B's peak stash (the paper's ZB-H1), on every stage
    assert schedule.stashed().tolist() == [one_f_one_b(stages, microbatches).stashed().max()] * stages
    for m in range(microbatches):  # every W after its own I
        for c in range(stages):
            assert schedule.when(WEIGHT, m, c) > schedule.when(INPUT, m, c) >= 0


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 2), (2, 5), (4, 4), (4, 9), (3, 7)])
def test_zb_v_halves_zb_h1s_bubble_at_1f1bs_memory(stages, microbatches):
    schedule = zb_v(stages, microbatches)
    assert schedule.chunk_stage == (*range(stages), *reversed(range(stages)))  # a V, turning on stage S-1
    assert schedule.split_backward
    assert schedule.ticks == 6 * microbatches + stages - 1
    assert schedule.bubble_fraction == pytest.approx((stages - 1) / (6 * microbatches + stages - 1))
    # S-1 idle ticks per stage as ZB-H1, but a tick runs half a stage's layers: half its idle time
    idle = (~schedule.busy).sum(axis=0)
    assert idle.tolist() == [stages - 1] * stages == (~zb_h1(stages, microbatches).busy).sum(axis=0).tolist()
    # 2S half-size chunks in flight per stage: 1F1B's S stage-size ones, in bytes
    assert schedule.stashed().tolist() == [2 * stages] * stages
    assert 2 * stages == 2 * one_f_one_b(stages, microbatches).stashed().max()
    for m in range(microbatches):
        for c in range(2 * stages):
            assert schedule.when(WEIGHT, m, c) > schedule.when(INPUT, m, c) >= 0


def test_zb_v_turns_with_a_message_to_itself_and_hears_from_two_at_once():
    schedule = zb_v(4, 8)
    transfers = work_out_transfers(schedule)
    pairs = {pair for loop in transfers.loops for rounds in loop.rounds for r in rounds for pair in r}
    assert (3, 3) in pairs  # chunk 3 -> chunk 4, both on stage 3
    assert (transfers.recv_input[:, :, 1, 1] >= 0).any() and (transfers.recv_grad[:, :, 1, 1] >= 0).any()
    for t, s in zip(*np.nonzero((transfers.recv_input[:, :, :, 1] >= 0).all(axis=2)), strict=True):
        assert transfers.recv_input[t, s, 0, 1] != transfers.recv_input[t, s, 1, 1]  # two slots
    # the 6-tick steady state (F F B B W W) is one loop: as many loops at M=32 as at M=8
    assert len(work_out_transfers(zb_v(4, 32)).loops) == len(transfers.loops)


def test_naive_takes_repeats_and_1f1b_a_placement():
    """Both options change the table (so neither is refused with these schedules; --repeats with gpipe:
    ``test_circular_bubble``): naive runs its one micro-batch through ``R*S`` circular chunks, 1f1b
    starts on the device a placement names."""
    circular = naive(2, repeats=2)
    assert circular.chunk_stage == (0, 1, 0, 1) and circular.ticks == 2 * naive(2).ticks
    placed = build_schedule("1f1b", 2, 2, placement=(1, 0, 1))
    assert placed.chunk_stage == (1, 0, 1)
    assert (placed.kind[0, 1], placed.chunk[0, 1]) == (FORWARD, 0) and placed.kind[0, 0] == IDLE


def test_unknown_or_unfit_schedules_are_refused():
    with pytest.raises(ConfigError, match="unknown pipeline schedule 'pipedream'"):
        build_schedule("pipedream", 2, 2)
    with pytest.raises(ConfigError, match="zb-h1 runs one chunk per device"):
        build_schedule("zb-h1", 2, 4, 2)
    with pytest.raises(ConfigError, match="cannot run this chunk placement"):
        build_schedule("1f1b", 2, 2, placement=(0, 1, 1, 0))
    for name in ("zb-v", "dualpipev"):  # the V is the spec's, checked in one place for both
        for bad in (dict(repeats=3), dict(placement=(0, 1, 0, 1))):
            with pytest.raises(ConfigError, match=f"{name} places two chunks per device in a V"):
                build_schedule(name, 2, 4, **bad)
    with pytest.raises(ConfigError, match="dualpipev needs at least 2 devices along pipe, got 1"):
        build_schedule("dualpipev", 1, 4)


def test_plot_draws_every_action_and_leaves_idle_blank(tmp_path):
    schedule = zb_h1(3, 4)
    figure = plot(schedule, tmp_path / "zb.png")
    boxes = [p for p in figure.axes[0].patches]
    assert len(boxes) == int(schedule.busy.sum())
    colours = {tuple(p.get_facecolor()) for p in boxes}
    assert len(colours) == 3  # F, B and W
    assert f"bubble {2 / 14:.1%}" in figure.axes[0].get_title()  # (S-1)/(3M+S-1)
    assert (tmp_path / "zb.png").stat().st_size > 1000


def test_vanilla_model_parallelism_idles_in_all_but_two_slots():
    """Three devices, F1 F2 F3 then B3 B2 B1: each device works in 2 of 2S slots."""
    schedule = naive(3)
    assert render(schedule).splitlines() == [
        "stage 0: 0F0   .   .   .   . 0B0",
        "stage 1:   . 1F0   .   . 1B0   .",
        "stage 2:   .   . 2F0 2B0   .   .",
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
        ((1, 1, BACKWARD, 0, 1), r"tick 1, stage 1: 1B0 comes before its own forward"),
        ((0, 1, FORWARD, 0, 1), r"tick 0, stage 1: 1F0 comes before 0F0 has finished"),
        ((2, 0, FORWARD, 0, 0), r"tick 2, stage 0: 0F0 runs twice"),
        ((0, 0, FORWARD, 0, 1), r"runs on the wrong stage"),
        ((4, 0, IDLE, -1, -1), r"never runs 0B0"),
        ((0, 0, 7, 0, 0), r"is not an action this executor knows"),
    ],
)
def test_an_invalid_table_names_its_first_bad_slot(edit, message):
    with pytest.raises(ConfigError, match=message):
        validate(broken(gpipe(2, 2), *edit))


def test_messages_land_in_slots_and_loops_send_one_way():
    schedule = gpipe(3, 3)
    transfers = work_out_transfers(schedule)
    assert transfers.input_slots == 3  # stages 1 and 2 keep all three inputs until their backward
    # the forward loop sends activations only, the backward loop cotangents only
    assert [(loop.ticks.shape, loop.rounds) for loop in transfers.loops] == [
        ((5, 1), ((((0, 1), (1, 2)),),)),  # one position, one round, its pairs
        ((5, 1), ((((1, 0), (2, 1)),),)),
    ]
    # every forward input of stage 1 is read from the slot it landed in
    for t in np.flatnonzero(schedule.kind[:, 1] == FORWARD):
        arrived = int(np.flatnonzero(transfers.recv_input[:, 1, 0, 1] == transfers.read_input[t, 1, 0])[0])
        assert arrived <= t


def test_1f1b_sends_both_ways_in_one_permute_per_tick():
    """1F1B's steady state alternates two patterns (stage s sends on when t + s is even, back otherwise):
    one loop of period 2, one collective-permute per tick, so the traffic is T messages, not 2T."""
    schedule = one_f_one_b(4, 8)
    transfers = work_out_transfers(schedule)
    assert transfers.permutes == schedule.ticks and transfers.rounds == 1
    assert 2 in [loop.ticks.shape[1] for loop in transfers.loops]
    assert len(transfers.loops) <= 5
    for loop in transfers.loops:
        for rounds in loop.rounds:
            for pairs in rounds:  # each a partial permutation
                assert len({s for s, _ in pairs}) == len(pairs) == len({d for _, d in pairs})
    covered = np.sort(np.concatenate([loop.ticks.ravel() for loop in transfers.loops]))
    assert covered.tolist() == list(range(schedule.ticks))


def test_a_weight_gradient_before_its_backward_is_refused():
    schedule = zb_h1(2, 2)
    t = schedule.when(WEIGHT, 0, 0)
    b = schedule.when(INPUT, 0, 0)
    swapped = broken(broken(schedule, t, 0, INPUT, 0, 0), b, 0, WEIGHT, 0, 0)
    with pytest.raises(ConfigError, match=rf"tick {b}, stage 0: 0W0 comes before its own 0I0"):
        validate(swapped)


def test_zb_h1_messages_keep_cotangents_until_their_weight_gradient():
    schedule = zb_h1(2, 3)
    transfers = work_out_transfers(schedule)
    for t in np.flatnonzero(schedule.kind[:, 0] == WEIGHT):
        m = int(schedule.microbatch[t, 0])
        slot = transfers.read_grad[t, 0, 0]
        assert slot >= 0 and slot == transfers.read_grad[schedule.when(INPUT, m, 0), 0, 0]
        # no other cotangent lands in that slot between this micro-batch's I and W
        later = transfers.recv_grad[schedule.when(INPUT, m, 0) + 1 : t + 1, 0, 0, 1]
        assert slot not in later.tolist()


@pytest.mark.parametrize(
    "schedule",
    [gpipe(4, 8), one_f_one_b(4, 8), zb_h1(4, 8), one_f_one_b(2, 6, 2), dualpipev(4, 9)],
    ids=lambda s: f"{s.name}-S{s.stages}-M{s.microbatches}-R{s.repeats}",
)
def test_residual_slots_hold_each_forward_until_its_last_backward(schedule):
    """Every forward's residuals stay in their slot, untouched by other forwards, until its B (and W)
    reads them; stage 0 (never the fused last chunk's) needs a slot per micro-batch it has in flight."""
    from jaxmp.pipeline.plan import fuses_last_chunk, stashes

    keeps = stashes(schedule, fuses_last_chunk(schedule))
    transfers = work_out_transfers(schedule, stashes=keeps)
    held, stashed = [{} for _ in range(schedule.stages)], set()
    for t, s, lane, kind, m, c in sorted(schedule.actions()):
        key, slot = (m, c), transfers.residual_slot[t, s, lane]
        if keeps[t, s, lane]:
            held[s][slot] = key
            stashed.add(key)
        elif kind != FORWARD and key in stashed:
            assert held[s].get(slot) == key, (t, s)
    assert transfers.residual_slots == schedule.stashed().max()


# --- the registry: each schedule's promises, checked against its tables ---------------------------------


def _tables_of(spec):
    """Every (S, M, R) the spec runs among S in {2, 3, 4}, M in 1..9, R in {1, 2} where it places freely."""
    for stages in (2, 3, 4):
        for microbatches in range(1, 10) if spec.microbatches is None else (spec.microbatches,):
            for repeats in (1, 2) if spec.placement == "any" else (1,):
                schedule = build_schedule(spec.name, stages, microbatches, repeats)
                yield stages, schedule.microbatches, schedule.repeats, schedule


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_each_schedule_keeps_its_registry_promises(name):
    """The stash bound always; the bubble formula (idle time, F = I = W = 1 and B = 2 per chunk) wherever
    the spec says it holds; the placement and backward kinds it declares."""
    spec = SCHEDULES[name]
    held = 0
    for stages, microbatches, repeats, schedule in _tables_of(spec):
        where = f"{name} S={stages} M={microbatches} R={repeats}"
        assert schedule.stashed().max() <= spec.stash(stages, microbatches, repeats), where
        if spec.bubble_holds(stages, microbatches, repeats):
            assert timed_bubble(schedule) == pytest.approx(spec.bubble(stages, microbatches, repeats)), where
            held += 1
        kinds = {int(k) for lane in schedule.lanes for k in np.unique(lane.kind)} - {IDLE}
        assert kinds == {FULL: {FORWARD, BACKWARD}, SPLIT: {FORWARD, INPUT, WEIGHT}}.get(spec.backward, set(KINDS))
        if spec.placement == V:
            assert schedule.chunk_stage == v_placement(stages), where
    assert held >= 3  # the formula is checked, not skipped


@pytest.mark.parametrize("stages", [4, 8])
def test_dualpipev_bubble_is_the_deepseek_v3_formula_in_unit_costs(stages):
    """The report's bubble (PP/2 - 1)(F&B + B - 3W) with PP = 2S chunks, F = I = W = 1, B = 2 and a pair
    F + B = 3 is 2(S - 1) idle per device: every device of the table idles exactly that, for M >= 2S.
    jaxmp's lockstep ticks (a pair's tick as long as both halves) idle more: measured, not promised."""
    for microbatches in (2 * stages, 2 * stages + 1, 4 * stages):
        schedule = dualpipev(stages, microbatches)
        work = 2 * microbatches * (UNIT_COSTS[FORWARD] + UNIT_COSTS[BACKWARD])
        assert timeline(schedule).tolist() == [work + 2 * (stages - 1)] * stages
        assert timed_bubble(schedule) == pytest.approx((stages - 1) / (3 * microbatches + stages - 1))
        assert timed_bubble(schedule) <= lockstep_bubble(schedule) < 2.5 * timed_bubble(schedule)
    # the negative control: zb-v's order under the same costs idles S - 1, not 2(S - 1)
    assert timeline(zb_v(stages, 2 * stages)).max() == 2 * 2 * stages * 3 + stages - 1


@pytest.mark.parametrize(("stages", "microbatches"), [(2, 2), (2, 5), (4, 4), (4, 8), (4, 9), (8, 16)])
def test_dualpipev_stashes_at_most_2s_plus_1_chunks_and_overlaps_its_steady_state(stages, microbatches):
    """At most PP + 1 = 2S + 1 chunk-micro-batches per device (S + 1/2 stage-sized ones); every pair a
    forward and a backward of two micro-batches; from M = 2S on, every device runs pairs."""
    schedule = dualpipev(stages, microbatches)
    assert schedule.stashed().max() <= 2 * stages + 1
    if schedule.paired is None:  # M = S = 2: what is left of the steady state has no pair
        assert microbatches < 2 * stages
        return
    pairs = schedule.paired.kind != IDLE
    assert (schedule.kind[pairs] == FORWARD).all() and np.isin(schedule.paired.kind[pairs], (BACKWARD, INPUT)).all()
    assert (schedule.microbatch[pairs] != schedule.paired.microbatch[pairs]).all()
    if microbatches >= 2 * stages:
        assert pairs.any(axis=0).all()


def test_no_code_outside_the_registry_checks_a_schedules_name():
    """Every rule of a schedule lives in its spec: no comparison with a schedule's name elsewhere."""
    import ast
    from pathlib import Path

    import jaxmp

    names = set(SCHEDULES)
    found = []
    for path in Path(jaxmp.__file__).parent.rglob("*.py"):
        if path.name == "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
                found += [f"{path.name}:{node.lineno}" for value in constants if value in names]
    assert not found
