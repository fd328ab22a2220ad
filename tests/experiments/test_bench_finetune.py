"""experiments/bench_finetune.py's whole-cell mode: the cell it times is run_tables' cell for one
client, and its report adds up."""

import json

import pytest


@pytest.fixture
def bench(experiment):
    return experiment("bench_finetune")


def test_the_cell_is_run_tables_fine_tuning_for_one_client(bench, experiment, tmp_path):
    tables = experiment("run_tables")
    fit, test = bench.cell_commands("/acdc", 64, 3000, tmp_path / "cell", "/cache")
    assert fit[0] == "fit" and test[0] == "test"
    assert fit[1 : 1 + len(tables.ACDC_CPU_FINETUNE)] == tables.ACDC_CPU_FINETUNE  # the table's settings
    # later arguments win: one client, 12 rounds of 250 steps with the poly rate, the warm cache
    for arg in ("--data.num_clients=1", "--federation.rounds=12", "--federation.local_steps=250",
                "--model.lr_schedule=poly", "--data.cache_dir=/cache", "--data.root=/acdc"):  # fmt: skip
        assert arg in fit
    assert "--ckpt_path=last" in test and not any(a.startswith("--federation.rounds") for a in test)
    assert [a for a in test if a.startswith("--trainer")] == [a for a in fit if a.startswith("--trainer")]
    short = bench.cell_commands(None, 64, 40, tmp_path / "cell", "/cache")[0]
    assert "--federation.rounds=1" in short and "--federation.local_steps=40" in short
    with pytest.raises(SystemExit, match="not a multiple of 250"):
        bench.cell_commands(None, 64, 600, tmp_path / "cell", "/cache")


@pytest.mark.slow  # two fresh CLI processes and the phantom's preprocessing (about a minute)
def test_a_tiny_cell_is_timed_against_its_bare_steps(bench, tmp_path):
    out = tmp_path / "report.json"
    bench.main(["--arms", "supervised", "--steps", "4", "--warmup", "1", "--cell-steps", "4", "--json", str(out)])
    report = json.loads(out.read_text())
    cell = report["cell"]
    assert cell["fit_s"] > 0 and cell["test_s"] > 0
    bare = report["arms"]["supervised"]["bare_steps_s"]
    assert cell["bare_steps_total_s"] == pytest.approx(4 / bare)
    assert cell["ratio"] == pytest.approx((cell["fit_s"] + cell["test_s"]) / cell["bare_steps_total_s"])
