"""The round checkpoint's home (``federation/checkpoint.py``): which round files stay, each client's state in
its own versioned file, and a resume that finds (or clearly misses) the states a checkpoint names."""

import shutil

import pytest
import torch
from support import REPO

from fcl_lightning.cli import main
from fcl_lightning.federation.checkpoint import (
    CheckpointError,
    CheckpointKeep,
    ClientStateFiles,
    client_files,
    load_checkpoint,
    retention,
)


def slow_retention(rounds, last, every, final):
    """Round by round: kept whole if among the newest ``last`` (or the final round), else kept as
    weights if a multiple of ``every``, else deleted."""
    whole, weights = set(), set()
    for r in rounds:
        newer = sum(1 for o in rounds if o > r)
        if last is None or newer < last or r == final:
            whole.add(r)
        elif every is not None and r % every == 0:
            weights.add(r)
    return whole, weights


@pytest.mark.parametrize("last", [None, 1, 2, 5])
@pytest.mark.parametrize("every", [None, 1, 3, 10])
def test_retention_matches_its_slow_reference(last, every):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rounds = sorted(
            set((torch.randperm(30, generator=g)[: int(torch.randint(1, 12, (1,), generator=g))] + 1).tolist())
        )
        final = max(rounds) + int(torch.randint(0, 2, (1,), generator=g))  # the run's end, or not yet
        got = retention(rounds, CheckpointKeep(last=last, every=every), final)
        assert got == slow_retention(rounds, last, every, final), (rounds, final)


def test_checkpoint_keep_refuses_zero():
    with pytest.raises(ValueError, match="checkpoint_keep.last must be >= 1"):
        CheckpointKeep(last=0)


def test_client_state_files_round_trip_name_their_client_and_prune(tmp_path):
    files = ClientStateFiles(tmp_path / "c3", client=3)
    state = {"modules": {"bank": torch.arange(4.0)}, "optimizer": {"state": {}, "param_groups": []}}
    for v in (1, 2, 5):
        files.save(v, state)
    assert files.versions() == [1, 2, 5]
    assert torch.equal(files.load(2)["modules"]["bank"], torch.arange(4.0))
    (tmp_path / "c3" / "state-002.pt").rename(tmp_path / "c3" / "state-004.pt")  # a file under another name
    with pytest.raises(CheckpointError, match="holds client 3's state after round 2, not client 3's after round 4"):
        files.load(4)
    with pytest.raises(CheckpointError, match="client 3's state .*state-003.pt does not exist"):
        files.load(3)
    assert files.prune(5) == [1, 4] and files.versions() == [5]


def test_checkpoint_files_leave_out_the_crc_that_torch_load_does_not_check(tmp_path):
    """A checkpoint file carries no CRC-32 (a third of its write time), loads back bitwise, and a
    damaged byte loads unnoticed with the CRC too: leaving it out loses no check. Torch's
    process-wide setting is back as it was, also after a failed write."""
    import zipfile

    from torch.utils.serialization import config

    from fcl_lightning.federation.checkpoint import save_checkpoint_file
    from fcl_lightning.io import WriteError, atomic_save

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    save_checkpoint_file({"x": x}, tmp_path / "a.ckpt")
    assert {i.CRC for i in zipfile.ZipFile(tmp_path / "a.ckpt").infolist()} == {0}
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["x"], x)
    assert config.save.compute_crc32 is True
    atomic_save({"x": x}, tmp_path / "b.pt")  # with its CRC
    assert 0 not in {i.CRC for i in zipfile.ZipFile(tmp_path / "b.pt").infolist()}
    raw = bytearray((tmp_path / "b.pt").read_bytes())
    at = raw.find(x.numpy().tobytes()[:64]) + 100
    raw[at] ^= 0xFF
    (tmp_path / "b.pt").write_bytes(bytes(raw))
    assert not torch.equal(torch.load(tmp_path / "b.pt", weights_only=True)["x"], x)  # no error: unchecked
    with pytest.raises(WriteError):
        save_checkpoint_file({"x": x}, tmp_path / "a.ckpt" / "below-a-file.ckpt")
    assert config.save.compute_crc32 is True


