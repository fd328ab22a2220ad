"""The framework-free contrastive model: what each method carries, one step in a bare PyTorch
loop (keys enqueued, the momentum update against its formula), the client reset, and the
Lightning module stepping the very same modules."""

from __future__ import annotations

import torch

from fcl_lightning.baselines import SimCLRObjective
from fcl_lightning.fcl.contrast import ContrastModel, MomentumContrastModel, contrast_model
from fcl_lightning.fcl.objectives import FCLObjective
from fcl_lightning.lit.pretrain import ContrastivePretrainModule

NETS = dict(features=[4, 8, 8], norm="instance", proj_hidden=16, proj_dim=8)


def batch(n_vol: int = 2, parts: int = 4, size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = n_vol * parts
    return {
        "image": torch.rand(n, 1, size, size, generator=g),
        "image_k": torch.rand(n, 1, size, size, generator=g),
        "partition": torch.arange(parts).repeat(n_vol),
        "volume": torch.arange(n_vol).repeat_interleave(parts),
        "client": torch.zeros(n, dtype=torch.long),
    }


def test_baselines_carry_no_momentum_copy_and_no_banks():
    simclr = contrast_model(False, objective=SimCLRObjective(), **NETS)
    assert type(simclr) is ContrastModel and not simclr.uses_bank
    assert not any(k.startswith(("momentum_", "local_bank", "remote_bank")) for k in simclr.state_dict())
    fcl = contrast_model(True, 64, 64, objective=FCLObjective(num_negatives=16), **NETS)
    assert isinstance(fcl, MomentumContrastModel) and fcl.uses_bank
    keys = fcl.state_dict()
    assert any(k.startswith("momentum_encoder.") for k in keys) and "local_bank.count" in keys
    module = ContrastivePretrainModule(objective=SimCLRObjective(), use_momentum=False, **NETS)
    assert not any(k.startswith(("momentum_", "local_bank", "remote_bank")) for k in module.state_dict())


def test_a_bare_loop_step_enqueues_keys_and_moves_the_momentum_copy_by_the_formula():
    torch.manual_seed(0)
    model = contrast_model(True, 64, 64, objective=FCLObjective(num_negatives=16), **NETS)
    model.reset_client()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("momentum_")], lr=0.5)
    b = batch()
    out = model.step(b)
    assert set(out) >= {"loss"} and out["loss"].requires_grad
    assert model.local_bank.entries().vectors.shape[0] == len(b["image"]) == model.round_keys
    old_key = {k: v.clone() for k, v in model.momentum_encoder.state_dict().items()}
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    new = model.encoder.state_dict()
    model.after_step(0.9)
    for k, v in model.momentum_encoder.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.9 * old_key[k] + 0.1 * new[k], atol=1e-6), k
    assert not torch.equal(
        model.momentum_encoder.state_dict()["conv_0.conv_0.conv.weight"], new["conv_0.conv_0.conv.weight"]
    )
    model.reset_client()  # a new client: momentum nets = the current nets, empty banks
    assert all(torch.equal(v, new[k]) for k, v in model.momentum_encoder.state_dict().items())
    assert len(model.local_bank.entries()) == 0 and len(model.remote_bank.entries()) == 0


def test_the_lightning_module_steps_the_cores_own_modules():
    module = ContrastivePretrainModule(
        objective=FCLObjective(num_negatives=16), local_bank_size=64, remote_bank_size=64, **NETS
    )
    assert module.core.encoder is module.encoder and module.core.local_bank is module.local_bank
    assert not any(k.startswith("core.") for k in module.state_dict())  # registered once, under the paper's names
    module.double()  # what Lightning's moves do (.to(device), precision): the core sees the moved tensors
    assert module.core.encoder.conv_0.conv_0.conv.weight.dtype == torch.float64
    assert module.core.local_bank.vectors.dtype == torch.float64
    b = {k: v.double() if v.is_floating_point() else v for k, v in batch().items()}
    assert torch.isfinite(module.core.step(b)["loss"])
    assert len(module.local_bank.entries()) == len(b["image"])


def test_batch_norm_head_removes_a_component_every_input_shares():
    """A large vector shared by the whole batch (the direction a collapsing embedding grows)
    dominates the plain head's output; the BatchNorm head centres it away, and its momentum copy
    takes the head's running statistics with the buffers."""
    from fcl_lightning.models.encoder import ProjectionHead

    torch.manual_seed(0)
    x = 50.0 * torch.randn(1, 8, 2, 2) + 0.5 * torch.randn(12, 8, 2, 2)  # shared part >> per-sample part
    outs = {}
    for norm in ("none", "batch"):
        torch.manual_seed(1)
        z = torch.nn.functional.normalize(ProjectionHead(8, 2, 32, 16, norm)(x), dim=1)
        outs[norm] = (z - z.mean(0)).norm(dim=1).mean().item()  # spread around the mean vector
    assert outs["none"] < 0.05 and outs["batch"] > 0.5, outs
    model = contrast_model(True, 64, 64, objective=FCLObjective(num_negatives=16), **NETS)  # the default head
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.head.modules())
    plain = contrast_model(True, 64, 64, objective=FCLObjective(num_negatives=16), head_norm="none", **NETS)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.head.modules())
    model.step(batch())
    model.after_step(0.5)
    for k, v in model.head.state_dict().items():
        if "running" in k:
            assert torch.equal(model.momentum_head.state_dict()[k], v), k
