"""FCL loss terms against explicit loops over queries, positives and negatives."""

import math

import pytest
import torch
import torch.nn.functional as F

from fcl_lightning.fcl.losses import local_loss, remote_loss, sample_negatives
from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.fcl.objectives import ContrastiveInputs, FCLObjective


def ref_term(q, positives, negatives, t):
    """-1/|P| sum_p log(exp(q.p/t) / (exp(q.p/t) + sum_n exp(q.n/t))), or None if P is empty."""
    if not positives:
        return None
    total = 0.0
    for p in positives:
        num = math.exp(float(q @ p) / t)
        den = num + sum(math.exp(float(q @ n) / t) for n in negatives)
        total += -math.log(num / den)
    return total / len(positives)


def ref_mean(terms):
    terms = [x for x in terms if x is not None]
    return sum(terms) / len(terms) if terms else 0.0


def make(B, K, d, S, seed):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    parts = torch.arange(B) % S
    vols = torch.arange(B) // S
    negs = BankEntries(
        F.normalize(torch.randn(K, d, generator=g, dtype=torch.float64), dim=1),
        torch.randint(0, S, (K,), generator=g),
        torch.randint(0, 3, (K,), generator=g),
    )
    return q, k, parts, vols, negs


@pytest.mark.parametrize("B,K,d,S", [(12, 16, 8, 4), (8, 0, 4, 4), (6, 5, 16, 2), (9, 40, 8, 3)])
@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("self_positive", [False, True])
def test_local_loss_matches_reference(B, K, d, S, t, self_positive):
    q, k, parts, vols, negs = make(B, K, d, S, seed=B * 100 + K)
    got = local_loss(q, k, parts, vols, negs, t, self_positive)
    terms = []
    for i in range(B):
        pos = [k[j] for j in range(B) if parts[j] == parts[i] and (vols[j] != vols[i] or (self_positive and j == i))]
        terms.append(ref_term(q[i], pos, list(negs.vectors), t))
    assert got.item() == pytest.approx(ref_mean(terms), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("B,K,d,S", [(12, 16, 8, 4), (8, 0, 4, 4), (9, 40, 8, 3)])
@pytest.mark.parametrize("batch_negatives,same_part", [(True, True), (True, False), (False, False)])
def test_local_loss_negative_variants_match_reference(B, K, d, S, batch_negatives, same_part):
    q, k, parts, vols, negs = make(B, K, d, S, seed=B + K + 11)
    got = local_loss(q, k, parts, vols, negs, 0.2, batch_negatives=batch_negatives, same_partition_negatives=same_part)
    terms = []
    for i in range(B):
        pos = [k[j] for j in range(B) if parts[j] == parts[i] and vols[j] != vols[i]]
        neg = [negs.vectors[n] for n in range(K) if same_part or negs.partitions[n] != parts[i]]
        if batch_negatives:
            neg += [k[j] for j in range(B) if parts[j] != parts[i]]
        terms.append(ref_term(q[i], pos, neg, 0.2))
    assert got.item() == pytest.approx(ref_mean(terms), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("B,K,d,S", [(12, 16, 8, 4), (8, 1, 4, 4), (6, 30, 16, 2)])
@pytest.mark.parametrize("t", [0.07, 0.1, 1.0])
def test_remote_loss_matches_reference(B, K, d, S, t):
    q, _, parts, _, negs = make(B, K, d, S, seed=7 + B + K)
    got = remote_loss(q, parts, negs, t)
    terms = []
    for i in range(B):
        pos = [negs.vectors[n] for n in range(K) if negs.partitions[n] == parts[i]]
        terms.append(ref_term(q[i], pos, list(negs.vectors), t))
    assert got.item() == pytest.approx(ref_mean(terms), rel=1e-9, abs=1e-12)


def test_empty_bank_gives_zero_with_gradient():
    q, k, parts, vols, _ = make(8, 0, 4, 4, seed=1)
    q.requires_grad_(True)
    empty = BankEntries.empty(4).to("cpu")
    empty = BankEntries(empty.vectors.double(), empty.partitions, empty.clients)
    loss = local_loss(q, k, parts, vols, empty, 0.1) + remote_loss(q, parts, empty, 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert q.grad is not None


def test_gradient_flows_to_queries_only():
    q, k, parts, vols, negs = make(12, 16, 8, 4, seed=3)
    q.requires_grad_(True)
    obj = FCLObjective(temperature=0.1, num_negatives=8)
    out = obj(ContrastiveInputs(q, k, parts, vols, negs))
    out["loss"].backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert not k.requires_grad
    assert set(out) >= {"loss", "loss_local", "loss_remote", "pos_sim", "neg_sim", "bank_sim"}


def test_objective_weights_and_sampling():
    q, k, parts, vols, negs = make(12, 16, 8, 4, seed=5)
    torch.manual_seed(0)
    full = FCLObjective(0.1, num_negatives=1000, w_local=1.0, w_remote=1.0)(ContrastiveInputs(q, k, parts, vols, negs))
    only_local = FCLObjective(0.1, num_negatives=1000, w_local=1.0, w_remote=0.0)(
        ContrastiveInputs(q, k, parts, vols, negs)
    )
    assert full["loss"].item() == pytest.approx(full["loss_local"].item() + full["loss_remote"].item())
    assert only_local["loss"].item() == pytest.approx(full["loss_local"].item())


def test_sample_negatives_uniform_without_replacement():
    bank = BankEntries(torch.arange(100.0)[:, None], torch.arange(100) % 4, torch.zeros(100, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    s = sample_negatives(bank, 30, g)
    assert len(s) == 30 and len(set(s.vectors[:, 0].tolist())) == 30
    assert torch.equal(s.partitions, s.vectors[:, 0].long() % 4)  # tags travel with their vectors
    assert len(sample_negatives(bank, 500)) == 100
    counts = torch.zeros(100)
    for _ in range(400):
        counts[sample_negatives(bank, 10, g).vectors[:, 0].long()] += 1
    assert counts.min() > 10 and counts.max() < 80  # every entry drawn, none dominating (mean 40)
