"""Read the records of an offline wandb run file (``run-<id>.wandb``) for the tracking tests.

wandb 0.3x has no Python reader for its own log (its core is written in Go), so this reads the
format by hand: a 7-byte header, then LevelDB-log style 32 KiB blocks of chunks (crc32 u32,
length u16, type u8; 1 full, 2 first, 3 middle, 4 last) whose payloads are ``Record`` protobufs.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def records(path: str | Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, typ = struct.unpack("<IHB", data[pos : pos + 7])
        if typ == 0 and n == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if typ in (1, 2) else buf + chunk
        if typ in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def run_info(path: str | Path) -> dict:
    """The run id, the history rows (key -> JSON value) and the config keys of one run file."""
    info = {"id": None, "history": [], "config": set(), "summary": {}}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info["id"] = rec.run.run_id
        elif kind == "history":
            info["history"].append({_key(it): it.value_json for it in rec.history.item})
        elif kind == "config":
            info["config"] |= {_key(it) for it in rec.config.update}
        elif kind == "summary":
            info["summary"].update({_key(it): it.value_json for it in rec.summary.update})
    return info
