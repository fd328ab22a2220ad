"""Bad input ends a command with one ``error:`` line and exit code 2, checked before any data is
loaded and leaving nothing behind; internal errors exit 1; ``--debug`` shows the traceback."""

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from support import one_error_line, run_cli

from fcl_lightning.cli import main
from fcl_lightning.federation.checkpoint import load_checkpoint


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--model.objective.temperature=-1"], "temperature must be > 0, got -1.0"),
        (["--data.img_size=7"], "data.img_size=7 must be a multiple of 8"),
        (["--federation.rounds=abc"], "federation.rounds"),
        (["--federation.roundz=3"], "unrecognized arguments: --federation.roundz"),
        (["--model.objective.num_negatives=9000"], "num_negatives=9000"),
        (["--federation.rounds=0"], "rounds and local_epochs must be >= 1"),
        (["--data.num_clients=0"], "num_clients must be >= 1"),
        (["--federation.local_steps=0"], "federation.local_steps must be >= 1 or null"),
        (["--federation.local_steps=-2"], "federation.local_steps must be >= 1 or null"),
        (["--federation.exchange_per_partition=0"], "federation.exchange_per_partition must be >= 1"),
        (["--federation.round_timeout=0"], "federation.round_timeout must be > 0 seconds"),
        (["--federation.min_clients=3"], "federation.min_clients=3 is above the run's 2 clients"),
        (["--federation.clients_per_round=1", "--federation.min_clients=2"], "is above federation.clients_per_round=1"),
        (["--federation.clients_per_round=0"], "clients_per_round must be >= 1"),
        (["--data.augment.prob=1.5"], "data.augment.prob must be in [0, 1]"),
        (["--data.augment.scale=-0.1"], "data.augment.scale must be in [0, 1)"),
        (["--data.num_workers=-1"], "data.num_workers must be >= 0"),
        (["--federation.downstream.steps=0"], "downstream: labelled_per_client and steps must be >= 1"),
        (["--model.proj_dim=0"], "proj_hidden and proj_dim must be >= 1"),
        (["--model.momentum_end=1.5"], "momentum_end must be in [0, 1]"),
        (["--model.features=[8,0,16,16]"], "features must be a non-empty list of channel counts >= 1"),
    ],
)
def test_bad_config_values_are_one_line_before_any_data(tmp_path, tiny, capsys, monkeypatch, extra, needle):
    from fcl_lightning.data.datamodule import FederatedDataModule

    monkeypatch.setattr(FederatedDataModule, "setup", lambda *a, **k: pytest.fail("data loaded before validation"))
    code, out, err = run_cli(tiny(tmp_path / "run", extra=extra), capsys)
    assert code == 2
    assert needle in one_error_line(err)
    assert len(one_error_line(err)) < 400
    assert not (tmp_path / "run").exists()  # no config.yaml, no logs for a run that never started


def test_data_error_is_one_line_and_writes_nothing(tmp_path, tiny, capsys):
    code, _, err = run_cli(tiny(tmp_path / "run", extra=["--data.num_partitions=40"]), capsys)
    assert code == 2
    assert "fewer than num_partitions=40" in one_error_line(err)
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert not list((tmp_path / "run").glob("logs/*/hparams.yaml"))


