"""A run that survives its operator: SIGTERM / Ctrl-C stop cleanly and resume, one run per folder,
``--ckpt_path last`` always works, and the last bad inputs get one clear line."""

import csv
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from support import run_cli

from fcl_lightning.cli import console_main, main
from fcl_lightning.federation.checkpoint import load_checkpoint

WAIT_S = 240  # a bound on every wait for a file or an exit, never a sleep that must be long enough


def encoder_equal(a, b) -> bool:
    x = torch.load(a / "encoder.pt", weights_only=True)
    y = torch.load(b / "encoder.pt", weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def metric_rows(root):
    return [r for p in sorted((root / "logs").glob("version_*/metrics.csv")) for r in csv.DictReader(open(p))]


def rounds_logged(root):
    return [int(r["round"]) for r in metric_rows(root) if r.get("round") not in (None, "")]  # int(): no "1.0"


# ------------------------------------------------------------------ signals
def test_sigterm_in_process_stops_at_the_round_and_resumes_bitwise(tmp_path, tiny, capsys, monkeypatch):
    """SIGTERM during round 2 abandons that round: exit 143, the line says where it stopped, the
    folder is unlocked, and ``--ckpt_path last`` ends with the weights of an uninterrupted run and
    one integer-typed metrics row per round."""
    from fcl_lightning.federation import loop as loop_mod

    ref, run = tmp_path / "ref", tmp_path / "run"
    main(tiny(ref, rounds=2))
    capsys.readouterr()
    real = loop_mod.InProcessClients.train_round

    def train_round(self, round_idx, starts, inbox, progress):
        if round_idx == 1:  # round 2, after round 1's checkpoint was handed to the writer
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, round_idx, starts, inbox, progress)

    monkeypatch.setattr(loop_mod.InProcessClients, "train_round", train_round)
    code, out, err = run_cli(tiny(run, rounds=3), capsys)
    assert code == 143, err
    assert (
        "interrupted by SIGTERM at round 2 of 3: round 1's checkpoint is the last; resume with --ckpt_path last" in err
    )
    assert "Traceback" not in err and "outputs in" not in out and "error:" not in err
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["round"] == 1
    assert not (run / "run.lock").exists()
    monkeypatch.setattr(loop_mod.InProcessClients, "train_round", real)
    code, out, err = run_cli(tiny(run, rounds=2, extra=["--ckpt_path=last"]), capsys)
    assert code == 0, err
    assert encoder_equal(ref, run)
    assert rounds_logged(run) == [0, 1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handlers are gone again


def start(args, **kw):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fcl_lightning.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def wait_for(path, proc) -> None:
    """Until ``path`` exists (the process is then past its first round), bounded."""
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < WAIT_S, f"{path} did not appear"
        time.sleep(0.1)


@pytest.mark.slow  # real processes, like the SIGKILL tests (make test-slow)
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_real_process(tmp_path, tiny, sig, code):
    """What a scheduler (SIGTERM) or Ctrl-C (SIGINT) does to a real ``fcl-lightning fit``: a clean
    stop after the last whole checkpoint, the documented exit code, and a resume that finishes."""
    run = tmp_path / "run"
    p = start(tiny(run, rounds=50))
    wait_for(run / "checkpoints" / "last.ckpt", p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=WAIT_S)
    assert p.returncode == code, err
    name = signal.Signals(sig).name
    assert f"interrupted by {name} at round " in err and "resume with --ckpt_path last" in err, err
    assert "Traceback" not in err and "outputs in" not in out
    assert not (run / "run.lock").exists() and not list(run.rglob(".*.tmp"))
    done = load_checkpoint(run / "checkpoints" / "last.ckpt")["round"]
    assert f"round {done}'s checkpoint is the last" in err
    main(tiny(run, rounds=done + 1, extra=["--ckpt_path=last"]))
    assert rounds_logged(run) == list(range(done + 2))


@pytest.mark.slow  # a real process
def test_one_run_per_folder_and_a_killed_run_leaves_no_stuck_lock(tmp_path, tiny, capsys):
    """A second ``fit`` on a folder a live run uses stops at once, naming the folder and the
    running process, and writes nothing; once that run is SIGKILLed the folder is free again."""
    run = tmp_path / "run"
    p = start(tiny(run, rounds=50))
    try:
        wait_for(run / "checkpoints" / "last.ckpt", p)
        code, out, err = run_cli(tiny(run, rounds=50, extra=["--seed_everything=1"]), capsys)
        line = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(line) == 1, err
        assert str(run) in line[0] and f"pid {p.pid}" in line[0] and "in use by another run" in line[0]
        assert sorted(x.name for x in (run / "logs").iterdir()) == ["version_0"]  # nothing of the second run
    finally:
        p.kill()
        p.communicate(timeout=WAIT_S)
    assert (run / "run.lock").exists()  # what a SIGKILL leaves: the file, not the lock
    done = load_checkpoint(run / "checkpoints" / "last.ckpt")["round"]
    code, out, err = run_cli(tiny(run, rounds=done + 1, extra=["--ckpt_path=last"]), capsys)
    assert code == 0, err
    assert not (run / "run.lock").exists()


def test_the_lock_removes_every_folder_it_created_that_stayed_empty(tmp_path):
    """A run that fails its checks under ``runs/acdc/x`` leaves no empty ``runs/`` behind; one
    that wrote something keeps its folder and the parents above it."""
    from fcl_lightning.federation.lock import RunLock

    (tmp_path / "kept").mkdir()
    with RunLock(tmp_path / "kept" / "runs" / "acdc" / "x"):
        assert (tmp_path / "kept/runs/acdc/x/run.lock").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())
    with RunLock(tmp_path / "runs" / "acdc" / "y"):
        (tmp_path / "runs/acdc/y/config.yaml").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "runs/acdc/y").iterdir()) == ["config.yaml"]


