"""Round checkpoints written on a background thread: copies taken first, errors surfaced, and the
files equal to the ones written in the loop's own thread."""

import os
import threading

import pytest
import torch

from fcl_lightning.cli import main
from fcl_lightning.federation.checkpoint import (
    BackgroundWriter,
    CheckpointError,
    client_files,
    load_checkpoint,
    snapshot,
)


def test_snapshot_does_not_share_storage():
    src = {"a": torch.zeros(3), "b": [torch.ones(2), ("x", torch.arange(2))], "n": 1}
    snap = snapshot(src)
    src["a"].add_(5)
    src["b"][0].mul_(3)
    src["b"][1][1].add_(7)
    assert torch.equal(snap["a"], torch.zeros(3))
    assert torch.equal(snap["b"][0], torch.ones(2))
    assert torch.equal(snap["b"][1][1], torch.arange(2))
    assert snap["n"] == 1 and snap["b"][1][0] == "x" and isinstance(snap["b"][1], tuple)


def test_snapshot_reuses_an_earlier_snapshots_tensors():
    src = {"w": torch.randn(4, 3), "opt": [torch.randn(5)], "bank": torch.randn(2, 3)}
    old = snapshot(src)
    ptrs = (old["w"].data_ptr(), old["opt"][0].data_ptr())
    src["w"].add_(1)
    src["bank"] = torch.randn(6, 3)  # a bank that grew: new shape, new tensor
    new = snapshot(src, into=old)
    assert (new["w"].data_ptr(), new["opt"][0].data_ptr()) == ptrs
    assert torch.equal(new["w"], src["w"]) and torch.equal(new["bank"], src["bank"])
    src["w"].add_(1)
    assert not torch.equal(new["w"], src["w"])  # still a copy


def test_writer_runs_one_write_at_a_time_in_order():
    order, inflight, peak = [], [0], [0]
    lock = threading.Lock()

    def job(i):
        def run():
            with lock:
                inflight[0] += 1
                peak[0] = max(peak[0], inflight[0])
            threading.Event().wait(0.02)
            order.append(i)
            with lock:
                inflight[0] -= 1

        return run

    w = BackgroundWriter()
    for i in range(4):
        w.submit(job(i))
    w.wait()
    assert order == [0, 1, 2, 3] and peak[0] == 1


def test_writer_error_surfaces_on_wait_and_next_submit():
    def boom():
        raise OSError("No space left on device")

    w = BackgroundWriter()
    w.submit(boom)
    with pytest.raises(CheckpointError, match="No space left on device"):
        w.wait()
    w.wait()  # reported once
    w.submit(boom)
    with pytest.raises(CheckpointError):
        w.submit(lambda: None)


def test_writer_disabled_writes_inline():
    seen = []
    w = BackgroundWriter(enabled=False)
    w.submit(lambda: seen.append(threading.current_thread() is threading.main_thread()))
    assert seen == [True]


@pytest.mark.parametrize("enabled", [True, False])
def test_a_writes_result_is_handed_over_on_the_waiting_thread(enabled):
    """The writer thread returns what it did; the caller's state changes only on the caller's thread."""
    got = []
    w = BackgroundWriter(
        enabled, on_done=lambda r: got.append((r, threading.current_thread() is threading.main_thread()))
    )
    done = threading.Event()

    def write(i):
        def run():
            done.wait(5)
            return i

        return run

    if not enabled:
        done.set()  # written inline, handed over at once
    w.submit(write(1))
    assert got == ([] if enabled else [(1, True)])  # in flight: nothing handed over yet
    done.set()
    w.submit(write(2))  # waits for write 1: its result is handed over first
    w.wait()
    assert got == [(1, True), (2, True)]


