"""FCLOpt: the BYOL-style partition-aware loss against a slow loop, and a tiny run that sends
weights only (0 bytes of features), federates the predictor and keeps the target nets local."""

import json

import torch
import torch.nn.functional as F

from fcl_lightning.cli import main
from fcl_lightning.fcl.objectives import byol_partition_loss


def slow_byol_partition_loss(p, k, partitions):
    total = 0.0
    for i in range(len(p)):
        d = [
            2 - 2 * float(F.cosine_similarity(p[i], k[j], dim=0))
            for j in range(len(k))
            if partitions[i] == partitions[j]
        ]
        total += sum(d) / len(d)
    return total / len(p)


def test_loss_matches_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    p, k = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    parts = torch.randint(0, 3, (12,), generator=g)
    assert float(byol_partition_loss(p, k, parts)) == pytest_approx(slow_byol_partition_loss(p, k, parts))
    # identical predictions and keys within each partition: zero loss
    same = F.normalize(torch.eye(8)[parts], dim=1)
    assert float(byol_partition_loss(same, same, parts)) < 1e-6


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-5, abs=1e-6)


def test_fclopt_sends_no_features_and_federates_the_predictor(tmp_path, tiny):
    main(tiny(tmp_path, rounds=2, extra=["--config=configs/methods/fclopt.yaml"]))
    summary = json.loads((tmp_path / "summary.json").read_text())["pretrain"]
    assert summary["bytes"]["features_up"] == 0 and summary["bytes"]["weights_up"] > 0
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
    keys = set(ckpt["global"])
    assert any(k.startswith("objective.predictor.") for k in keys)
    assert not any(k.startswith("momentum_") for k in keys)  # the target nets stay with each client
    assert summary["final"]["train/loss"] < 4.0  # 2 - 2 cos is at most 4
