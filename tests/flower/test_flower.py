"""Flower without a network: the ServerApp/ClientApp logic through an in-process grid gives the
in-process loop's weights, routes vectors only to the other clients, weights FedAvg by sample
counts, and leaves failing clients out."""

import os
import shlex
import signal
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flower_grid import LocalGrid, flower_run
from support import REPO

from fcl_lightning.cli import main
from fcl_lightning.fcl.aggregate import FedAvg
from fcl_lightning.flower.apps import client_app
from fcl_lightning.flower.codec import record_to_weights
from fcl_lightning.flower.server import run_server


def train_messages(grid, round_idx):
    return [m for m in grid.sent if m.metadata.message_type == "train" and m.metadata.group_id == str(round_idx)]


def start_worker(path: Path) -> None:
    """The node's long-lived worker (``python -m fcl_lightning.flower.worker``), in a thread."""
    import threading
    import time

    from fcl_lightning.flower.worker import serve

    threading.Thread(target=serve, args=(path,), daemon=True).start()
    deadline = time.monotonic() + 30
    while not path.is_socket():
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("via", ["worker", pytest.param("clientapp", marks=pytest.mark.slow)])
def test_flower_equals_in_process_loop(tmp_path, tiny, via):
    """Bitwise the in-process loop's encoder, with the nodes' ClientApps computing the replies
    themselves or relaying every message to a long-lived worker (node config ``worker``)."""
    node_extra = None
    if via == "worker":
        start_worker(tmp_path / "worker.sock")
        node_extra = {"worker": str(tmp_path / "worker.sock")}
    main(tiny(tmp_path / "inproc", rounds=2))
    grid, summary = flower_run(tmp_path, tiny, tmp_path / "flower", rounds=2, node_extra=node_extra)
    a = torch.load(tmp_path / "inproc/encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "flower/encoder.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: same client step, seeds, FedAvg and routing
    assert summary["rounds_completed"] == 2 and summary["bytes"]["features_up"] > 0
    # client state lives on the nodes, never in the server's checkpoint
    ckpt = torch.load(tmp_path / "flower/checkpoints/last.ckpt", weights_only=True)
    assert "clients" not in ckpt and ckpt["client_versions"] == {"0": 2, "1": 2}  # which state, not the state
    assert all(any(k.startswith("fcl-client-") for k in ctx.state.keys()) for ctx in grid.contexts.values())


def test_a_missing_worker_is_a_clear_error(tmp_path):
    from types import SimpleNamespace

    from fcl_lightning.flower.worker import WorkerError, relay

    sock = tmp_path / "none.sock"
    with pytest.raises(WorkerError, match=f"no fcl-lightning worker at {sock}.*fcl_lightning.flower.worker --socket"):
        relay("train", None, SimpleNamespace(node_config={"worker": str(sock)}))


@pytest.mark.slow
def test_routing_and_sample_weighting(tmp_path, tiny):
    grid, _ = flower_run(tmp_path, tiny, tmp_path / "run", clients=3, rounds=2)
    node_client = {100 + c: c for c in range(3)}
    # round 1 carries the vectors of round 0: each node gets only the other clients' vectors
    for m in train_messages(grid, 1):
        c = node_client[m.metadata.dst_node_id]
        feats = m.content["features"].to_torch_state_dict()
        assert set(feats) == {"vectors", "partitions", "clients"}  # vectors and integer tags, no pixels
        assert feats["vectors"].ndim == 2 and feats["vectors"].shape[1] == 16
        assert set(feats["clients"].tolist()) == {0, 1, 2} - {c}
    # the weights sent in round 1 are the sample-weighted mean of round 0's updates
    r0 = [r for r in grid.replies if r.metadata.message_type == "train" and r.metadata.group_id == "0"]
    updates = [record_to_weights(r.content["update"]) for r in r0]
    counts = [int(r.content["metrics"]["num-examples"]) for r in r0]
    assert len(set(counts)) > 1  # the clients differ in size, so the weighting matters
    want = FedAvg()(updates, counts)
    sent = record_to_weights(train_messages(grid, 1)[0].content["weights"])
    for k in want:
        assert torch.equal(sent[k], want[k]), k


@pytest.mark.slow  # kept out of make test for its time (make test-slow)
def test_failing_client_is_left_out(tmp_path, tiny, capsys):
    grid, summary = flower_run(
        tmp_path, tiny, tmp_path / "run", clients=3, rounds=2, fail={0: {102}}, silent={1: {101}}
    )
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert [h["round/clients"] for h in ckpt["history"]] == [2, 2]
    err = capsys.readouterr().err
    assert "client 2 left out" in err and "crashed" in err and "client 1 left out" in err
    # a failed client gets the others' vectors next round all the same, and never its own
    m = [m for m in train_messages(grid, 1) if m.metadata.dst_node_id == 102][0]
    assert set(m.content["features"].to_torch_state_dict()["clients"].tolist()) == {0, 1}


@pytest.mark.slow
def test_site_nodes_hold_only_their_own_data(tmp_path, tiny):
    """With a data-root each node's datamodule is one site's folder (num_clients 1); its vectors still
    carry its federation-wide id, so routing works as before."""
    from fcl_lightning.data.phantom import PhantomSource, write_acdc_layout

    site = write_acdc_layout(PhantomSource(num_subjects=8, size=64), str(tmp_path / "site"))
    grid, summary = flower_run(
        tmp_path,
        tiny,
        tmp_path / "run",
        clients=2,
        rounds=2,
        node_extra={"data-root": str(site), "overrides": "--data.val_fraction=0.0"},
    )
    for m in train_messages(grid, 1):
        c = m.metadata.dst_node_id - 100
        assert set(m.content["features"].to_torch_state_dict()["clients"].tolist()) == {1 - c}
    r0 = [r for r in grid.replies if r.metadata.message_type == "train" and r.metadata.group_id == "0"]
    assert [int(r.content["metrics"]["num-examples"]) for r in r0] == [16, 16]  # all 8 phantom subjects x 2 frames
    assert summary["rounds_completed"] == 2


@pytest.mark.slow  # kept out of make test for its time (make test-slow)
def test_too_few_replies_fail_the_round(tmp_path, tiny):
    with pytest.raises(RuntimeError, match="only 1 of 2 clients replied"):
        flower_run(
            tmp_path, tiny, tmp_path / "run", clients=2, rounds=1, extra=["--federation.min_clients=2"], fail={0: {101}}
        )


@pytest.mark.skipif(
    os.environ.get("FCL_FLOWER_LOOPBACK") != "1", reason="set FCL_FLOWER_LOOPBACK=1 (starts Flower processes)"
)
def test_loopback_deployment_matches_in_process(tmp_path):
    """One flower-superlink and 2 flower-supernode processes on 127.0.0.1, `flwr run` for 2 rounds."""
    sys.path.insert(0, str(REPO / "experiments"))
    from flower_loopback import run_loopback

    res = run_loopback(tmp_path, rounds=2, clients=2, timeout=300)
    assert res["bitwise_equal"], res


@pytest.mark.skipif(
    os.environ.get("FCL_FLOWER_LOOPBACK") != "1", reason="set FCL_FLOWER_LOOPBACK=1 (starts Flower processes)"
)
def test_floor_app_echoes_the_payload_every_round(tmp_path):
    """experiments/flower_floor on the same loopback: every round's replies came back (the server
    asserts it) and it timed each of the rounds asked for."""
    sys.path.insert(0, str(REPO / "experiments"))
    from flower_loopback import run_floor

    res = run_floor(tmp_path, rounds=3, clients=2, payload_bytes=1 << 20, timeout=300)
    assert len(res["round_s"]) == 3 and all(t > 0 for t in res["round_s"]), res


@pytest.mark.slow
def test_server_resumes_from_its_checkpoint(tmp_path, tiny):
    """The server stops after round 1 and resumes with ckpt-path=last; the nodes kept their own
    state, so the result is the uninterrupted run's, bitwise."""
    main(tiny(tmp_path / "inproc", rounds=2))
    base = tmp_path / "base.yaml"
    base.write_text("seed_everything: 0\n")

    def config(rounds, **extra):
        ov = tiny(tmp_path / "flower", rounds=rounds)[1:]
        return {"config": str(base), "overrides": " ".join(shlex.quote(a) for a in ov), "wait-s": 5, **extra}

    grid = LocalGrid(client_app, config(1), {100 + c: {"partition-id": c} for c in range(2)})
    run_server(grid, config(1))
    for ctx in grid.contexts.values():  # the nodes run on; the next run's config comes with its messages
        ctx.run_config = config(2, **{"ckpt-path": "last"})
    summary = run_server(grid, config(2, **{"ckpt-path": "last"}))
    assert summary["rounds_completed"] == 2
    a = torch.load(tmp_path / "inproc/encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "flower/encoder.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_federated_finetuning_on_flower(tmp_path):
    """Stage 2 runs the same way: FedAvg of the whole U-Net, no features exchanged."""
    from support import FINETUNE

    args = [a for a in FINETUNE if a != "--config"]
    cfg, overrides = args[0], args[1:] + ["--federation.mode=federated", "--federation.rounds=2"]
    main(["fit", "--config", cfg, *overrides, f"--trainer.default_root_dir={tmp_path / 'inproc'}"])
    run_config = {
        "config": cfg,
        "overrides": " ".join(map(shlex.quote, [*overrides, f"--trainer.default_root_dir={tmp_path / 'flower'}"])),
        "wait-s": 5,
    }
    grid = LocalGrid(client_app, run_config, {100 + c: {"partition-id": c} for c in range(2)})
    summary = run_server(grid, run_config)
    assert summary["bytes"]["features_up"] == 0 and summary["rounds_completed"] == 2
    a = torch.load(tmp_path / "inproc/checkpoints/last.ckpt", weights_only=True)["global"]
    b = torch.load(tmp_path / "flower/checkpoints/last.ckpt", weights_only=True)["global"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["context", pytest.param("state-dir", marks=pytest.mark.slow)])
def test_server_killed_before_its_checkpoint_resumes_the_nodes_from_the_state_it_names(tmp_path, tiny, where):
    """The nodes trained round 2 but the server died before round 2's checkpoint: resumed from
    round 1's, it tells each node to start from its state after round 1 (which the node still
    keeps, in Context.state or its state-dir), not its newest, and ends bitwise as in-process."""
    main(tiny(tmp_path / "inproc", rounds=2))
    base = tmp_path / "base.yaml"
    base.write_text("seed_everything: 0\n")

    def config(**extra):
        ov = tiny(tmp_path / "flower", rounds=2)[1:]
        return {"config": str(base), "overrides": " ".join(shlex.quote(a) for a in ov), "wait-s": 5, **extra}

    nodes = {100 + c: {"partition-id": c} for c in range(2)}
    if where == "state-dir":
        nodes = {n: {**cfg, "state-dir": str(tmp_path / f"site{n}")} for n, cfg in nodes.items()}
    grid = LocalGrid(client_app, config(), nodes)
    run_server(grid, config())
    ck = tmp_path / "flower" / "checkpoints"
    (ck / "last.ckpt").unlink()  # the kill: round 2's server file never made it
    (ck / "round-002.ckpt").unlink()
    (tmp_path / "flower" / "encoder.pt").unlink()
    for ctx in grid.contexts.values():
        ctx.run_config = config(**{"ckpt-path": str(ck / "round-001.ckpt")})
        held = (
            sorted(p.name for p in (tmp_path / f"site{ctx.node_id}").iterdir())
            if where == "state-dir"
            else sorted(k for k in ctx.state.keys() if k.startswith("fcl-client-"))
        )
        assert held == (
            ["state-001.pt", "state-002.pt"] if where == "state-dir" else ["fcl-client-001", "fcl-client-002"]
        )
        if where == "state-dir":
            assert not any(k.startswith("fcl-client") for k in ctx.state.keys())  # on disk, not in memory
    summary = run_server(grid, config(**{"ckpt-path": str(ck / "round-001.ckpt")}))
    assert summary["rounds_completed"] == 2
    assert [int(m.content["config"]["state-version"]) for m in train_messages(grid, 1)][-2:] == [1, 1]
    a = torch.load(tmp_path / "inproc/encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "flower/encoder.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # Ray's start-up alone is ~10 s (make test-slow; needs the [simulation] extra)
def test_simulated_federation_equals_the_in_process_loop(tmp_path, tiny):
    """Flower's simulation runtime (Ray) with 3 virtual nodes, 2 of them sampled a round and their
    states on disk only: the in-process loop's encoder, bitwise, when both train with one torch
    thread (what Ray gives a node of cpus-per-client 1; more threads sum in another order)."""
    pytest.importorskip("ray")
    from fcl_lightning.federation.checkpoint import client_files
    from fcl_lightning.flower.simulation import simulate

    extra = ["--federation.clients_per_round=2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(tiny(tmp_path / "inproc", rounds=2, clients=3, extra=extra))
    finally:
        torch.set_num_threads(threads)
    base = tmp_path / "base.yaml"
    base.write_text("seed_everything: 0\n")
    states = tmp_path / "states"
    before = signal.getsignal(signal.SIGTERM)
    simulate(str(base), tiny(tmp_path / "sim", rounds=2, clients=3, extra=extra)[1:], 3, str(states), cpus=2)
    assert signal.getsignal(signal.SIGTERM) is before  # not Ray's, which outlived the run before
    a = torch.load(tmp_path / "inproc/encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "sim/encoder.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for c in range(3):  # the same clients trained in the same rounds, their states on the "sites"' disks
        assert sorted(p.name for p in (states / f"client{c}").iterdir()) == [
            p.name for p in sorted(client_files(tmp_path / "inproc", c).folder.iterdir())
        ]
    assert not (tmp_path / "sim" / "clients").exists()  # the server holds no client state