def test_second_signal_while_stopping_exits_at_once():
    from fcl_lightning.interrupt import RunInterrupted, stop_on_signals

    code = (
        "import os, signal, time\n"
        "from fcl_lightning.interrupt import RunInterrupted, stop_on_signals\n"
        # a terminal's Ctrl-C, also when this test runs in the background (which ignores SIGINT)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "with stop_on_signals():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    except RunInterrupted:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"  # a second Ctrl-C during the clean stop
        "        time.sleep(30)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT_S)
    assert r.returncode == 130 and "SIGINT again: stopping now" in r.stderr
    # an ignored signal (nohup) stays ignored
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)
    assert RunInterrupted(signal.SIGTERM).exit_code == 143


# ------------------------------------------------------------ ckpt_path last
def test_ckpt_path_last_with_nothing_to_resume_starts_and_reuses_the_stale_logs(tmp_path, tiny, capsys):
    run = tmp_path / "run"
    (run / "logs" / "version_0").mkdir(parents=True)  # a run killed before its first checkpoint
    (run / "logs" / "version_0" / "metrics.csv").write_text("step,round\n0,0\n")
    # at 16 px the tiny encoder's bottleneck is 2 x 2, the smallest the size check lets through
    code, out, err = run_cli(tiny(run, rounds=1, extra=["--ckpt_path=last", "--data.img_size=16"]), capsys)
    assert code == 0, err
    assert f"nothing to resume in {run} (no checkpoints/last.ckpt): starting the run" in err
    assert sorted(x.name for x in (run / "logs").iterdir()) == ["version_0"]
    assert rounds_logged(run) == [0, 1]
    # test and validate have nothing to score without a checkpoint: for them it stays an error
    from fcl_lightning.federation.checkpoint import CheckpointError, resolve_ckpt_path

    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_ckpt_path("last", tmp_path / "empty")


