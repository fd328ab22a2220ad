"""What travels in Flower messages: weights and exchanged features as ``ArrayRecord``s, client
state as bytes in the node's own ``Context.state`` (never sent to the server)."""

from __future__ import annotations

import io
from typing import Any

import torch
from flwr.app import ArrayRecord

from fcl_lightning.fcl.exchange import check_payload
from fcl_lightning.fcl.memory_bank import BankEntries


def weights_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_to_weights(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def features_to_record(entries: BankEntries) -> ArrayRecord:
    """Exchanged features: L2-normalised vectors plus integer partition and client tags only."""
    check_payload(entries)
    return ArrayRecord(
        {
            "vectors": entries.vectors.detach().cpu().contiguous(),
            "partitions": entries.partitions.cpu().contiguous(),
            "clients": entries.clients.cpu().contiguous(),
        }
    )


def record_to_features(record: ArrayRecord) -> BankEntries:
    d = record.to_torch_state_dict()
    if set(d) != {"vectors", "partitions", "clients"}:
        raise ValueError(f"a features record holds vectors, partitions and clients only, got {sorted(d)}")
    entries = BankEntries(d["vectors"], d["partitions"].long(), d["clients"].long())
    check_payload(entries)
    return entries


def state_to_bytes(state: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def bytes_to_state(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