def test_pretrained_weights_missing_text_or_unsafe(tmp_path, capsys):
    base = ["fit", "--config", "configs/demo_finetune.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    (tmp_path / "notes.txt").write_text("not weights\n")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    torch.save({"w": Evil()}, tmp_path / "evil2.pt")
    for path, needle in (
        (tmp_path / "nope.pt", "does not exist"),
        (tmp_path / "notes.txt", "is not a file written by torch.save"),
        (tmp_path / "evil2.pt", "is not a plain weights file"),
    ):
        code, _, err = run_cli([*base, f"--model.pretrained={path}"], capsys)
        line = one_error_line(err)
        assert code == 2 and needle in line and str(path) in line, err
        assert "weights_only=False" not in err
    assert not (tmp_path / "PWNED").exists()


def test_resume_checks_rounds_and_shapes_naming_the_checkpoint(tmp_path, tiny, capsys):
    main(tiny(tmp_path, rounds=2))
    config = (tmp_path / "config.yaml").read_text()
    code, _, err = run_cli(tiny(tmp_path, rounds=1, extra=["--ckpt_path=last"]), capsys)
    line = one_error_line(err)
    assert code == 2 and "from round 2" in line and "federation.rounds=1" in line and "last.ckpt" in line
    code, _, err = run_cli(
        tiny(tmp_path, rounds=3, extra=["--ckpt_path=last", "--model.features=[8,16,16,32]"]), capsys
    )
    line = one_error_line(err)
    assert code == 2 and "does not fit the configured model" in line and "last.ckpt" in line
    assert "of another shape (first: encoder." in line and len(line) < 500
    assert (tmp_path / "config.yaml").read_text() == config  # a refused resume rewrites nothing


def test_unwritable_output_folder(tmp_path, tiny, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(tiny(tmp_path / "file" / "run"), capsys)
    assert code == 2 and "cannot write to the output folder" in one_error_line(err)
    import fcl_lightning.io as io_mod

    def readonly(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(io_mod, "open", readonly, raising=False)  # every file the run would create
    code, _, err = run_cli(tiny(tmp_path / "run"), capsys)
    line = one_error_line(err)
    assert code == 2 and "Read-only file system" in line and str(tmp_path / "run") in line


@pytest.mark.slow  # kept out of make test for its time (make test-slow)
def test_disk_full_during_a_checkpoint_stops_at_that_round(tmp_path, tiny, capsys, monkeypatch):
    import fcl_lightning.io as ck

    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("round") == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 566")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", save)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))  # a full disk
    for run, write_async in (("sync", "false"), ("async", "true")):
        code, out, err = run_cli(
            tiny(tmp_path / run, rounds=3, extra=[f"--federation.checkpoint_async={write_async}"]), capsys
        )
        line = one_error_line(err)
        assert code == 2
        # the first file of round 2 that fails: client 0's state (written before the server's file)
        assert "round 2's checkpoint: cannot write" in line and "state-002.pt: No space left on device" in line
        # a background write's error stops the run at the next round at the latest, never at its end
        assert "outputs in" not in out and not (tmp_path / run / "encoder.pt").exists()
        if write_async == "false":
            assert "round   3" not in out
        assert load_checkpoint(tmp_path / run / "checkpoints" / "last.ckpt")["round"] == 1  # round 1 still resumable
        assert not list((tmp_path / run / "checkpoints").glob(".*.tmp"))
        assert not list((tmp_path / run / "clients").glob("*/.*.tmp"))


def test_internal_error_exits_1_and_debug_shows_the_traceback(tmp_path, tiny, capsys, monkeypatch):
    from fcl_lightning.federation import loop

    monkeypatch.setattr(loop.FederatedLoop, "run", lambda *a, **k: 1 / 0)
    code, _, err = run_cli(tiny(tmp_path), capsys)
    assert code == 1 and "ZeroDivisionError" in one_error_line(err) and "--debug" in err
    code, _, err = run_cli([*tiny(tmp_path), "--debug"], capsys)
    assert code == 1 and "Traceback" in err
    monkeypatch.setenv("FCL_DEBUG", "1")
    code, _, err = run_cli(tiny(tmp_path / "x", extra=["--model.objective.temperature=-1"]), capsys)
    assert code == 2 and "Traceback" in err


def test_results_on_stdout_logs_on_stderr_and_one_file_mode(tmp_path, tiny, capsys):
    code, out, err = run_cli(tiny(tmp_path, rounds=1), capsys)
    assert code == 0
    assert "round   1 |" in out and f"outputs in {tmp_path}" in out
    assert "round   1 |" not in err
    for noise in ("GPU available", "TPU available", "litlogger", "💡"):
        assert noise not in err + out
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    assert len(set(modes.values())) == 1, modes  # summary.json and config.yaml like the rest


def metrics_rounds(root):
    import csv

    rows = [r for p in sorted((root / "logs").glob("version_*/metrics.csv")) for r in csv.DictReader(open(p))]
    return [int(float(r["round"])) for r in rows if r.get("round") not in (None, "")]


