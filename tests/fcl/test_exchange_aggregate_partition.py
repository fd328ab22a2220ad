import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fcl_lightning.fcl.aggregate import FedAvg
from fcl_lightning.fcl.exchange import check_payload, embed_slices, route
from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.fcl.partition import partition_of, partition_slices, sample_partition_slices


@pytest.mark.parametrize("D,S", [(6, 4), (10, 4), (21, 4), (7, 3), (4, 4), (9, 1)])
def test_partitions_cover_in_order(D, S):
    parts = partition_slices(D, S)
    assert np.concatenate(parts).tolist() == list(range(D))
    assert all(len(p) > 0 for p in parts)
    for s, p in enumerate(parts):
        assert all(partition_of(int(z), D, S) == s == (z * S) // D for z in p)
    rng = np.random.default_rng(0)
    zs = sample_partition_slices(D, S, rng)
    assert [partition_of(int(z), D, S) for z in zs] == list(range(S))


def test_partition_needs_enough_slices():
    with pytest.raises(ValueError, match="3 slices"):
        partition_slices(3, 4)


def payload(client, n, dim=4):
    return BankEntries(torch.randn(n, dim), torch.arange(n) % 4, torch.full((n,), client))


def test_route_never_returns_own_vectors():
    pls = {0: payload(0, 3), 1: payload(1, 5), 2: payload(2, 2)}
    got = route(pls, 4, recipients=range(4))
    for c, entries in got.items():
        assert c not in entries.clients.tolist()
        assert len(entries) == sum(len(p) for o, p in pls.items() if o != c)
    assert torch.equal(got[0].vectors, torch.cat([pls[1].vectors, pls[2].vectors]))


def test_payload_holds_only_vectors_and_integer_tags():
    vols = [torch.rand(1, 16, 16, d) for d in (6, 8)]
    net = lambda x: F.normalize(x.flatten(1)[:, :8], dim=1)  # noqa: E731
    pl = embed_slices(net, vols, num_partitions=4, client=2)
    check_payload(pl)
    assert set(pl._fields) == {"vectors", "partitions", "clients"}
    assert pl.vectors.dtype == torch.float32 and pl.partitions.dtype == torch.long and pl.clients.dtype == torch.long
    assert len(pl) == 14 and pl.clients.unique().tolist() == [2]
    assert pl.partitions.tolist()[:6] == [0, 0, 1, 2, 2, 3]
    assert pl.vectors.shape[1] == 8  # low-dimensional vectors, not 16x16 pixels
    few = embed_slices(net, vols, 4, 2, per_partition=1, generator=torch.Generator().manual_seed(0))
    assert sorted(few.partitions.tolist()) == [0, 1, 2, 3]
    with pytest.raises(TypeError):
        check_payload(BankEntries(torch.randn(3, 4), torch.zeros(3), torch.zeros(3, dtype=torch.long)))


def test_fedavg_is_exact_weighted_mean():
    g = torch.Generator().manual_seed(0)
    states = [
        {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g), "n": torch.tensor(i * 3)}
        for i in range(3)
    ]
    counts = [10, 20, 5]
    out = FedAvg()(states, counts)
    for k in ("w", "b"):
        ref = sum(s[k].double() * (n / 35) for s, n in zip(states, counts)).float()
        assert torch.equal(out[k], ref)
        assert out[k].dtype == states[0][k].dtype
    assert out["n"].dtype == torch.int64
    uni = FedAvg(weighted=False)(states, counts)
    assert torch.allclose(uni["w"], sum(s["w"] for s in states) / 3)
    with pytest.raises(ValueError):
        FedAvg()(states, [1, 2])
