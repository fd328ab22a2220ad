"""Baseline objectives against slow, obviously-correct references, and every method config
through one tiny federated round."""

import math

import pytest
import torch
import torch.nn.functional as F
from support import REPO

from fcl_lightning.baselines import (
    PartitionContrastObjective,
    RotationObjective,
    SimCLRObjective,
    SwAVObjective,
    sinkhorn,
)
from fcl_lightning.baselines.rotation import rotate_batch
from fcl_lightning.cli import main
from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.fcl.objectives import PretrainStep
from fcl_lightning.federation.checkpoint import load_checkpoint
from fcl_lightning.models.encoder import ProjectionHead, UNetEncoder

METHODS = sorted((REPO / "configs/methods").glob("*.yaml"))
# FCL, its dense extension and Local CL (local mode) in every run of the suite; the ablations (the
# same module with one switch changed) and the other baselines' configs (their objectives are
# tested against references above) with the slow tests (make test-slow)
ABLATIONS = {
    "fcl_literal",
    "fcl_no_exchange",
    "fcl_no_remote",
    "fcl_no_momentum",
    "fedsimclr",
    "fedrotation",
    "fedswav",
    "fcl_dp2",  # fcl_dp8 with another epsilon
    "fcl_dp1",
}
METHOD_PARAMS = [pytest.param(m, id=m.stem, marks=[pytest.mark.slow] if m.stem in ABLATIONS else []) for m in METHODS]


def contrastive_reference(z: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    """Mean over ordered positive pairs (a, p), a != p, same label, of
    -log(e^{s_ap/t} / (e^{s_ap/t} + sum_{n: label differs} e^{s_an/t})), cosine similarity."""
    z = [v / v.norm() for v in z.double()]
    terms = []
    for a in range(len(z)):
        for p in range(len(z)):
            if a == p or labels[a] != labels[p]:
                continue
            pos = math.exp(float(z[a] @ z[p]) / t)
            neg = sum(math.exp(float(z[a] @ z[n]) / t) for n in range(len(z)) if labels[n] != labels[a])
            terms.append(-math.log(pos / (pos + neg)))
    return sum(terms) / len(terms)


def make_step(views, partitions, embed=None, encode=None):
    b = views[0].shape[0]
    return PretrainStep(
        views,
        partitions,
        torch.arange(b),
        embed or (lambda x: x),
        lambda x: x,
        encode or (lambda x: x),
        BankEntries.empty(4),
    )


@pytest.mark.parametrize("b, d, t", [(3, 4, 0.1), (6, 8, 0.5), (5, 16, 0.2)])
def test_simclr_matches_reference(b, d, t):
    g = torch.Generator().manual_seed(b * d)
    z1, z2 = (F.normalize(torch.randn(b, d, generator=g), dim=1) for _ in range(2))
    out, keys = SimCLRObjective(t).step(make_step((z1, z2), torch.zeros(b, dtype=torch.long)))
    ref = contrastive_reference(torch.cat([z1, z2]), torch.arange(b).repeat(2), t)
    assert keys is None
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("parts, t", [([0, 1, 2, 3, 0, 1, 2, 3], 0.1), ([0, 0, 1, 1, 2, 2], 0.3)])
def test_partition_contrast_matches_reference(parts, t):
    parts = torch.tensor(parts)
    g = torch.Generator().manual_seed(len(parts))
    z1, z2 = (F.normalize(torch.randn(len(parts), 8, generator=g), dim=1) for _ in range(2))
    out, _ = PartitionContrastObjective(t).step(make_step((z1, z2), parts))
    ref = contrastive_reference(torch.cat([z1, z2]), parts.repeat(2), t)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-5)


def test_rotation_labels_and_views():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float).reshape(2, 1, 3, 3)
    xr, y = rotate_batch(x)
    assert y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for k in range(4):
        for i in range(2):
            want = x[i]
            for _ in range(k):  # k quarter turns counter-clockwise, one at a time
                want = torch.stack([want[0].T.flip(0)])
            assert torch.equal(xr[2 * k + i], want), (k, i)


