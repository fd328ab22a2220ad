"""Client Trainers built once per run (federation.reuse_trainers) and kept on their device."""

import lightning.pytorch as pl
import pytest
import torch

from fcl_lightning.cli import main
from fcl_lightning.federation.checkpoint import client_states_of, load_checkpoint
from fcl_lightning.federation.loop import FederatedLoop
from fcl_lightning.runtime import ResidentStrategy, resident_device


@pytest.fixture
def built(monkeypatch):
    """Every Trainer the loop builds for its clients."""
    out: list[pl.Trainer] = []
    make = FederatedLoop.make_trainer

    def counting(self):
        out.append(make(self))
        return out[-1]

    monkeypatch.setattr(FederatedLoop, "make_trainer", counting)
    return out


@pytest.mark.slow  # the suite's 3-minute budget (make test-slow)
def test_reused_trainers_give_the_same_bits_as_fresh_ones(tmp_path, tiny, built):
    """A reused Trainer runs on from its earlier rounds' step counts; the momentum schedule (which
    reads the step within the round and the round's length) and every weight must not notice."""
    extra = ["--federation.local_steps=3", "--model.momentum_end=1.0", "--federation.monitor=null"]
    main(tiny(tmp_path / "reused", rounds=2, extra=extra))
    assert len(built) == 2  # one Trainer per client for both rounds
    assert all(isinstance(t.strategy, ResidentStrategy) for t in built)
    assert [t.global_step for t in built] == [6, 6]  # 2 rounds x 3 steps, counted on by Lightning
    main(tiny(tmp_path / "fresh", rounds=2, extra=[*extra, "--federation.reuse_trainers=false"]))
    assert len(built) == 2 + 4
    a, b = (load_checkpoint(tmp_path / d / "checkpoints/last.ckpt") for d in ("reused", "fresh"))
    for k, v in a["global"].items():
        assert torch.equal(v, b["global"][k]), k
    sa, sb = client_states_of(a, tmp_path / "reused"), client_states_of(b, tmp_path / "fresh")
    for c in (0, 1):
        for k, v in sa[c]["modules"].items():
            assert torch.equal(v, sb[c]["modules"][k]), (c, k)
    assert [h["round/train/loss"] for h in a["history"]] == [h["round/train/loss"] for h in b["history"]]


@pytest.mark.slow  # the resume test covers reused (full run) against new (resumed) Trainers in epochs
def test_step_counts_restart_with_each_fit(tmp_path, tiny, built, monkeypatch):
    """A reused Trainer's second round counts like its first (2 epochs a round): steps from the
    fit's start, epochs from 0."""
    seen: list[tuple[int, int, float]] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            seen.append((module.step_in_fit, trainer.current_epoch, module.steps_of_fit))

    client_runtime = FederatedLoop.client_runtime

    def with_spy(self):
        self.trainer_kwargs["callbacks"] = [Spy()]
        return client_runtime(self)

    monkeypatch.setattr(FederatedLoop, "client_runtime", with_spy)
    main(tiny(tmp_path, rounds=2, clients=1, extra=["--federation.local_epochs=2", "--federation.monitor=null"]))
    assert len(built) == 1
    per_round = len(seen) // 2
    first, second = seen[:per_round], seen[per_round:]
    assert first == second  # the second round counts exactly as the first
    assert [s for s, _, _ in first] == list(range(1, per_round + 1))
    assert {e for _, e, _ in first} == {0, 1} and all(n == per_round for _, _, n in first)


def test_resident_device_is_lightnings_single_device():
    assert resident_device({"accelerator": "cpu", "devices": 1}) == torch.device("cpu")
    assert resident_device({"accelerator": "cpu", "devices": 1, "strategy": "ddp"}) is None


def test_client_states_swap_without_copies_and_stay_apart():
    """``client_state`` hands the module's own tensors over and ``load_client_state`` takes a
    client's tensors back (no copies); a fresh client must then get storage of its own, never
    write into what an earlier client handed over. Reference: plain copies of every tensor."""
    from fcl_lightning.lit.pretrain import ContrastivePretrainModule

    m = ContrastivePretrainModule(features=[4, 8], proj_hidden=8, proj_dim=4, local_bank_size=512, remote_bank_size=8)

    def mark(value: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for p in m.momentum_encoder.parameters():
                p.fill_(value)
            m.local_bank.vectors.fill_(value)
        state = m.client_state()
        return state, {k: v.clone() for k, v in state["modules"].items()}

    m.load_client_state(None)
    s0, ref0 = mark(1.0)
    m.load_client_state(None)  # a fresh client: its momentum nets start from the global nets
    assert all(torch.equal(v, ref0[k]) for k, v in s0["modules"].items())  # client 0's stay its own
    enc = dict(m.encoder.state_dict())
    assert all(torch.equal(v, enc[k]) for k, v in m.momentum_encoder.state_dict().items())
    assert m.local_bank.count == 0
    s1, ref1 = mark(2.0)
    m.load_client_state(s0)
    got = m.client_state()["modules"]
    assert all(torch.equal(got[k], ref0[k]) and got[k].data_ptr() == v.data_ptr() for k, v in s0["modules"].items())
    assert all(torch.equal(v, ref1[k]) for k, v in s1["modules"].items())
    assert all(not p.requires_grad for p in m.momentum_encoder.parameters())


@pytest.mark.parametrize("accumulate", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_the_momentum_encoder_moves_once_per_optimiser_step(tmp_path, tiny, monkeypatch, accumulate):
    """With gradient accumulation over k batches the EMA follows the optimiser's steps (solo-learn's
    rule), not the batches: as many momentum updates as steps, in every client's every round."""
    from fcl_lightning.fcl.contrast import MomentumContrastModel

    updates = []
    real = MomentumContrastModel.after_step
    monkeypatch.setattr(MomentumContrastModel, "after_step", lambda self, m: updates.append(m) or real(self, m))
    extra = [f"--trainer.accumulate_grad_batches={accumulate}", "--federation.local_steps=2"]
    main(tiny(tmp_path, rounds=2, extra=extra))
    assert len(updates) == 2 * 2 * 2  # 2 rounds x 2 clients x 2 optimiser steps (each of `accumulate` batches)
