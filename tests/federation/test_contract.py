"""The round engine's contract with a stage's module: both stages implement every protocol, the
round's context is passed in (and is what the schedules count over), and privacy acts at its
three points only when it is on."""

import pytest
import torch

from fcl_lightning.federation.contract import (
    ClientModule,
    ClientState,
    FeatureExchange,
    RoundContext,
    RoundTraining,
    SharedWeights,
)
from fcl_lightning.lit.pretrain import ContrastivePretrainModule
from fcl_lightning.lit.segment import SegmentationModule
from fcl_lightning.privacy.client import PRIVACY_SECRET, ClientPrivacy
from fcl_lightning.privacy.config import Privacy

SMALL = [8, 16, 16, 16]


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_both_stages_implement_the_contract(stage):
    module = (
        ContrastivePretrainModule(features=SMALL, proj_hidden=32, proj_dim=16)
        if stage == "pretrain"
        else SegmentationModule(features=SMALL)
    )
    for protocol in (SharedWeights, ClientState, FeatureExchange, RoundTraining, ClientModule):
        assert isinstance(module, protocol), protocol.__name__
    module.begin_round(RoundContext(round=3, rounds=10, keep_optimizer_state=False))
    assert module.round_progress == (3, 10) and module.keep_optimizer_state is False


def test_a_module_missing_a_member_is_not_a_client_module():
    class NoState(torch.nn.Module):
        shares_features, fit_means = False, {}

        def global_state(self): ...
        def global_state_mismatch(self, state): ...
        def load_global_state(self, state): ...
        def num_samples(self, datamodule, client): ...
        def receive_features(self, entries): ...
        def export_features(self, datamodule, client, per_partition, generator, source="embed"): ...
        def begin_round(self, context): ...
        def train_loader(self, datamodule, client, seed): ...
        def val_loader(self, datamodule, client): ...

    assert isinstance(NoState(), SharedWeights) and not isinstance(NoState(), ClientModule)


def test_client_privacy_off_does_nothing_and_on_keeps_its_secret():
    update = {"w": torch.ones(3)}
    off = ClientPrivacy(None, None, 0)
    assert off.features(None, None, 0, None, 1) is None  # never touches the module
    assert off.update(update, {"w": torch.zeros(3)}) is update
    assert off.keep({"modules": {}}) == {"modules": {}}
    on = ClientPrivacy(Privacy(noise_multiplier=1.0, weights=True, features=False), None, 2)
    state = on.keep({"modules": {}})
    again = ClientPrivacy(Privacy(noise_multiplier=1.0, weights=True, features=False), state, 2)
    assert again.noise_seed == on.noise_seed == int(state[PRIVACY_SECRET])  # a resume repeats the noise
    assert torch.equal(on.update(update, {"w": torch.zeros(3)})["w"], again.update(update, {"w": torch.zeros(3)})["w"])
    assert not torch.equal(on.update(update, {"w": torch.zeros(3)})["w"], update["w"])