@pytest.mark.slow
def test_async_checkpoints_equal_sync_ones(tmp_path, tiny, monkeypatch):
    """Round 1's file, held back until round 2 has trained (and mutated Adam's moments in place),
    holds exactly what the synchronous writer stores."""
    import fcl_lightning.federation.hooks as hooks_mod
    import fcl_lightning.federation.loop as loop_mod

    round2_done = threading.Event()
    save, train_round = hooks_mod.save_checkpoint_file, loop_mod.InProcessClients.train_round

    def slow_save(obj, path):
        if obj.get("round") == 1:
            assert round2_done.wait(60)
        return save(obj, path)

    def tracked_train_round(self, round_idx, *args, **kwargs):
        out = train_round(self, round_idx, *args, **kwargs)
        if round_idx == 1:
            round2_done.set()
        return out

    monkeypatch.setattr(hooks_mod, "save_checkpoint_file", slow_save)
    monkeypatch.setattr(loop_mod.InProcessClients, "train_round", tracked_train_round)
    main(tiny(tmp_path / "async", rounds=2, extra=["--federation.checkpoint_async=true"]))
    assert round2_done.is_set()
    monkeypatch.undo()
    main(tiny(tmp_path / "sync", rounds=2, extra=["--federation.checkpoint_async=false"]))
    for name in ("round-001.ckpt", "last.ckpt"):
        a = load_checkpoint(tmp_path / "async" / "checkpoints" / name)
        b = load_checkpoint(tmp_path / "sync" / "checkpoints" / name)
        assert a["round"] == b["round"]
        for part in ("global", "inbox"):
            fa, fb = _flat(a[part]), _flat(b[part])
            assert fa.keys() == fb.keys() and fa
            for k in fa:
                assert torch.equal(fa[k], fb[k]), (name, part, k)
    # the clients' states of round 1, saved beside the server's file (and held back as it was)
    for c in (0, 1):
        fa = _flat(client_files(tmp_path / "async", c).load(1))
        fb = _flat(client_files(tmp_path / "sync", c).load(1))
        assert fa.keys() == fb.keys() and fa
        for k in fa:
            assert torch.equal(fa[k], fb[k]), (c, k)
    opt = _flat(client_files(tmp_path / "async", 0).load(1)["optimizer"])
    assert any("exp_avg" in k for k in opt)


def _flat(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}/{i}"))
    return out


def test_last_ckpt_links_the_newest_round_file(tmp_path, tiny):
    main(tiny(tmp_path, rounds=2))
    ck = tmp_path / "checkpoints"
    last = ck / "last.ckpt"
    assert last.is_symlink() and last.resolve() == (ck / "round-002.ckpt").resolve()
    assert load_checkpoint(last)["round"] == 2
    assert not list(ck.glob(".*tmp"))  # no temp files left behind
    umask = os.umask(0)
    os.umask(umask)
    # a plain file's mode under the umask, not mkstemp's private 0600
    assert (ck / "round-001.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_link_replaces_a_file_and_falls_back_to_a_copy(tmp_path, monkeypatch):
    from fcl_lightning import io as checkpoint

    (tmp_path / "a").write_text("A")
    (tmp_path / "last").write_text("old")
    checkpoint.atomic_link(tmp_path / "a", tmp_path / "last")
    assert (tmp_path / "last").is_symlink() and (tmp_path / "last").read_text() == "A"

    def no_symlinks(*args, **kwargs):
        raise OSError("symbolic links are not supported here")

    monkeypatch.setattr(checkpoint.os, "symlink", no_symlinks)
    (tmp_path / "b").write_text("B")
    checkpoint.atomic_link(tmp_path / "b", tmp_path / "last")
    assert not (tmp_path / "last").is_symlink() and (tmp_path / "last").read_text() == "B"
    assert (tmp_path / "a").read_text() == "A"


def test_writer_block_waits_and_keeps_the_blocks_own_error(caplog):
    def boom():
        raise OSError("disk gone")

    with pytest.raises(CheckpointError, match="disk gone"):
        with BackgroundWriter() as w:
            w.submit(boom)
    with pytest.raises(KeyError, match="round failed"):
        with BackgroundWriter() as w:
            w.submit(boom)
            raise KeyError("round failed")
    assert "disk gone" in caplog.text
