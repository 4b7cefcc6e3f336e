"""Schedules as text: torch's action notation and per-rank CSV read into tick tables and written out of
them, a hand-written CSV run against one device, bad lists refused in one line, and golden tables.

Golden schedules: ``tests/golden/<name>.txt`` holds each built-in table for S=4, M=8 (R=2 for
interleaved-1f1b and circular gpipe; naive: M=1) as ``render`` prints it, one line per device in torch's
notation. A change to a table fails ``test_builtin_tables_match_their_golden_files`` with the cells that
moved. If the change is meant, regenerate the files and commit them with it::

    python tests/test_schedule_notation.py --regenerate
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmp.config import ConfigError
from jaxmp.pipeline import build_schedule, one_f_one_b, read_csv, render, to_csv, write_csv
from jaxmp.pipeline.notation import Action, Pair, from_csv, parse_action
from jaxmp.pipeline.schedule import BACKWARD, FORWARD, INPUT, WEIGHT, action_text

GOLDEN = Path(__file__).parent / "golden"
S, M = 4, 8
BUILT_IN = {  # golden file name -> (schedule, repeats, micro-batches)
    "gpipe": ("gpipe", 1, M),
    "gpipe-r2": ("gpipe", 2, M),
    "1f1b": ("1f1b", 1, M),
    "interleaved-1f1b-r2": ("interleaved-1f1b", 2, M),
    "zb-h1": ("zb-h1", 1, M),
    "zb-v": ("zb-v", 1, M),
    "dualpipev": ("dualpipev", 1, M),
    "naive": ("naive", 1, 1),
}

# 1F1B on 4 devices, 4 micro-batches, written by hand: device s warms up with S-1-s forwards.
ONE_F_ONE_B = """\
0F0,0F1,0F2,0F3,0B0,0B1,0B2,0B3
1F0,1F1,1F2,1B0,1F3,1B1,1B2,1B3
2F0,2F1,2B0,2F2,2B1,2F3,2B2,2B3
3F0,3B0,3F1,3B1,3F2,3B2,3F3,3B3
"""


def built_in(name: str):
    schedule, repeats, microbatches = BUILT_IN[name]
    return build_schedule(schedule, S, microbatches, repeats)


def golden_text(name: str) -> str:
    schedule = built_in(name)
    placement = ",".join(map(str, schedule.chunk_stage))
    header = f"# {schedule.name}: S={S}, M={schedule.microbatches}, chunks on devices {placement}; "
    header += f"bubble {schedule.bubble_fraction:.4f}"
    return f"{header}\n{render(schedule)}\n"


def regenerate() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name in BUILT_IN:
        (GOLDEN / f"{name}.txt").write_text(golden_text(name))
        print(f"wrote {GOLDEN / name}.txt")


def same_table(a, b) -> bool:
    """The same stages, micro-batches, placement and actions in every lane (a pair's backward included)."""
    head = (a.stages, a.microbatches, a.chunk_stage, len(a.lanes)) == (
        b.stages,
        b.microbatches,
        b.chunk_stage,
        len(b.lanes),
    )
    return head and all(
        np.array_equal(x, y) for la, lb in zip(a.lanes, b.lanes, strict=True) for x, y in zip(la, lb, strict=True)
    )


# --- the notation -------------------------------------------------------------------------------------


def test_actions_print_and_parse_in_torchs_notation():
    assert action_text(FORWARD, 0, 2) == "2F0"
    assert action_text(BACKWARD, 3, 1) == "1B3"  # a full backward
    assert action_text(INPUT, 1, 0) == "0I1"  # input cotangent only, its W later
    assert action_text(WEIGHT, 1, 0) == "0W1"
    for text in ("2F0", "1B3", "0I1", "0W1", "12F105", "(0F7;7B3)OVERLAP_F_B", "(3F5;4I1)OVERLAP_F_B"):
        assert str(parse_action(text)) == text
    assert parse_action(" 7I3 ") == Action(7, "I", 3)
    assert parse_action("(0F7;7B3)OVERLAP_F_B") == Pair(Action(0, "F", 7), Action(7, "B", 3))


def test_render_and_csv_print_a_split_backward_as_i():
    schedule = build_schedule("zb-h1", 2, 2)
    assert render(schedule).splitlines()[0].split()[2:] == ["0F0", "0F1", ".", "0I0", "0W0", "0I1", "0W1"]
    assert to_csv(schedule).splitlines() == ["0F0,0F1,0I0,0W0,0I1,0W1", "1F0,1I0,1F1,1I1,1W0,1W1"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_table_round_trips_through_csv(name, tmp_path):
    """Written in torch's per-rank form and read back (each action at the first tick its inputs are
    there): the identical table, ticks and idle slots included."""
    schedule = built_in(name)
    write_csv(schedule, tmp_path / f"{name}.csv")
    back = read_csv(tmp_path / f"{name}.csv")
    assert same_table(back, schedule), f"{name}:\n{render(schedule)}\nread back:\n{render(back)}"
    assert back.name == f"{name}.csv"


@pytest.mark.parametrize(("devices", "microbatches"), [(4, 8), (2, 4)])
def test_dualpipev_is_torchs_action_for_action(devices, microbatches):
    """torch 2.14's ScheduleDualPipeV, its ``pipeline_order`` dumped per rank (``tests/golden/torch-*.csv``):
    jaxmp's lists are the same, pairs and I/W splits included, and read into the same table."""
    torch_csv = (GOLDEN / f"torch-dualpipev-{devices}x{microbatches}.csv").read_text()
    ours = build_schedule("dualpipev", devices, microbatches)
    assert to_csv(ours) == torch_csv
    assert same_table(from_csv(torch_csv), ours)


def test_pairs_and_mixed_backwards_round_trip_and_draw_as_pairs():
    schedule = build_schedule("dualpipev", 2, 4)
    assert schedule.paired is not None and {"B", "I", "W"} <= set(to_csv(schedule))
    assert render(schedule).splitlines()[0].split()[9:11] == ["0F3;3B1", "3F2;0B0"]
    assert schedule.text(7, 0) == "(0F3;3B1)OVERLAP_F_B"


def test_a_hand_written_1f1b_is_the_built_in_1f1b():
    assert same_table(from_csv(ONE_F_ONE_B), one_f_one_b(4, 4))


def test_empty_cells_are_no_action_and_an_action_waits_for_its_inputs():
    """torch's dumps leave a cell empty for an idle step; placement needs no such hints: device 1 waits a
    tick for 0F0's message, and device 0's backward for device 1's."""
    schedule = from_csv("0F0,,,0B0\n,1F0,1B0\n")
    assert render(schedule).splitlines() == ["stage 0: 0F0   .   . 0B0", "stage 1:   . 1F0 1B0   ."]


# --- lists that cannot run: one line naming the first bad action ---------------------------------------

BAD = [
    ("0F0,0B0,0F1,0B1\n1F1,1F0,1B0,1B1\n", r"deadlocks: device 0 waits at 0B0 for 1B0, device 1 waits at 1F1 for 0F1;"),
    ("0F0,0W0,0I0\n1F0,1I0,1W0\n", r"0W0 on device 0 comes before 0I0, its input, on the same device"),
    ("0F0,0B0,1B0\n1F0\n", r"1B0 on device 0, but chunk 1 runs on device 1"),
    ("0F0,0F1,0B0,0B1\n1F0,1B0,1F1\n", r"micro-batch 1 is missing 1B1"),
    ("0F0,0X0,0B0\n1F0,1B0\n", r"device 0, action 1: 0X0 has the unknown action kind 'X'; the kinds are F, I, W and B"),
    ("0F0,(0F1;0F0)OVERLAP_F_B\n", r"\(0F1;0F0\)OVERLAP_F_B must overlap a forward with a backward \(B or I\)"),
    ("0F0,(0F1;0B0)\n", r"\(0F1;0B0\) is not an overlapped pair"),
    ("0F0,0B0,0W0\n1F0,1I0,1W0\n", r"micro-batch 0 runs both 0B0 and a split backward"),
    ("0F0,0F0,0B0\n1F0,1B0\n", r"0F0 on device 0 runs 2 times"),
    ("0F0,F1\n", r"'F1' is not an action \{chunk\}\{F\|I\|W\|B\}\{micro-batch\}"),
    ("0F0,2F0,0B0,2B0\n3F0,3B0\n", r"chunk 1 never runs \(chunks are numbered 0..3\)"),
    ("0F0,0B0\n\n1F0,1B0\n", r"device 1 runs no action"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_a_list_that_cannot_run_is_one_line_naming_its_first_bad_action(text, message):
    with pytest.raises(ConfigError, match=message) as error:
        from_csv(text, name="mine.csv")
    assert "\n" not in str(error.value) and str(error.value).startswith("schedule CSV mine.csv")


def test_a_deadlock_of_three_devices_names_the_cycle():
    """Chunk 3 comes back to device 0, which wants its forward before chunk 0's."""
    text = "3F0,0F0,3B0,0B0\n1F0,1B0\n2F0,2B0\n"
    cycle = "device 0 waits at 3F0 for 2F0, device 2 waits at 2F0 for 1F0, device 1 waits at 1F0 for 0F0;"
    with pytest.raises(ConfigError, match=cycle):
        from_csv(text)


# --- the trainer runs a table read from a file ----------------------------------------------------------


def test_a_hand_written_csv_runs_and_equals_one_device(tmp_path):
    from support import assert_same, build, loss_and_grads, single_device_mesh, small_config

    from jaxmp.parallel.mesh import MeshShape, build_mesh

    path = tmp_path / "1f1b.csv"
    path.write_text(ONE_F_ONE_B)
    cfg = small_config("mlp", "tp", depth=8, batch_size=16)
    piped = cfg.replace(schedule_csv=str(path), microbatches=4)
    mesh = build_mesh(MeshShape(pipe=4))
    assert build(piped, mesh).pipeline.train.schedule.name == "1f1b.csv"  # the file's table, not --schedule's
    got = loss_and_grads(piped, mesh, poison=True)
    assert_same(got, loss_and_grads(cfg, single_device_mesh()))


def test_cli_refuses_a_bad_schedule_csv_in_one_line_before_any_file(tmp_path, capsys):
    from jaxmp.train import main

    good, bad = tmp_path / "1f1b.csv", tmp_path / "deadlock.csv"
    good.write_text(ONE_F_ONE_B)
    bad.write_text(BAD[0][0])
    metrics = tmp_path / "metrics.jsonl"
    cases = [
        (["--schedule-csv", str(good), "--mesh", "pipe=4"], "runs 4 micro-batches, --microbatches is 1"),
        (["--schedule-csv", str(good), "--mesh", "pipe=2,data=4", "--microbatches", "4"], "the mesh has pipe=2"),
        (["--schedule-csv", str(bad), "--mesh", "pipe=2", "--microbatches", "2"], "deadlock.csv deadlocks: device 0"),
        (["--schedule-csv", str(tmp_path / "none.csv")], "none.csv cannot be read (FileNotFoundError"),
        (["--schedule-csv", str(good), "--schedule", "zb-v"], "sets the schedule, chunks and placement; drop --sch"),
    ]
    for argv, message in cases:
        assert main(["--metrics-file", str(metrics), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1f1b.csv", "deadlock.csv"]  # nothing written


# --- golden schedules ------------------------------------------------------------------------------------


def cell_changes(expected: str, got: str) -> list[str]:
    """The cells that differ, as ``stage s, tick t: golden X, now Y`` (at most 12)."""
    rows = [[line.split()[2:] for line in text.splitlines() if line.startswith("stage")] for text in (expected, got)]
    changes = []
    for s, (old, new) in enumerate(zip(*rows, strict=False)):
        for t in range(max(len(old), len(new))):
            a, b = (row[t] if t < len(row) else "-" for row in (old, new))
            if a != b:
                changes.append(f"stage {s}, tick {t}: golden {a}, now {b}")
    return changes[:12]


@pytest.mark.parametrize("name", BUILT_IN)
def test_builtin_tables_match_their_golden_files(name):
    path = GOLDEN / f"{name}.txt"
    expected, got = path.read_text(), golden_text(name)
    if got != expected:
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), got.splitlines(), str(path), "now", lineterm=""))
        changes = "\n".join(cell_changes(expected, got))
        pytest.fail(
            f"the {name} table changed:\n{changes}\n\n{diff}\n\n"
            "if that is meant: python tests/test_schedule_notation.py --regenerate",
            pytrace=False,
        )


def test_a_changed_table_fails_with_the_cells_that_moved():
    """Negative control: 1F1B with two cells swapped shows both."""
    expected = golden_text("1f1b")
    lines = expected.splitlines()
    lines[1] = lines[1].replace("0B0 0F4", "0F4 0B0")
    assert cell_changes(expected, "\n".join(lines)) == [
        "stage 0, tick 7: golden 0B0, now 0F4",
        "stage 0, tick 8: golden 0F4, now 0B0",
    ]


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_schedule_notation.py --regenerate")
    regenerate()