@pytest.mark.slow
def test_resume_continues_the_same_metrics_file_and_removes_interrupted_writes(tmp_path, tiny):
    main(tiny(tmp_path, rounds=2))
    junk = [tmp_path / "checkpoints" / ".round-003.ckpt.abc123.tmp", tmp_path / ".summary.json.x.tmp"]
    for j in junk:  # what a kill during a write leaves
        j.write_bytes(b"\0" * 10)
    # (keep round 2's file whole, with its clients' states: the newest 3 rounds)
    main(tiny(tmp_path, rounds=4, extra=["--ckpt_path=last", "--federation.checkpoint_keep.last=3"]))
    assert not any(j.exists() for j in junk)
    assert [p.parent.name for p in (tmp_path / "logs").glob("*/metrics.csv")] == ["version_0"]
    assert metrics_rounds(tmp_path) == [0, 1, 2, 3, 4]
    # resuming from an earlier round drops the rows after it, then logs them again
    main(tiny(tmp_path, rounds=4, extra=[f"--ckpt_path={tmp_path / 'checkpoints' / 'round-002.ckpt'}"]))
    assert metrics_rounds(tmp_path) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path, tiny):
    """A real process, killed with SIGKILL several times at random points: the resumed run ends
    with the weights of an uninterrupted one, one metrics row per round, no temp files, and a
    loadable last.ckpt."""
    rounds = 6
    ref = tmp_path / "ref"
    main(tiny(ref, rounds=rounds))
    run = tmp_path / "run"
    args = tiny(run, rounds=rounds)
    cmd = [sys.executable, "-m", "fcl_lightning.cli", *args]
    rng = torch.Generator().manual_seed(0)
    last = run / "checkpoints" / "last.ckpt"

    def done_rounds() -> int:
        return load_checkpoint(last)["round"] if last.exists() else 0

    resumed_from = []
    for _ in range(3):
        before = done_rounds()
        resume = ["--ckpt_path=last"] if before else []
        resumed_from.append(before)
        p = subprocess.Popen(cmd + resume, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()  # kill at a random point of the round after the next checkpoint
        while done_rounds() == before and p.poll() is None and time.monotonic() - t0 < 300:
            time.sleep(0.2)
        time.sleep(0.4 * float(torch.rand(1, generator=rng)))  # a tiny round takes ~0.5 s
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert resumed_from[1:] and all(0 < r < rounds for r in resumed_from[1:]), resumed_from  # real resumes happened
    subprocess.run(
        cmd + ["--ckpt_path=last"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600
    )
    a = torch.load(ref / "encoder.pt", weights_only=True)
    b = torch.load(run / "encoder.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_rounds(run) == list(range(rounds + 1))
    assert not list(run.rglob(".*.tmp"))
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["round"] == rounds


def test_piped_output_is_not_wrapped_at_80_columns(capsys):
    from fcl_lightning.console import PIPE_WIDTH, output_console

    console = output_console()  # pytest captures stdout: not a terminal
    assert console.width == PIPE_WIDTH
    console.print("x" * 150)
    assert "x" * 150 in capsys.readouterr().out


def test_remote_term_is_not_logged_while_the_banks_are_empty():
    import torch.nn.functional as F

    from fcl_lightning.fcl.memory_bank import BankEntries
    from fcl_lightning.fcl.objectives import ContrastiveInputs, FCLObjective

    q = F.normalize(torch.randn(8, 4), dim=1)
    parts, vols = torch.arange(4).repeat(2), torch.arange(2).repeat_interleave(4)
    out = FCLObjective()(ContrastiveInputs(q, q, parts, vols, BankEntries.empty(4, q.device)))
    assert "loss_remote" not in out and out["loss"].item() > 0  # no 0.0000 for a term that had nothing to match


def test_a_fresh_fit_into_a_folder_holding_a_run_is_refused(tmp_path, tiny, capsys):
    main(tiny(tmp_path, rounds=2))
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = run_cli(tiny(tmp_path, rounds=1), capsys)
    line = one_error_line(err)
    assert code == 2 and "already holds a run (checkpoints/" in line and "--ckpt_path last" in line
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == files  # nothing touched


def test_downstream_clients_outside_the_run_are_one_error_and_nothing_written(tmp_path, tiny, capsys):
    code, _, err = run_cli(
        tiny(tmp_path / "run", extra=["--federation.downstream.steps=1", "--federation.downstream.clients=[7]"]), capsys
    )
    assert code == 2 and "federation.downstream.clients [7] are outside the run's 2 clients" in one_error_line(err)
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()