def test_sinkhorn_marginals_and_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 4, generator=g)
    q = sinkhorn(scores, epsilon=0.5, iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-5)  # one assignment per sample
    assert torch.allclose(q.sum(0), torch.full((4,), 3.0), atol=1e-3)  # prototypes used equally
    # reference: the same alternating normalisation written as plain loops
    qr = [[math.exp(float(scores[i, k]) / 0.5) for i in range(12)] for k in range(4)]
    tot = sum(map(sum, qr))
    qr = [[v / tot for v in row] for row in qr]
    for _ in range(3):
        qr = [[v / sum(row) / 4 for v in row] for row in qr]
        cols = [sum(qr[k][i] for k in range(4)) for i in range(12)]
        qr = [[qr[k][i] / cols[i] / 12 for i in range(12)] for k in range(4)]
    q3 = sinkhorn(scores, epsilon=0.5, iterations=3)
    assert torch.allclose(q3, torch.tensor(qr).T * 12, atol=1e-6)


def test_swav_loss_matches_hand_computation():
    obj = SwAVObjective(num_prototypes=3, temperature=0.5, epsilon=0.5)
    obj.build(8, 4)
    g = torch.Generator().manual_seed(1)
    z1, z2 = (F.normalize(torch.randn(5, 4, generator=g), dim=1) for _ in range(2))
    out, _ = obj.step(make_step((z1, z2), torch.zeros(5, dtype=torch.long)))
    c = F.normalize(obj.prototypes.weight.detach(), dim=1)  # step normalised them in place
    s1, s2 = z1 @ c.T, z2 @ c.T
    q1, q2 = sinkhorn(s1, 0.5, 3), sinkhorn(s2, 0.5, 3)
    ref = 0.0
    for i in range(5):
        ref -= sum(float(q2[i, k]) * float(F.log_softmax(s1[i] / 0.5, 0)[k]) for k in range(3))
        ref -= sum(float(q1[i, k]) * float(F.log_softmax(s2[i] / 0.5, 0)[k]) for k in range(3))
    assert out["loss"].item() == pytest.approx(ref / 10, rel=1e-5)
    assert torch.allclose(obj.prototypes.weight.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize(
    "obj",
    [SimCLRObjective(), PartitionContrastObjective(), RotationObjective(), SwAVObjective(8)],
    ids=lambda o: type(o).__name__,
)
def test_gradient_reaches_the_encoder(obj):
    torch.manual_seed(0)
    enc = UNetEncoder(1, [4, 8, 8], "instance")
    head = ProjectionHead(8, 4, 16, 8)
    obj.build(8, 8)
    embed = lambda x: F.normalize(head(enc(x)[-1]), dim=1)  # noqa: E731
    x1, x2 = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)
    out, _ = obj.step(make_step((x1, x2), torch.tensor([0, 1, 2, 3] * 2), embed=embed, encode=lambda x: enc(x)[-1]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert enc.conv_0.conv_0.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.parameters())


@pytest.mark.parametrize("method", METHOD_PARAMS)
def test_every_method_config_runs_one_round(tmp_path, tiny, method):
    args = [a for a in tiny(tmp_path, rounds=1) if not a.startswith("--model.objective.")]
    main([args[0], "--config", str(method), *args[1:]])
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.ckpt")
    assert ckpt["round"] == 1
    assert (tmp_path / "encoder.pt").is_file()
    exchanged = ckpt["comm"]["features_up"] > 0
    assert exchanged == ("fcl" in method.stem and method.stem not in ("fcl_no_exchange", "fclopt"))
    if "local" in method.stem:
        assert sorted(p.name for p in (tmp_path / "encoders").iterdir()) == ["client0.pt", "client1.pt"]
