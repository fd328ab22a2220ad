"""The pre-training CLI end to end on the phantom: outputs, checkpoints, resume equivalence."""

import json
import shutil

import pytest
import torch

from fcl_lightning.cli import main
from fcl_lightning.federation.checkpoint import CheckpointError, client_files, client_states_of, load_checkpoint


def test_help_lists_sections(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for section in ("--model", "--data", "--trainer", "--federation", "--ckpt_path", "--seed_everything"):
        assert section in out


def test_only_the_named_subcommand_gets_a_parser_and_the_top_level_help_lists_all(capsys, monkeypatch):
    """A run builds the parser of its own subcommand only; --help and a misspelt name see all four."""
    from fcl_lightning import cli

    built = []
    prepare = cli.FCLCLI._prepare_subcommand_parser
    monkeypatch.setattr(
        cli.FCLCLI,
        "_prepare_subcommand_parser",
        lambda self, k, sub, **kw: built.append(sub) or prepare(self, k, sub, **kw),
    )
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    assert built == ["test"] and "--space" in capsys.readouterr().out  # test's own option
    built.clear()
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert built == ["fit", "validate", "test", "predict"] and all(s in out for s in built)
    with pytest.raises(SystemExit):
        main(["fitt", "--help"])  # a misspelt name: argparse's error names the choices
    assert "'fit', 'validate', 'test', 'predict'" in capsys.readouterr().err


def test_print_config_is_complete(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    out = capsys.readouterr().out
    for key in ("federation:", "aggregator:", "FCLObjective", "PhantomSource", "trainer:", "seed_everything: 0"):
        assert key in out


@pytest.mark.slow  # the suite's 3-minute budget; every tiny run covers it too
def test_two_clients_two_rounds(tmp_path, tiny):
    main(tiny(tmp_path, extra=["--data.augment_on=loader"]))  # the library default (other tiny runs: device)
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "round-001.ckpt", "round-002.ckpt"]
    ckpt = load_checkpoint(ck / "last.ckpt")
    assert ckpt["round"] == 2 and ckpt["client_versions"] == {"0": 2, "1": 2}
    assert set(ckpt["inbox"]) == {"0", "1"}
    # each client's remote bank holds only the other client's vectors
    for c, inbox in ckpt["inbox"].items():
        assert set(inbox["clients"].tolist()) == {1 - int(c)}
        assert inbox["vectors"].shape[1] == 16
    # each client's own state beside it, in the version the server's checkpoint names
    own = client_files(tmp_path, 0).load(2)
    assert "momentum_encoder.conv_0.conv_0.conv.weight" in own["modules"] and "optimizer" in own
    assert not any("momentum" in k for k in ckpt["global"])
    enc = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert torch.equal(enc["conv_0.conv_0.conv.weight"], ckpt["global"]["encoder.conv_0.conv_0.conv.weight"])
    summary = json.loads((tmp_path / "summary.json").read_text())["pretrain"]
    assert summary["rounds_completed"] == 2
    assert summary["bytes"]["features_up"] > 0 and summary["bytes"]["weights_up"] > 0
    assert summary["final"]["train/loss"] > 0
    metrics = (next((tmp_path / "logs").glob("version_*")) / "metrics.csv").read_text().splitlines()[0]
    for key in (
        "round/train/loss",
        "client0/train/loss_local",
        "client1/train/loss_remote",
        "round/comm/features_up_bytes",
        "round/train/pos_sim",
        "round/train/neg_sim",
        "round/monitor/spread",
        "round/monitor/probe_acc",
        "round/monitor/probe_acc_encoder",
        "round/monitor/collapsed",
    ):
        assert key in metrics
    assert 0.0 <= summary["final"]["monitor/probe_acc"] <= 1.0 and summary["final"]["monitor/spread"] >= 0.0


@pytest.mark.slow  # resume bitwise: also tests/test_operator.py (SIGTERM, in-process)
def test_resume_gives_same_final_weights(tmp_path, tiny):
    full, cut = tmp_path / "full", tmp_path / "cut"
    main(tiny(full, rounds=3))
    main(tiny(cut, rounds=3))
    # simulate a crash after round 2: only round 2's checkpoint survives as last.ckpt
    (cut / "checkpoints" / "last.ckpt").unlink()  # a link to round-003.ckpt
    shutil.copy(cut / "checkpoints" / "round-002.ckpt", cut / "checkpoints" / "last.ckpt")
    (cut / "encoder.pt").unlink()
    main(tiny(cut, rounds=3, extra=["--ckpt_path=last"]))
    a = torch.load(full / "encoder.pt", weights_only=True)
    b = torch.load(cut / "encoder.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, cb = client_files(full, 1).load(3)["modules"], client_files(cut, 1).load(3)["modules"]
    for k, v in ca.items():
        assert torch.equal(v, cb[k]), k


def test_no_exchange_ablation(tmp_path, tiny):
    main(tiny(tmp_path, rounds=1, extra=["--federation.exchange=false"]))
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.ckpt")
    assert ckpt["inbox"] == {} and ckpt["comm"]["features_up"] == 0


def test_bad_checkpoint_is_a_clear_error(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="does not exist"):  # (last with nothing to resume starts the run)
        main(tiny(tmp_path, rounds=1, extra=[f"--ckpt_path={tmp_path / 'none.ckpt'}"]))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a file written by torch.save"):
        main(tiny(tmp_path, rounds=1, extra=[f"--ckpt_path={bad}"]))


@pytest.mark.slow  # the suite's 3-minute budget (make test-slow)
def test_exchange_source_keys_shares_this_rounds_keys(tmp_path, tiny):
    """exchange_source=keys shares the momentum keys computed during the round: one per partition
    and volume per epoch, tagged with the sender, at no extra forward pass."""
    main(tiny(tmp_path, rounds=2, extra=["--federation.exchange_source=keys", "--federation.local_epochs=2"]))
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.ckpt")
    for c, inbox in ckpt["inbox"].items():
        other = 1 - int(c)
        assert set(inbox["clients"].tolist()) == {other}
        enqueued = client_states_of(ckpt, tmp_path)[other]["modules"][
            "local_bank.count"
        ].item()  # 2 equal rounds, bank not full
        assert enqueued < 1024 and len(inbox["vectors"]) == enqueued // 2  # exactly the last round's keys
        assert set(inbox["partitions"].tolist()) == {0, 1, 2, 3}
