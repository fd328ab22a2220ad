"""Loopback smoke run of the Flower deployment: one ``flower-superlink`` and C ``flower-supernode``
processes on 127.0.0.1, ``flwr run flower/`` for R rounds on the phantom, then the same config
through the in-process loop; prints both wall times and whether the global encoders are equal.
With ``--worker`` (the default) each SuperNode gets a long-lived ``fcl_lightning.flower.worker``
(started, like the SuperNodes, before the timed ``flwr run``) and its ClientApps relay to it;
``--no-worker``: every message's ClientApp process computes the reply itself.
Every process it starts is stopped at the end (also on errors). Telemetry is off.

    python experiments/flower_loopback.py --rounds 2 --clients 2 [--no-worker]

``--app floor`` runs ``experiments/flower_floor`` instead: the same messages (one ``query.info``
per node, one ``train`` per node and round, replies of ``--payload-bytes``) with no work, i.e.
what Flower itself costs:

    python experiments/flower_loopback.py --app floor --rounds 2 --clients 2 --payload-bytes 0

``--out DIR`` adds the call's row to a results folder (``rows.json``, ``results.md``, the call in
``provenance.json``; a call with the same settings replaces its row), which
``publish_results.py DIR docs/results/flower.md --title ...`` turns into a page.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(root: Path, rounds: int, clients: int) -> list[str]:
    """The phantom at a size a CPU does in seconds: ``configs/tiny.yaml``, the test suite's tiny runs."""
    return [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        f"--trainer.default_root_dir={root}",
        f"--data.num_clients={clients}",
        "--model.objective.num_negatives=32",
        f"--federation.rounds={rounds}",
    ]


@contextlib.contextmanager
def federation(work: Path, clients: int, worker: bool) -> Iterator[dict]:
    """A SuperLink and ``clients`` SuperNodes on 127.0.0.1 (each with a long-lived worker if
    ``worker``), ready when entered; yields the environment for ``flwr run`` and stops every
    process on exit (also on errors)."""
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_HOME": str(work / "flwr_home"),
        "WANDB_MODE": "disabled",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink starts flower-superexec by name
    }
    link = free_port()  # Flower 1.4x serves the Fleet, Control and ServerApp APIs on one HTTP port
    (work / "flwr_home").mkdir(parents=True, exist_ok=True)
    (work / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, cmd: list[str]) -> None:
        log = open(work / f"{name}.log", "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        )

    try:
        start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host=127.0.0.1",
                f"--port={link}",
                f"--database={work / 'state.db'}",
                "--disable-runtime-dependency-installation",
            ],
        )
        time.sleep(3)
        for c in range(clients):
            node_config = f"partition-id={c}"
            if worker:
                sock = work / f"worker{c}.sock"
                start(f"worker{c}", [sys.executable, "-m", "fcl_lightning.flower.worker", f"--socket={sock}"])
                node_config += f' worker="{sock}"'
            start(
                f"supernode{c}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    f"--superlink=127.0.0.1:{link}",
                    f"--port={free_port()}",
                    f"--node-config={node_config}",
                ],
            )
        deadline = time.monotonic() + 60
        while worker and not all((work / f"worker{c}.sock").is_socket() for c in range(clients)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers did not start (see {work}/worker*.log)")
            time.sleep(0.2)
        time.sleep(3)
        yield env
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()
    left = [p.pid for p in procs if p.poll() is None]
    if left:
        raise RuntimeError(f"processes still running after cleanup: {left}")


def flwr_run(env: dict, app: Path, run_config: dict, done: Path, timeout: float) -> float:
    """``flwr run app`` on the loopback federation; seconds until the server wrote ``done``."""
    rc_arg = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    t0 = time.perf_counter()
    subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "loopback", "--run-config", rc_arg, "--stream"],
        env=env,
        cwd=REPO,
        timeout=timeout,
        check=True,
    )
    deadline = time.monotonic() + timeout
    while not done.is_file():  # the stream may end before the server writes
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Flower run wrote no {done.name}")
        time.sleep(0.5)
    return time.perf_counter() - t0


