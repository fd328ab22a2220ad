"""experiments/bench_harness.py: the meter, the figures, the step timer and the bare loop against the project's."""

import copy
import io

import pytest
import torch
from rich.console import Console
from support import REPO


def _harness():
    """experiments/bench_harness.py (the experiments are scripts, not a package)."""
    import importlib.util
    import sys

    path = REPO / "experiments" / "bench_harness.py"
    spec = importlib.util.spec_from_file_location("bench_harness", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


fb = _harness()

#: the tiny profile scaled down to seconds: 2 clients x 3 patients (6 volumes, 2 batches each)
MICRO = dict(
    fb.PROFILES["tiny"],
    patients_per_client=3,
    img_size=32,
    features=[8, 16, 16, 16],
    proj_hidden=32,
    proj_dim=16,
    num_negatives=32,
    local_bank=64,
    remote_bank=128,
    phantom={"size": 64},
)


def test_meter_sums_and_counts():
    m = fb.Meter()
    m.add("exchange", 0.25)
    m.add("exchange", 0.5)
    m.step(0.125, 12)
    m.step(0.375, 6)
    assert m.get("exchange") == 0.75 and m.get("missing") == 0.0
    assert m.get("steps") == 0.5 and m.step_times == [0.125, 0.375]
    assert (m.steps, m.slices) == (2, 18)


def test_overhead_parts_add_up_to_the_time_outside_steps():
    meter = {"make_trainer": 1.0, "fit_setup": 2.0, "between_steps": 3.0, "fit_teardown": 0.5, "exchange": 4.0}
    proj = {
        "wall_s": 40.0,
        "meter": {**meter, "steps": 20.0},
        "rounds_time": {"train": 35.0, "aggregate": 1.0, "checkpoint": 0.5, "total": 38.0},
    }
    parts = fb.overhead_parts(proj)
    assert parts["client_state_swap"] == 35.0 - 20.0 - 10.5
    assert (parts["aggregation"], parts["checkpoint"], parts["other_loop"], parts["outside_rounds"]) == (
        1.0,
        0.5,
        1.5,
        2.0,
    )
    assert set(parts) == set(fb.PART_LABELS)
    assert sum(parts.values()) == pytest.approx(40.0 - 20.0)


def test_disturbed_flags_outlier_steps_and_unequal_medians():
    steady = {"step_times": [0.1, 0.1, 0.11]}
    assert fb.disturbed(steady, steady) == []
    assert fb.disturbed({"step_times": [0.1, 0.1, 0.5]}, steady) == ["project"]
    assert fb.disturbed(steady, {"step_times": [0.3, 0.3, 0.3]}) == ["bare"]


def run_both(root, local_steps=None):
    """One project round and one bare round on MICRO, from the same initial weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy shared CPU slows multi-threaded torch many times over
    try:
        dm = fb.build_data(MICRO, 2, MICRO["img_size"], None)
        module = fb.build_module(MICRO)
        init = {k: v.cpu().clone() for k, v in module.global_state().items()}
        batches = fb.prebuild_batches(dm, 1, local_steps)
        fed = {"local_steps": local_steps} if local_steps else None
        cpu, console = torch.device("cpu"), Console(file=io.StringIO())
        proj = fb.run_project(copy.deepcopy(module), dm, 1, cpu, root, console, federation=fed)
        bare = fb.run_bare(init, MICRO, dm, batches, 1, cpu)
    finally:
        torch.set_num_threads(threads)
    return dm, batches, proj, bare


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_both(tmp_path_factory.mktemp("bench"))


def test_step_timer_counts_the_steps_of_the_client_fits(runs):
    dm, _, proj, _ = runs
    loaders = [dm.pretrain_loader(c, 0) for c in range(dm.num_clients)]
    steps = sum(len(dl) for dl in loaders)
    assert steps == 4  # 2 clients x 2 batches of V=3 volumes
    assert proj["steps"] == len(proj["step_times"]) == steps
    assert proj["slices"] == steps * fb.V * fb.S
    m = proj["meter"]
    assert m["steps"] == pytest.approx(sum(proj["step_times"]))
    assert all(m[k] > 0 for k in ("make_trainer", "fit_setup", "between_steps", "fit_teardown", "exchange"))
    assert proj["export_devices"] == ["cpu"]


def test_bare_loop_does_the_project_loops_work(runs):
    _, batches, proj, bare = runs
    assert bare["steps"] == proj["steps"] == sum(len(epoch) for client in batches[0] for epoch in client)
    assert bare["slices"] == proj["slices"]
    assert len(bare["losses"]) == len(proj["losses"]) == 1
    assert bare["losses"] == pytest.approx(proj["losses"], abs=1e-5)
    f = fb.figures(proj, bare)
    assert f["loss_max_abs_diff"] < 1e-5
    assert f["step_s"] + sum(f["overhead_breakdown_s"].values()) == pytest.approx(proj["wall_s"])


def test_bare_loop_does_the_project_loops_work_over_local_steps(tmp_path):
    """``federation.local_steps`` past one epoch: the bare loop replays the epochs Lightning
    iterates (2 batches each, the third cut short) and ends on the project's loss."""
    _, batches, proj, bare = run_both(tmp_path, local_steps=5)
    assert [[len(e) for e in client] for client in batches[0]] == [[2, 2, 1], [2, 2, 1]]
    assert bare["steps"] == proj["steps"] == 10
    assert bare["losses"] == pytest.approx(proj["losses"], abs=1e-5)


def test_paired_ratios_compare_each_repeats_runs():
    proj = [{"wall_s": w} for w in (50.0, 60.0, 40.0)]
    bare = [{"wall_s": w} for w in (45.0, 60.0, 20.0)]
    out = fb.paired_ratios(proj, bare)
    assert out["pairs"] == [0.9, 1.0, 0.5]
    assert out["median"] == 0.9  # the fastest runs alone would say 20 / 40 = 0.5


@pytest.mark.slow
def test_bench_pretrain_writes_a_publishable_folder(experiment, tmp_path):
    """bench_pretrain.py --out: the report as results.md under this call's provenance, published as a page."""
    bench, publish = experiment("bench_pretrain"), experiment("publish_results")
    out = tmp_path / "bench"
    argv = ["--profile", "tiny", "--rounds", "1", "--no-warmup", "--threads", "1", "--out", str(out)]
    assert bench.main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 0
    text = publish.page(out, tmp_path / "pretrain-throughput.md", "Pre-training throughput")
    assert "ratio project/bare slices/s" in text and "project overhead" in text
    assert "--profile tiny" in text and "data: the phantom at the tiny profile's scale" in text