@pytest.mark.slow  # the suite's 3-minute budget: retention's rule is test_retention_matches_its_slow_reference
def test_retention_keeps_the_newest_whole_and_every_nth_as_weights(tmp_path, tiny, capsys):
    """5 rounds, newest 2 whole, every 2nd as weights: round files 2, 4, 5 stay, 1 and 3 go; each
    client keeps the states rounds 4 and 5 name; round 2 gives its weights but does not resume."""
    keep = ["--federation.checkpoint_keep.last=2", "--federation.checkpoint_keep.every=2"]
    main(tiny(tmp_path, rounds=5, extra=keep))
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "round-002.ckpt", "round-004.ckpt", "round-005.ckpt"]
    for c in (0, 1):
        assert client_files(tmp_path, c).versions() == [4, 5]
    server = load_checkpoint(ck / "round-002.ckpt")
    assert server["client_versions"] == {"0": 2, "1": 2} and "clients" not in server
    assert not any("momentum" in k or "bank" in k for k in server["global"])  # no client state in it
    with pytest.raises(CheckpointError, match=r"names client 0's state after round 2 .*global weights only"):
        main(tiny(tmp_path, rounds=5, extra=[*keep, f"--ckpt_path={ck / 'round-002.ckpt'}"]))
    # a whole one resumes, and the resumed round writes the same state as before
    before = client_files(tmp_path, 1).load(5)
    main(tiny(tmp_path, rounds=5, extra=[*keep, f"--ckpt_path={ck / 'round-004.ckpt'}"]))
    after = client_files(tmp_path, 1).load(5)
    assert all(torch.equal(v, after["modules"][k]) for k, v in before["modules"].items())


@pytest.mark.slow  # an old format kept readable (make test-slow; the suite's time)
def test_a_checkpoint_from_before_client_files_still_resumes(tmp_path, tiny):
    """The earlier format (client states inside the server's file) resumes to the same bits."""
    ref, old = tmp_path / "ref", tmp_path / "old"
    main(tiny(ref, rounds=2))
    main(tiny(old, rounds=1))
    ckpt = load_checkpoint(old / "checkpoints" / "last.ckpt")
    versions = ckpt.pop("client_versions")
    ckpt["clients"] = {c: client_files(old, int(c)).load(v) for c, v in versions.items()}
    ckpt["format"] = "fcl-lightning/federated-v1"
    (old / "checkpoints" / "last.ckpt").unlink()
    torch.save(ckpt, old / "checkpoints" / "last.ckpt")
    shutil.rmtree(old / "clients")
    main(tiny(old, rounds=2, extra=["--ckpt_path=last"]))
    a, b = (torch.load(r / "encoder.pt", weights_only=True) for r in (ref, old))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mode_is_a_plug_in_and_nothing_else_compares_its_name():
    """``federation.mode`` by name or by class_path; the engine and hooks ask the plug-in."""
    import re

    from fcl_lightning.federation.config import Federation
    from fcl_lightning.federation.mode import Federated, Local, mode_of

    assert isinstance(Federation(mode="local").mode, Local) and isinstance(Federation().mode, Federated)
    own = Local()
    assert mode_of(own) is own
    with pytest.raises(ValueError, match="federation.mode must be one of"):
        mode_of("centralised")
    src = REPO / "src" / "fcl_lightning"
    pattern = re.compile(r"mode\s*[!=]=\s*\"(federated|local)\"")
    offenders = [p.name for p in src.rglob("*.py") if p.name != "mode.py" and pattern.search(p.read_text())]
    assert offenders == []


def test_checkpoint_every_n_rounds_saves_waiting_states_and_resumes_bitwise(tmp_path, tiny):
    """3 clients, 2 sampled a round, a checkpoint every 2 rounds: round files 2 and 4 only; a client
    that last trained in an odd round is saved then, under that round; a run stopped after round 3
    resumes from round 2 and ends on the same bits as the run that went through."""
    every = [
        "--federation.checkpoint_every=2",
        "--federation.clients_per_round=2",
        "--federation.checkpoint_keep.last=null",
        "--seed_everything=0",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    main(tiny(full, rounds=4, clients=3, extra=every))
    ck = full / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "round-002.ckpt", "round-004.ckpt"]
    named = [load_checkpoint(ck / f"round-00{r}.ckpt")["client_versions"] for r in (2, 4)]
    for c in range(3):  # the states on disk are the ones the round files name
        assert client_files(full, c).versions() == sorted({v[str(c)] for v in named if str(c) in v})
    assert any(v % 2 for n in named for v in n.values()), named  # a state that waited for the write

    main(tiny(cut, rounds=4, clients=3, extra=every))
    (cut / "checkpoints" / "round-004.ckpt").unlink()  # stopped after round 3: round 2 is the last
    (cut / "checkpoints" / "last.ckpt").unlink()
    (cut / "checkpoints" / "last.ckpt").symlink_to("round-002.ckpt")
    for c in range(3):
        files = client_files(cut, c)
        for v in files.versions():
            if v > 2:
                files.path(v).unlink()
    (cut / "encoder.pt").unlink()
    main(tiny(cut, rounds=4, clients=3, extra=[*every, "--ckpt_path=last"]))
    a = torch.load(full / "encoder.pt", weights_only=True)
    b = torch.load(cut / "encoder.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = load_checkpoint(full / "checkpoints" / "round-004.ckpt")["client_versions"]
    for c, v in last.items():
        sa, sb = client_files(full, int(c)).load(v)["modules"], client_files(cut, int(c)).load(v)["modules"]
        assert all(torch.equal(t, sb[k]) for k, t in sa.items()), c
