"""``jaxmp.plan``: every factorisation listed, infeasible ones with their reason, the top choice fits.

Why: a planner that silently drops shapes, or ranks one that cannot run first, is worse than none. The
model is tiny and the device memory faked (``memory_bytes`` override), so a model that "does not fit one
device" compiles in seconds.
"""

from __future__ import annotations

import pytest
from support import CLASSES, IMAGE, assert_one_line_error, run_module, small_config

from jaxmp.inspection.hardware import HARDWARE, get_hardware
from jaxmp.inspection.planner import PlanRow, factorisations, mesh_axes, microbatch_candidates, parse_factors, plan
from jaxmp.parallel.mesh import AXES, CONTEXT, MeshShape
from jaxmp.plan import main

TRIPLES_OF_8 = {
    (8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 4, 1), (2, 2, 2), (2, 1, 4), (1, 8, 1), (1, 4, 2), (1, 2, 4), (1, 1, 8),
}  # fmt: skip


def sizes(mesh: MeshShape) -> tuple[int, int, int]:
    return mesh.data, mesh.tensor, mesh.pipe


def test_factorisations_are_every_ordered_triple():
    assert {sizes(s) for s in factorisations(8)} == TRIPLES_OF_8
    assert len(factorisations(8)) == len(TRIPLES_OF_8) and all(s.context == 1 for s in factorisations(8))
    assert factorisations(1) == [MeshShape()]
    assert len(factorisations(12)) == 18  # (2+2 choose 2) * (1+2 choose 2)


def test_a_model_with_a_sequence_is_planned_over_context_too():
    gpt, mlp = small_config("gpt", "tp"), small_config("mlp", "tp")
    assert mesh_axes(gpt, own_model=False) == AXES and CONTEXT not in mesh_axes(mlp, own_model=False)
    assert CONTEXT not in mesh_axes(gpt, own_model=True)
    shapes = factorisations(8, AXES)
    assert len(shapes) == len(set(shapes)) == 20  # (3+3 choose 3) ordered quadruples
    assert all(s.size == 8 for s in shapes) and MeshShape(context=8) in shapes


def test_microbatch_candidates_and_factors():
    assert microbatch_candidates(1, (1, 2, 4)) == [1]
    assert microbatch_candidates(2, (1, 2, 4)) == [2, 4, 8]
    assert parse_factors("1, 4") == (1, 4)
    for bad in ("0", "x", ""):
        with pytest.raises(ValueError, match="--microbatch-factors"):
            parse_factors(bad)


def test_roofline_adds_communication_to_the_slower_of_compute_and_memory():
    row = PlanRow(MeshShape(data=8), 1, True, "", t_compute=2.0, t_memory=3.0, t_comm=0.5)
    assert row.t_step == 3.5
    assert row._replace(t_compute=4.0).t_step == 4.5
    assert PlanRow(MeshShape(data=8), 1, False, "x").t_step is None


@pytest.fixture(scope="module")
def planned():
    """mlp, 8 devices, a hidden width tensor=8 cannot split, memory smaller than the unsharded state
    (pipelines re-materialise, --remat full: they stash chunk inputs only, so their state decides)."""
    cfg = small_config("mlp", "tp", hidden=60, width=32, depth=2, batch_size=16, optimizer="adam", remat="full")
    params = 144 * 32 + 32 + 2 * (32 * 60 + 60 + 60 * 32 + 32 + 2 * 32) + 32 * 10 + 10
    # params + adam's two moments, unsharded, plus a quarter: the state alone overfills one device, while a
    # split state and its step's temporaries fit
    memory = 3 * 4 * params * 5 // 4
    hw = get_hardware("cpu")._replace(memory_bytes=memory)
    lines: list[str] = []
    rows = plan(cfg, 8, hw, IMAGE, CLASSES, factors=(1,), progress=lines.append)
    assert len(lines) >= len(factorisations(8)) and lines[-1].endswith("mesh 10 of 10")  # a line per compilation
    return rows, hw


def test_the_compute_term_is_flops_over_peak_and_reads_as_a_figure(planned):
    from jaxmp.inspection.planner import duration

    rows, hw = planned
    for row in (r for r in rows if r.feasible):
        assert row.flops > 0 and row.t_compute == pytest.approx(row.flops / hw.flops_for("float32"), rel=1e-12)
        assert float(duration(row.t_compute).split()[0]) > 0  # never "0.000 ms"
    assert [duration(s) for s in (2.5, 0.0123, 4.56e-6, 7e-10)] == ["2.5 s", "12.3 ms", "4.56 µs", "0.7 ns"]


def test_every_factorisation_is_listed(planned):
    rows, _ = planned
    assert {sizes(r.mesh) for r in rows} == TRIPLES_OF_8


def test_infeasible_shapes_say_why(planned):
    rows, hw = planned
    reasons = {sizes(r.mesh): r.reason for r in rows if not r.feasible}
    assert "need at least 4 layers" in reasons[(2, 1, 4)] and "need at least 8 layers" in reasons[(1, 1, 8)]
    assert (
        reasons[(1, 8, 1)].startswith("does not divide: parameter layers.0.layer.")
        and "60 is not divisible by 8" in reasons[(1, 8, 1)]
    )
    assert reasons[(8, 1, 1)].startswith("does not fit: needs")
    for row in rows:
        assert row.feasible == (row.reason == "")
        if row.feasible:
            assert row.peak_bytes <= hw.memory_bytes and row.t_step > 0


def test_top_choice_fits_and_ranking_is_by_step_time(planned):
    rows, hw = planned
    feasible = [r for r in rows if r.feasible]
    assert feasible and rows[0] is feasible[0] and rows[: len(feasible)] == feasible
    assert rows[0].peak_bytes <= hw.memory_bytes and sizes(rows[0].mesh) != (8, 1, 1)
    steps = [r.t_step for r in feasible]
    assert steps == sorted(steps)
    pipelined = [r for r in feasible if r.mesh.pipe == 2]
    assert pipelined and all(r.bubble == pytest.approx(1 / 3) for r in pipelined)  # M = S = 2


def test_hardware_table_has_sources():
    assert set(HARDWARE) == {"cpu", "h100", "h200", "tpu-v5p"}
    for hw in HARDWARE.values():
        assert hw.source and hw.memory_bytes > 0 and hw.memory_bandwidth > 0 and hw.link_bandwidth > 0
        assert hw.flops_for("float32") > 0 and hw.flops_for("bfloat16") >= hw.flops_for("float32")
    assert "rough" in HARDWARE["cpu"].source and "datasheet" in HARDWARE["h100"].source
    assert get_hardware("h100", 0.5).memory_bytes == 2**29


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--devices", "8", "--hardware", "a100"], "--hardware 'a100' is not one of cpu, h100"),
        (["--devices", "8", "--model", "resnet"], "--model 'resnet' is not one of"),
        (["--devices", "16"], "--devices 16: only 8 are available"),
        (["--devices", "8", "--memory-gib", "0"], "--memory-gib must be positive"),
        (["--devices", "8", "--microbatch-factors", "a"], "--microbatch-factors 'a'"),
    ],
)
def test_bad_input_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, message)


def test_process_exit_code_and_json(tmp_path):
    bad = run_module("jaxmp.plan", "--devices", "2", "--cpu-devices", "2", "--hardware", "gpu", cwd=tmp_path)
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr)
    assert list(tmp_path.iterdir()) == []
