"""FCL's two loss terms: partition-aware InfoNCE over local positives (``local_loss``) and the
global structural matching term over same-partition members of the sampled bank (``remote_loss``).

Both evaluate, for every query ``q`` with a non-empty positive set ``Pos(q)``::

    -1/|Pos(q)| * sum_{p in Pos(q)} log( exp(q.p/t) / (exp(q.p/t) + sum_{n in Q'} exp(q.n/t)) )

and average over those queries (queries without positives do not contribute). All vectors are
expected L2-normalised, so ``q.p`` is the cosine similarity. Written with ``logaddexp`` /
``logsumexp`` for stability; ``tests/fcl/test_losses.py`` checks them against explicit loops.
"""

from __future__ import annotations

import torch

from fcl_lightning.fcl.memory_bank import BankEntries


def sample_negatives(bank: BankEntries, k: int, generator: torch.Generator | None = None) -> BankEntries:
    """``Q'``: ``k`` entries drawn uniformly without replacement from ``bank`` (all if it holds fewer)."""
    n = len(bank)
    if n <= k:
        return bank
    idx = torch.randperm(n, generator=generator, device="cpu")[:k].to(bank.vectors.device)
    return BankEntries(*(t[idx] for t in bank))


def masked_infonce(pos_logits: torch.Tensor, pos_mask: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Mean over queries with positives of the per-query mean of ``log(e^l + sum e^n) - l``.

    Args:
        pos_logits: ``[B, P]`` candidate positive logits ``q.p/t``.
        pos_mask: ``[B, P]`` bool, which candidates are positives of each query.
        neg_logits: ``[B, K]`` logits against ``Q'`` (``K`` may be 0).
    """
    neg_lse = (
        torch.logsumexp(neg_logits, dim=1, keepdim=True)
        if neg_logits.shape[1]
        else torch.full_like(pos_logits[:, :1], float("-inf"))
    )
    terms = torch.logaddexp(pos_logits, neg_lse) - pos_logits
    n_pos = pos_mask.sum(dim=1)
    has = n_pos > 0
    if not bool(has.any()):
        return pos_logits.sum() * 0.0
    per_query = (terms * pos_mask).sum(dim=1)[has] / n_pos[has]
    return per_query.mean()


def local_positive_mask(partitions: torch.Tensor, volumes: torch.Tensor, self_positive: bool = False) -> torch.Tensor:
    """``P(q)`` as a ``[B, B]`` mask: keys of same-partition slices of *other* volumes in the batch
    (plus the query's own key when ``self_positive``)."""
    same_part = partitions[:, None] == partitions[None, :]
    other_vol = volumes[:, None] != volumes[None, :]
    mask = same_part & other_vol
    if self_positive:
        mask = mask | torch.eye(len(partitions), dtype=torch.bool, device=partitions.device)
    return mask


#: logit of a candidate masked out of a denominator (``exp`` of it is exactly 0, its gradient too)
MASKED = -1e9


def local_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    partitions: torch.Tensor,
    volumes: torch.Tensor,
    negatives: BankEntries,
    temperature: float,
    self_positive: bool = False,
    batch_negatives: bool = False,
    same_partition_negatives: bool = True,
) -> torch.Tensor:
    """``L_local``: positives are the batch keys in ``P(q)``; the denominator holds ``Q'`` and/or
    the batch's keys of other partitions.

    Args:
        batch_negatives: also put the batch's keys of *other* partitions in the denominator. They
            are as fresh as the positives, so a content-free (constant) embedding cannot tell the
            two apart; bank entries are older, which is what makes the freshness shortcut.
        same_partition_negatives: keep bank entries of ``q``'s own partition in the denominator
            (the paper's formula). ``False`` drops them: they are positives of the remote term.
    """
    pos = q @ k.T / temperature
    neg = q @ negatives.vectors.T / temperature
    if not same_partition_negatives and neg.shape[1]:
        neg = neg.masked_fill(partitions[:, None] == negatives.partitions[None, :], MASKED)
    if batch_negatives:
        neg = torch.cat([neg, pos.masked_fill(partitions[:, None] == partitions[None, :], MASKED)], dim=1)
    return masked_infonce(pos, local_positive_mask(partitions, volumes, self_positive), neg)


def remote_loss(q: torch.Tensor, partitions: torch.Tensor, negatives: BankEntries, temperature: float) -> torch.Tensor:
    """``L_remote`` (global structural matching): positives ``Lambda(q)`` are the members of ``Q'``
    (local and remote banks) from the same partition as ``q``; the denominator still sums over
    all of ``Q'``, exactly as the paper writes it."""
    neg = q @ negatives.vectors.T / temperature
    mask = partitions[:, None] == negatives.partitions[None, :]
    return masked_infonce(neg, mask, neg)
