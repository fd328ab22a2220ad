"""Collapse monitors against slow references, and the freshness shortcut: a content-free encoder
(one vector for every slice, drifting over time) must not beat the content-free loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.fcl.monitor import CollapseMonitor, embedding_spread, knn_probe_accuracy
from fcl_lightning.fcl.objectives import ContrastiveInputs, FCLObjective


def ref_knn(z, labels, groups, k):
    z = F.normalize(z.double(), dim=1)
    correct = 0
    for i in range(len(z)):
        cands = sorted(((float(z[i] @ z[j]), j) for j in range(len(z)) if groups[j] != groups[i]), reverse=True)[:k]
        votes = {}
        for _, j in cands:
            votes[int(labels[j])] = votes.get(int(labels[j]), 0) + 1
        best = max(votes.values())
        correct += min(lab for lab, v in votes.items() if v == best) == int(labels[i])
    return correct / len(z)


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 5), (2, 10)])
def test_knn_probe_matches_reference(seed, k):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(40, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,), generator=g)
    groups = torch.arange(40) // 5
    assert knn_probe_accuracy(z, labels, groups, k) == pytest.approx(ref_knn(z, labels, groups, k))


def test_probe_separates_content_from_collapse():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(80) % 4
    groups = torch.arange(80) // 4  # one "patient" holds one slice of each partition
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    good = centres[labels] + 0.1 * torch.randn(80, 16, generator=g)
    collapsed = torch.ones(80, 16) + 1e-4 * torch.randn(80, 16, generator=g)
    assert knn_probe_accuracy(good, labels, groups) == 1.0
    assert knn_probe_accuracy(collapsed, labels, groups) < 0.5
    s_good, s_bad = embedding_spread(good), embedding_spread(collapsed)
    assert s_bad["spread"] < 1e-3 and s_bad["mean_cos"] > 0.999
    assert s_good["spread"] > 0.5


def test_spread_matches_reference():
    z = F.normalize(torch.randn(30, 5, dtype=torch.float64), dim=1)
    mean = z.mean(0)
    ref_spread = sum(float((z[i] - mean).norm()) for i in range(30)) / 30
    ref_cos = sum(float(z[i] @ z[j]) for i in range(30) for j in range(30) if i != j) / (30 * 29)
    got = embedding_spread(z)
    assert got["spread"] == pytest.approx(ref_spread) and got["mean_cos"] == pytest.approx(ref_cos)


def test_monitor_measures_volumes():
    """On volumes whose slices encode their partition, the probe is perfect; a constant embedding is flagged."""
    S, D = 4, 8
    vols = []
    for p in range(6):
        v = torch.zeros(1, 4, 4, D)
        for z in range(D):
            v[..., z] = (z * S) // D + 0.01 * p
        vols.append(v)
    mon = CollapseMonitor(k=3)
    onehot = lambda x: F.one_hot(x.mean(dim=(1, 2, 3)).floor().long(), S).float()  # noqa: E731
    good = mon.measure(lambda x: (onehot(x), None), vols, [f"p{i // 2}" for i in range(6)], S)
    assert good["probe_acc"] == 1.0 and "probe_acc_encoder" not in good
    bad = mon.measure(lambda x: (torch.ones(len(x), 3), onehot(x)), vols, [f"p{i}" for i in range(6)], S)
    assert bad["spread"] < mon.collapse_spread and bad["probe_acc_encoder"] == 1.0


# ----------------------------------------------------------------- the freshness shortcut
def drifting_constant(B=12, S=4, K=256, d=32, ages=8, seed=0):
    """Every slice embeds to ``c(t)``, a unit vector that drifts with time t. Queries and keys are
    fresh (``c(0)``); the bank holds entries of ages 1..ages, every age with every partition."""
    g = torch.Generator().manual_seed(seed)
    a, b = F.normalize(torch.randn(2, d, generator=g, dtype=torch.float64), dim=1)

    def c(t):
        return F.normalize(a + 0.3 * t * b, dim=0)

    parts, vols = torch.arange(B) % S, torch.arange(B) // S
    q = c(0).expand(B, d).clone()
    age = torch.arange(K) % ages + 1
    bank = BankEntries(
        torch.stack([c(int(t)) for t in age]), (torch.arange(K) // ages) % S, torch.zeros(K, dtype=torch.long)
    )
    return ContrastiveInputs(q, q.clone(), parts, vols, bank)


def content_free(inputs):
    """The same batch and bank with every vector identical (nothing to tell apart)."""
    same = inputs.q[:1].expand_as(inputs.q)
    bank = BankEntries(inputs.q[:1].expand_as(inputs.bank.vectors), inputs.bank.partitions, inputs.bank.clients)
    return ContrastiveInputs(same, same, inputs.partitions, inputs.volumes, bank)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_default_objective_has_no_freshness_shortcut(t):
    obj = FCLObjective(temperature=t, num_negatives=10_000)
    inputs = drifting_constant()
    drift, flat = obj(inputs), obj(content_free(inputs))
    assert drift["loss_local"].item() >= flat["loss_local"].item() - 1e-9
    assert drift["loss_remote"].item() >= flat["loss_remote"].item() - 1e-9
    # the content-free values: log(1 + in-batch negatives) and log(1 + |Q'|)
    assert flat["loss_local"].item() == pytest.approx(math.log(1 + 9))
    assert flat["loss_remote"].item() == pytest.approx(math.log(1 + 256))


def test_paper_literal_local_term_takes_the_shortcut():
    """Why the default changed: with only bank negatives, the drifting constant beats content-free."""
    obj = FCLObjective(temperature=0.1, num_negatives=10_000, local_negatives="bank", same_partition_negatives=True)
    inputs = drifting_constant()
    assert obj(inputs)["loss_local"].item() < obj(content_free(inputs))["loss_local"].item() - 1.0


def test_content_beats_content_free():
    """The default objective rewards an embedding that encodes the partition."""
    g = torch.Generator().manual_seed(1)
    inputs = drifting_constant()
    centres = F.normalize(torch.randn(4, 32, generator=g, dtype=torch.float64), dim=1)
    q = centres[inputs.partitions]
    bank = BankEntries(centres[inputs.bank.partitions], inputs.bank.partitions, inputs.bank.clients)
    good = ContrastiveInputs(q, q.clone(), inputs.partitions, inputs.volumes, bank)
    obj = FCLObjective(temperature=0.1, num_negatives=10_000)
    assert obj(good)["loss"].item() < obj(content_free(inputs))["loss"].item() - 1.0
    out = obj(good)
    assert out["pos_sim"].item() == pytest.approx(1.0) and out["neg_sim"].item() < 0.9