def run_floor(work: Path, rounds: int, clients: int, payload_bytes: int, timeout: float = 600.0) -> dict:
    """Flower's own cost: ``experiments/flower_floor`` (the project's messages, no work) on the
    same loopback federation, without workers."""
    work.mkdir(parents=True, exist_ok=True)
    done = work / "floor_done.txt"
    with federation(work, clients, worker=False) as env:
        run_config = {"rounds": rounds, "nodes": clients, "payload-bytes": payload_bytes, "done": str(done)}
        flower_s = flwr_run(env, REPO / "experiments" / "flower_floor", run_config, done, timeout)
    per_round = [float(x) for x in done.read_text().split()]
    return {
        "flower_s": flower_s,
        "round_s": per_round,
        "rounds": rounds,
        "clients": clients,
        "payload_bytes": payload_bytes,
    }


def run_loopback(work: Path, rounds: int, clients: int, timeout: float = 600.0, worker: bool = True) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base.yaml"
    base.write_text("seed_everything: 0\n")
    flower_root, inproc_root = work / "flower_run", work / "inprocess_run"
    with federation(work, clients, worker) as env:
        run_config = {
            "config": str(base),
            "overrides": " ".join(map(shlex.quote, tiny_overrides(flower_root, rounds, clients))),
            "wait-s": 60,
        }
        flower_s = flwr_run(env, REPO / "flower", run_config, flower_root / "summary.json", timeout)

    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fcl_lightning.cli",
            "fit",
            "--config",
            str(base),
            *tiny_overrides(inproc_root, rounds, clients),
        ],
        env=env,
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    inproc_s = time.perf_counter() - t0

    import torch

    a = torch.load(flower_root / "encoder.pt", weights_only=True)
    b = torch.load(inproc_root / "encoder.pt", weights_only=True)
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {
        "flower_s": flower_s,
        "in_process_s": inproc_s,
        "bitwise_equal": equal,
        "rounds": rounds,
        "clients": clients,
        "worker": worker,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--work", default=None, help="working folder (default: a temp dir)")
    ap.add_argument("--worker", action=argparse.BooleanOptionalAction, default=True, help="a worker per node")
    ap.add_argument(
        "--app", choices=["fcl", "floor"], default="fcl", help="floor: Flower's own cost (no work, same messages)"
    )
    ap.add_argument("--payload-bytes", type=int, default=0, help="--app floor: bytes of each message and reply")
    ap.add_argument("--out", type=Path, default=None, help="a results folder this call's row is added to")
    args = ap.parse_args(argv)
    work = (Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fcl_flower_"))).resolve()
    if args.app == "floor":
        res = run_floor(work, args.rounds, args.clients, args.payload_bytes)
    else:
        res = run_loopback(work, args.rounds, args.clients, worker=args.worker)
    print(json.dumps(res, indent=2))
    if args.out:
        add_row(args.out, {"app": args.app, **res})


#: the settings that make a row (a later call with the same ones replaces it)
ROW_KEY = ("app", "rounds", "clients", "worker", "payload_bytes")


def add_row(out: Path, res: dict) -> None:
    """Add a call's figures to ``out``: ``rows.json``, the table ``results.md`` over every row, and
    the call in ``provenance.json``."""
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "experiments"))
    import provenance

    from fcl_lightning.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    path = out / "rows.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    key = [res.get(k) for k in ROW_KEY]
    rows = [r for r in rows if [r.get(k) for k in ROW_KEY] != key] + [res]
    atomic_write_text(json.dumps(rows, indent=2), path)
    lines = [
        "| app | clients x rounds | worker per node | Flower wall (s) | in-process wall (s) | encoder bitwise equal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        app = r["app"] + (f", {r['payload_bytes']} B payload" if r["app"] == "floor" else "")
        worker = {True: "yes", False: "no", None: "-"}[r.get("worker")]
        inproc = f"{r['in_process_s']:.1f}" if "in_process_s" in r else "-"
        equal = {True: "yes", False: "**no**", None: "-"}[r.get("bitwise_equal")]
        lines.append(
            f"| {app} | {r['clients']} x {r['rounds']} | {worker} | {r['flower_s']:.1f} | {inproc} | {equal} |"
        )
    note = (
        "The loopback deployment (one SuperLink, one SuperNode per client on 127.0.0.1) against the "
        "in-process loop on the same config; `floor`: the same messages with no work, what Flower itself costs."
    )
    atomic_write_text("# Flower on one machine\n\n" + note + "\n\n" + "\n".join(lines) + "\n", out / "results.md")
    provenance.append(out, provenance.record(data="the built-in phantom"))


if __name__ == "__main__":
    main()
