"""Sweeps: the shipped wandb sweep files validate and parse, the agent's argument style parses,
a broken sweep fails before any trial, and a 2-trial local sweep writes its table and best config."""

import csv
import json
import sys

import pytest
import yaml
from support import REPO

from fcl_lightning.cli import main as cli_main
from fcl_lightning.sweep import SweepError, check_parameters, command_for, load_sweep, main, metric_from_summary

SWEEPS = sorted((REPO / "configs/sweeps").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_files_validate_and_parse(path):
    cfg = load_sweep(path)
    assert cfg["metric"]["goal"] == "maximize"
    check_parameters(cfg, REPO)  # every parameter path is accepted by the CLI (subprocess --print_config)


def test_agent_argument_style_parses(capsys):
    # what `wandb agent` runs: the sweep's command with ${args} as --key=value after --config
    cfg = load_sweep(REPO / "configs/sweeps/fcl_pretrain.yaml")
    cmd = command_for(cfg, {"model.init_args.objective.init_args.temperature": 0.2, "data.num_partitions": 3})
    assert cmd[:3] == [sys.executable, "-m", "fcl_lightning.cli"]
    assert cmd[-2:] == ["--model.init_args.objective.init_args.temperature=0.2", "--data.num_partitions=3"]
    args = [a.replace("configs/", str(REPO / "configs") + "/") for a in cmd[3:]]
    with pytest.raises(SystemExit):
        cli_main([*args, "--print_config"])
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["init_args"]["objective"]["init_args"]["temperature"] == 0.2
    assert out["data"]["num_partitions"] == 3
    assert out["trainer"]["logger"]["class_path"].endswith("WandbLogger")


def write(path, obj):
    path.write_text(yaml.safe_dump(obj))
    return path


BASE = {
    "method": "grid",
    "metric": {"name": "downstream/fcl/dice_mean", "goal": "maximize"},
    "parameters": {"model.init_args.objective.init_args.temperature": {"values": [0.1, 0.5]}},
    "command": ["fcl-lightning", "fit", "--config", "base.yaml", "${args}"],
}


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(  # checks the parameters with the CLI in a subprocess (~15 s): make test-slow
            {"parameters": {"model.init_args.no_such_thing": {"values": [1]}}},
            "does not accept its parameters",
            marks=pytest.mark.slow,
        ),
        (
            {"parameters": {"data.num_partitions": {"distribution": "bogus", "min": 1, "max": 2}}},
            "not a valid wandb sweep",
        ),
        ({"method": "evolution"}, "not a valid wandb sweep|method must be"),
        ({"metric": {"goal": "maximize"}}, "not a valid wandb sweep|metric.name"),
    ],
)
def test_broken_sweep_fails_before_any_trial(tmp_path, monkeypatch, change, message, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "base.yaml", {"trainer": {"default_root_dir": "x"}})
    f = write(tmp_path / "bad.yaml", {**BASE, **change})
    with pytest.raises(SystemExit) as exc:
        main([str(f), "--count", "2", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out" / "trial-000").exists()


def test_metric_lookup():
    s = {"downstream/fcl/dice_mean": 0.5, "finetune": {"final": {"val/dice_mean": 0.7}}}
    assert metric_from_summary(s, "downstream/fcl/dice_mean") == 0.5
    assert metric_from_summary(s, "round/val/dice_mean") == 0.7
    assert metric_from_summary(s, "nope") is None
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep("/no/such/sweep.yaml")


@pytest.mark.slow  # about 35 s of real trial runs: make test-slow
def test_two_trial_local_sweep_writes_table_and_best_config(tmp_path, monkeypatch, tiny):
    """A grid of 2 temperatures, each trial a real tiny pre-training run with downstream scoring."""
    monkeypatch.chdir(tmp_path)
    base = {
        "trainer": {"accelerator": "cpu"},
        "data": {
            "num_clients": 2,
            "source": {
                "class_path": "fcl_lightning.data.phantom.PhantomSource",
                "init_args": {"num_subjects": 8, "size": 64},
            },
            "test_source": {
                "class_path": "fcl_lightning.data.phantom.PhantomSource",
                "init_args": {"num_subjects": 2, "size": 64, "seed": 7},
            },
            "img_size": 32,
            "volumes_per_batch": 2,
            "val_fraction": 0.0,
        },
        "model": {
            "class_path": "fcl_lightning.lit.ContrastivePretrainModule",
            "init_args": {
                "features": [8, 16, 16, 16],
                "proj_hidden": 32,
                "proj_dim": 16,
                "objective": {
                    "class_path": "fcl_lightning.fcl.objectives.FCLObjective",
                    "init_args": {"num_negatives": 32},
                },
            },
        },
        "federation": {
            "rounds": 1,
            "downstream": {"steps": 3, "figure": False, "compare_random": False, "accelerator": "cpu"},
        },
    }
    write(tmp_path / "base.yaml", base)
    f = write(tmp_path / "sweep.yaml", BASE)
    out = tmp_path / "out"
    main([str(f), "--out", str(out), "--wandb-mode", "disabled"])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["trial"] for r in rows] == ["trial-000", "trial-001"]
    assert sorted(float(r["model.init_args.objective.init_args.temperature"]) for r in rows) == [0.1, 0.5]
    assert all(r["status"] == "finished" and 0.0 <= float(r["downstream/fcl/dice_mean"]) <= 1.0 for r in rows)
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == max(float(r["downstream/fcl/dice_mean"]) for r in rows)
    best_cfg = yaml.safe_load((out / "best_config.yaml").read_text())
    assert (
        best_cfg["model"]["init_args"]["objective"]["init_args"]["temperature"]
        == best["params"]["model.init_args.objective.init_args.temperature"]
    )
    assert "trial-000" in (out / "results.md").read_text()
    # a second call continues: the grid is exhausted, nothing re-runs
    before = (out / "trials.jsonl").read_text()
    main([str(f), "--out", str(out), "--wandb-mode", "disabled"])
    assert (out / "trials.jsonl").read_text() == before


def test_a_shipped_sweep_file_is_found_from_any_folder(tmp_path, monkeypatch):
    """As ``--config configs/...``: a wheel install or another working folder finds the shipped file."""
    monkeypatch.chdir(tmp_path)
    assert load_sweep("configs/sweeps/fcl_pretrain.yaml") == load_sweep(REPO / "configs/sweeps/fcl_pretrain.yaml")
    with pytest.raises(SweepError, match="configs/sweeps/nope.yaml does not exist"):
        load_sweep("configs/sweeps/nope.yaml")