# ------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--model.optimizer.init_args.lr=-0.1"], "model.optimizer: Invalid learning rate: -0.1"),
        # 4 levels halve 3 times: an 8 px image leaves a 1 x 1 bottleneck, which instance norm cannot normalise
        (["--data.img_size=8"], "the smallest size is 16"),
    ],
)
def test_bad_values_found_before_any_data(tmp_path, tiny, capsys, monkeypatch, extra, needle):
    from fcl_lightning.data.datamodule import FederatedDataModule

    monkeypatch.setattr(FederatedDataModule, "setup", lambda *a, **k: pytest.fail("data loaded before validation"))
    code, _, err = run_cli(tiny(tmp_path / "run", extra=extra), capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and needle in errors[0], err
    assert not (tmp_path / "run").exists()


def test_nan_inf_or_constant_images_are_named_before_training(tmp_path):
    from fcl_lightning.data.preprocess import checked_image
    from fcl_lightning.data.volume import DataError, RawVolume, VolumeRecord

    rec = VolumeRecord(key="p1_ED", patient="p1", image_path=tmp_path / "p1.nii.gz")
    good = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    assert checked_image(RawVolume(good, np.eye(4)), rec).image is good
    for bad, needle in (
        (np.full((8, 8, 3), np.nan, np.float32), "holds 192 NaN or infinite voxels of 192"),
        (np.where(good > 0.5, np.inf, good).astype(np.float32), "NaN or infinite voxels"),
        (np.zeros((8, 8, 3), np.float32), "is constant (every voxel 0)"),
    ):
        with pytest.raises(DataError, match=r"p1_ED: image .*p1\.nii\.gz") as ex:
            checked_image(RawVolume(bad, np.eye(4)), rec)
        assert needle in str(ex.value)


def test_fine_tuning_checkpoint_as_pretrained_is_named_in_one_short_line(tmp_path):
    from fcl_lightning.federation.checkpoint import FORMAT
    from fcl_lightning.lit.segment import PretrainedWeightsError, SegmentationModule

    seg = SegmentationModule(features=[8, 16, 16, 16])
    ckpt = {"format": FORMAT, "module": "SegmentationModule", "round": 4, "global": seg.global_state()}
    torch.save(ckpt, tmp_path / "last.ckpt")
    with pytest.raises(PretrainedWeightsError) as ex:
        SegmentationModule(features=[8, 16, 16, 16], pretrained=str(tmp_path / "last.ckpt"))
    msg = str(ex.value)
    assert "is a fine-tuning checkpoint (a segmentation model, round 4)" in msg and "encoder.pt" in msg
    assert len(msg) < 300


def test_yaml_syntax_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "mine.yaml"
    bad.write_text("model:\n  init_args:\n    features: [8, 16\n  x: 1\n")
    code, _, err = run_cli(["fit", "--config", str(bad)], capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert f"config file {bad} is not valid YAML at line 4" in errors[0]


def test_weights_only_is_documented_as_ignored(capsys):
    code, out, _ = run_cli(["fit", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0 and "--weights_only" in text
    assert "ignored: every checkpoint and weights file is loaded with weights_only=True" in text


def test_output_that_cannot_encode_unicode_falls_back_to_ascii(tmp_path, tiny, monkeypatch):
    """``PYTHONIOENCODING=ascii``: the run ends normally and its tables and lines are printed."""
    raw = io.BytesIO()
    ascii_out = io.TextIOWrapper(raw, encoding="ascii", write_through=True)
    monkeypatch.setattr(sys, "stdout", ascii_out)
    with pytest.raises(SystemExit) as ex:
        console_main(tiny(tmp_path, rounds=1))
        raise SystemExit(0)
    text = raw.getvalue().decode("ascii")
    assert ex.value.code == 0 and "outputs in" in text
    from rich.table import Table

    from fcl_lightning.console import output_console

    t = Table()
    t.add_column("Dice")
    t.add_row("0.50 ± 0.10 → ✓")
    output_console().print(t)
    text = raw.getvalue().decode("ascii")
    assert "0.50 +/- 0.10 -> ?" in text and "+--" in text  # ASCII stand-ins, an ASCII box


def test_round_line_parts_add_up_when_the_bank_starts_empty():
    import torch.nn.functional as F

    from fcl_lightning.fcl.memory_bank import BankEntries
    from fcl_lightning.fcl.objectives import ContrastiveInputs, FCLObjective
    from fcl_lightning.federation.hooks import round_line

    q = F.normalize(torch.randn(8, 4), dim=1)
    parts, vols = torch.arange(4).repeat(2), torch.arange(2).repeat_interleave(4)
    obj = FCLObjective()
    empty = obj(ContrastiveInputs(q, q, parts, vols, BankEntries.empty(4, q.device)))
    bank = BankEntries(F.normalize(torch.randn(16, 4), dim=1), torch.arange(4).repeat(4), torch.zeros(16).long())
    full = obj(ContrastiveInputs(q, q, parts, vols, bank))
    assert empty["remote_in_loss"].item() == 0.0
    assert torch.allclose(full["loss"], full["loss_local"] + full["remote_in_loss"])
    # a round of one empty-bank step and two full ones, as the epoch means come out
    steps = [empty, full, full]
    m = {f"round/train/{k}": float(np.mean([s[k].item() for s in steps if k in s])) for k in full}
    m.update({"round/time/total_s": 1.0})
    line = round_line(1, m)
    added = m["round/train/remote_in_loss"]
    assert abs(m["round/train/loss"] - (m["round/train/loss_local"] + added)) < 1e-5
    assert f"remote {added:.4f} ({m['round/train/loss_remote']:.4f} on the 67% of steps" in line
