"""The round engine on its own: fake clients that train nothing stand in for the client steps,
so the loop's order of rounds and hooks, FedAvg, checkpoints and resume are checked in a second
(the CLI end-to-end tests train for real)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fcl_lightning import layout
from fcl_lightning.cli import build
from fcl_lightning.federation.client import ClientResult
from fcl_lightning.federation.hooks import CheckpointHook, RoundHook
from fcl_lightning.federation.loop import Clients, FederatedLoop


class FakeClients(Clients):
    """Each client returns its start weights + (client + 1), weighted by client + 1 samples, and
    a state counting the rounds it trained; ``fail_at``: round index whose step raises."""

    states_come_back = True

    def __init__(self, num_clients: int, fail_at: int | None = None) -> None:
        self.num_clients, self.fail_at = num_clients, fail_at
        self.failures: dict[int, str] = {}
        self.states: dict[int, Any] = {}
        self.calls: list[tuple[int, list[int]]] = []

    def train_round(self, round_idx, starts, inbox, progress) -> dict[int, ClientResult]:
        self.calls.append((round_idx, sorted(starts)))
        if round_idx == self.fail_at:
            raise RuntimeError(f"client step fails in round {round_idx + 1}")
        out = {}
        for i, (c, start) in enumerate(sorted(starts.items())):
            progress(i, c)
            update = {k: v + (c + 1) if v.is_floating_point() else v.clone() for k, v in start.items()}
            state = {"rounds": torch.tensor(int(self.states.get(c, {}).get("rounds", 0)) + 1)}
            out[c] = ClientResult(update, c + 1, state, None, {"train/loss": float(round_idx)})
            self.states[c] = state
        return out

    def load_states(self, states: dict[int, Any]) -> None:
        self.states = dict(states)


class Recorder(RoundHook):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_run_start(self, run, state):
        self.calls.append(("run_start", state.round))

    def on_round_start(self, run, state, round_idx):
        self.calls.append(("round_start", round_idx))

    def on_round_end(self, run, state, results, metrics):
        self.calls.append(("round_end", state.round, sorted(results)))

    def on_round_recorded(self, run, state, metrics):
        self.calls.append(("recorded", state.round))

    def on_run_end(self, run, state, summary):
        self.calls.append(("run_end", state.round))

    def teardown(self, run, error):
        self.calls.append(("teardown", type(error).__name__ if error else None))


def engine(tiny, root: Path, rounds: int, hooks: list[RoundHook]) -> FederatedLoop:
    """The loop of the tiny pre-training config (``tiny``: the conftest's fixture)."""
    cli = build(tiny(root, rounds=rounds, extra=["--seed_everything=0"])[1:])
    return FederatedLoop(
        cli.config_init["federation"], cli.model, cli.datamodule, {}, root, seed=0, config_text="x", hooks=hooks
    )


def test_rounds_run_in_order_hooks_around_them_and_fedavg_weighs_by_samples(tmp_path, tiny):
    rec = Recorder()
    loop = engine(tiny, tmp_path, 3, [rec, CheckpointHook()])
    init = {k: v.clone() for k, v in loop.module.global_state().items()}
    clients = FakeClients(2)
    loop.run(None, clients)
    assert clients.calls == [(0, [0, 1]), (1, [0, 1]), (2, [0, 1])]
    assert rec.calls == [
        ("run_start", 0),
        ("round_start", 0), ("round_end", 1, [0, 1]), ("recorded", 1),
        ("round_start", 1), ("round_end", 2, [0, 1]), ("recorded", 2),
        ("round_start", 2), ("round_end", 3, [0, 1]), ("recorded", 3),
        ("teardown", None), ("run_end", 3),
    ]  # fmt: skip
    # each round: (1 x (w + 1) + 2 x (w + 2)) / 3 = w + 5/3
    final = loop.module.global_state()
    for k, v in init.items():
        if v.is_floating_point():
            torch.testing.assert_close(final[k], v + 5.0, rtol=0, atol=1e-5)
    assert loop.state.checkpointed == 3 and (layout.last(tmp_path)).is_file()


def test_a_stopped_run_resumes_at_its_last_checkpoint_with_the_same_weights_and_states(tmp_path, tiny):
    whole = engine(tiny, tmp_path / "whole", 4, [CheckpointHook()])
    whole.run(None, FakeClients(2))

    stopped = engine(tiny, tmp_path / "cut", 4, [CheckpointHook()])
    with pytest.raises(RuntimeError, match="fails in round 3"):
        stopped.run(None, FakeClients(2, fail_at=2))
    assert stopped.state.checkpointed == 2  # handed over by the writer before the error left the loop

    resumed, clients = engine(tiny, tmp_path / "cut", 4, [CheckpointHook()]), FakeClients(2)
    resumed.run("last", clients)
    assert clients.calls == [(2, [0, 1]), (3, [0, 1])]  # rounds 1-2 are not trained again
    assert {c: int(s["rounds"]) for c, s in clients.states.items()} == {0: 4, 1: 4}  # the states came back
    a, b = whole.module.global_state(), resumed.module.global_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
