"""wandb tracking, offline: one run per fit, per-round and per-client keys, config and summary,
and a resumed fit that continues the same run id."""

import json
import shutil

import pytest
import yaml
from wandb_records import run_info

from fcl_lightning.cli import main
from fcl_lightning.federation.checkpoint import load_checkpoint
from fcl_lightning.tracking import flatten, per_client_dice_rows

WANDB = ["--trainer.logger=WandbLogger", "--trainer.logger.project=fcl-test"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory


def run_files(root):
    return sorted((root / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.slow  # the suite's 3-minute budget (make test-slow)
def test_one_run_per_fit_with_round_and_client_keys(offline, tmp_path, tiny):
    root = tmp_path / "run"
    main(tiny(root, rounds=2, extra=WANDB))
    files = run_files(root)
    assert len(files) == 1, files  # one run for 2 rounds x 2 clients, not one per client or round
    info = run_info(files[0])
    rows = [h for h in info["history"] if "round/train/loss" in h]
    assert [json.loads(h["trainer/global_step"]) for h in rows] == [1, 2]
    for key in (
        "client0/train/loss_local",
        "client1/train/loss_remote",
        "round/comm/features_up_bytes",
        "round/time/total_s",
    ):
        assert all(key in h for h in rows), key
    assert {"model", "data", "federation", "trainer"} <= info["config"]
    assert "pretrain/rounds_completed" in info["summary"]
    assert load_checkpoint(root / "checkpoints/last.ckpt")["wandb_run_id"] == info["id"]
    assert not (tmp_path / "wandb").exists()
    logger = yaml.safe_load((root / "config.yaml").read_text())["trainer"]["logger"]
    assert logger["init_args"]["save_dir"] is None  # filled in from the run folder, not pinned to it


@pytest.mark.slow
def test_resume_continues_the_same_run(offline, tmp_path, tiny):
    root = tmp_path / "run"
    main(tiny(root, rounds=2, extra=WANDB))
    first = run_info(run_files(root)[0])
    (root / "checkpoints/last.ckpt").unlink()  # a link to the newest round file
    shutil.copy(root / "checkpoints/round-001.ckpt", root / "checkpoints/last.ckpt")  # "crash" after round 1
    main(tiny(root, rounds=2, extra=[*WANDB, "--ckpt_path=last"]))
    files = run_files(root)
    assert len(files) == 2  # offline: a second segment of the same run, to `wandb sync` after the first
    second = run_info(files[1])
    assert second["id"] == first["id"]
    steps = [json.loads(h["trainer/global_step"]) for h in second["history"] if "round/train/loss" in h]
    assert steps == [2]  # only the round that was left, at its own round index


def test_csv_is_the_default_and_no_wandb_files(tmp_path, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(tiny(tmp_path / "run", rounds=1))
    assert (tmp_path / "run/logs").is_dir() and not list(tmp_path.rglob("wandb"))
    assert load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")["wandb_run_id"] is None
    # the saved config does not pin the default logger to this run's folder: a run started from it
    # elsewhere logs there, and the first run's logs stay as they were
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["trainer"]["logger"] is None
    main(["fit", f"--config={tmp_path}/run/config.yaml", f"--trainer.default_root_dir={tmp_path}/again"])
    assert (tmp_path / "again/logs/version_0/metrics.csv").is_file()
    assert [p.name for p in (tmp_path / "run/logs").iterdir()] == ["version_0"]


def test_per_client_dice_rows_and_flatten():
    m = {
        "client0/val/dice_mean": 0.5,
        "client1/val/dice_mean": 0.75,
        "client1/val/dice_lv": 0.9,
        "downstream/fcl/client2/dice_mean": 0.25,
        "downstream/fcl/dice_mean": 0.1,
        "round/val/dice_mean": 0.6,
    }
    assert per_client_dice_rows(m, 3) == [[3, 0, "val", 0.5], [3, 1, "val", 0.75], [3, 2, "downstream/fcl", 0.25]]
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}
