import pytest
import torch
from torch import nn

from fcl_lightning.fcl.memory_bank import BankEntries, MemoryBank
from fcl_lightning.fcl.momentum import cosine_schedule, make_momentum_copy, update_momentum


def entries(start, n, dim=2, client=0):
    v = torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)
    return BankEntries(v, torch.arange(start, start + n) % 4, torch.full((n,), client))


def test_bank_returns_state_before_enqueue_and_wraps():
    bank = MemoryBank(5, 2)
    assert len(bank(entries(0, 3))) == 0  # before the first enqueue: empty
    before = bank(entries(3, 4, client=1))  # holds 0,1,2 ; now 7 pushed into 5 slots
    assert before.vectors[:, 0].tolist() == [0, 1, 2]
    now = bank.entries()
    assert now.vectors[:, 0].tolist() == [2, 3, 4, 5, 6]  # oldest first, wrapped around
    assert now.partitions.tolist() == [2, 3, 0, 1, 2]
    assert now.clients.tolist() == [0, 1, 1, 1, 1]
    assert bank.fill == 1.0


def test_bank_oversized_enqueue_keeps_newest_and_replace():
    bank = MemoryBank(4, 2)
    bank.enqueue(entries(0, 10))
    assert bank.entries().vectors[:, 0].tolist() == [6, 7, 8, 9]
    bank.replace(entries(100, 2, client=3))
    e = bank.entries()
    assert e.vectors[:, 0].tolist() == [100, 101] and e.clients.tolist() == [3, 3] and bank.fill == 0.5


def test_bank_is_in_state_dict_and_restores():
    bank = MemoryBank(6, 2)
    bank.enqueue(entries(0, 4))
    other = MemoryBank(6, 2)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.entries().vectors, bank.entries().vectors)
    other.enqueue(entries(10, 3))
    assert other.entries().vectors[:, 0].tolist() == [1, 2, 3, 10, 11, 12]


def test_update_momentum_is_ema_and_copies_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = make_momentum_copy(net)
    assert all(not p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    net(torch.randn(8, 3))  # changes running stats
    old = [p.clone() for p in ema.parameters()]
    update_momentum(net, ema, 0.9)
    for o, e, p in zip(old, ema.parameters(), net.parameters()):
        assert torch.allclose(e, 0.9 * o + 0.1 * p)
    assert torch.equal(ema[1].running_mean, net[1].running_mean)
    update_momentum(net, ema, 0.0)
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), net.parameters()))


@pytest.mark.parametrize("start,end", [(0.99, 1.0), (0.9, 0.999)])
def test_cosine_schedule(start, end):
    assert cosine_schedule(0, 100, start, end) == pytest.approx(start)
    assert cosine_schedule(100, 100, start, end) == pytest.approx(end)
    assert cosine_schedule(50, 100, start, end) == pytest.approx((start + end) / 2)
    vals = [cosine_schedule(s, 100, start, end) for s in range(101)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))
