"""Where a measurement comes from: the command, the code's commit, the machine, the date and the
data, kept beside the figures (``provenance.json`` in a run folder) and printed above them
wherever they are shown (``experiments/publish_results.py``)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FILE = "provenance.json"


def machine() -> str:
    """CPU model and cores, the accelerator if any, and torch's version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def commit() -> str:
    """The checkout's commit (``+changes`` when the working tree differs from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def record(argv: list[str] | None = None, data: str | None = None) -> dict[str, Any]:
    """This call's provenance: ``argv`` (default: this process's) as a command line."""
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(argv[0], REPO) if os.path.isabs(argv[0]) else argv[0]
    return {
        "command": " ".join(shlex.quote(a) for a in ["python", script, *argv[1:]]),
        "commit": commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "data": data,
    }


def append(out: Path, entry: dict[str, Any]) -> None:
    """Add ``entry`` to ``out/provenance.json`` (a folder filled by several calls keeps them all)."""
    from fcl_lightning.io import atomic_write_text

    calls = read(out)
    atomic_write_text(json.dumps({"calls": [*calls, entry]}, indent=2), Path(out) / FILE)


def read(out: Path) -> list[dict[str, Any]]:
    """The calls recorded in ``out/provenance.json`` (empty when there is none)."""
    path = Path(out) / FILE
    return json.loads(path.read_text())["calls"] if path.is_file() else []


def markdown(calls: list[dict[str, Any]]) -> str:
    """The calls as a short list: command, date, commit, machine, data."""
    lines = []
    for c in calls:
        lines.append(
            f"- `{c['command']}` ({c['date']}, commit `{c['commit']}`; {c['machine']}"
            + (f"; data: {c['data']}" if c.get("data") else "")
            + ")"
            + (f": {c['note']}" if c.get("note") else "")  # added by hand, e.g. where a folder's cells came from
        )
    return "\n".join(lines)


def write_results(
    out: str | Path,
    title: str,
    body: str,
    data: str | None = None,
    earlier: list[dict[str, Any]] = (),
    argv: list[str] | None = None,
) -> Path:
    """A results folder: ``out/results.md`` (``# title`` and ``body``, markdown) and ``earlier``
    (the calls whose output it builds on) and this call as ``out/provenance.json`` (the figures
    replace any earlier ones, and so does their provenance; ``argv``: the call, when it is not this
    process's); what ``publish_results.py`` turns into a docs page."""
    from fcl_lightning.io import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / FILE).unlink(missing_ok=True)
    atomic_write_text(f"# {title}\n\n{body.strip()}\n", out / "results.md")
    for call in earlier:
        append(out, call)
    append(out, record(argv, data=data))
    return out / "results.md"
