"""The docs' "One machine, several processes" block (docs/flower.md), run as written (opt-in: it starts a
SuperLink, two workers and two SuperNodes on the README's fixed ports and socket paths, and
trains for a few minutes).

The commands are read from docs/flower.md, not copied here. They run in one ``bash`` from the
repository root with ``HOME`` a temporary folder, so the block's ``~/.flwr/config.toml`` (and the
apps Flower installs under ``~/.flwr``) land there, never in the user's home. The one change made
to the text: the run config's ``--trainer.default_root_dir=runs/flower-loopback`` points at the
temporary folder instead, so nothing is written into the repository. The background processes
share the ``bash``'s process group; that group and every process it spawned are stopped at the
end (also on failures) and the workers' sockets removed. Then the same config and overrides go
through ``fcl-lightning fit`` and the two ``encoder.pt`` must be bitwise equal (both runs use
torch's default thread count, as a user's would).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO

BIN = Path(sys.executable).parent
README_ROOT = "runs/flower-loopback"  # the README's --trainer.default_root_dir
TIMEOUT_S = 450  # per phase; the block took 200-300 s on a busy 2-core CPU

pytestmark = pytest.mark.skipif(
    os.environ.get("FCL_FLOWER_LOOPBACK") != "1", reason="set FCL_FLOWER_LOOPBACK=1 (starts Flower processes)"
)


def readme_loopback_block() -> str:
    """The ```bash block after the README's "One machine, several processes" paragraph."""
    text = (REPO / "docs" / "flower.md").read_text()
    start = text.index("**One machine, several processes**")
    m = re.compile(r"^```bash\n(.*?)^```", re.S | re.M).search(text, start)
    assert m, "no ```bash block after 'One machine, several processes'"
    return m.group(1)


def flwr_run_config(block: str) -> dict:
    """The ``--run-config`` of the block's ``flwr run`` line, parsed as Flower parses it."""
    from flwr.common.config import parse_config_args

    (line,) = [ln for ln in block.splitlines() if ln.startswith("flwr run ")]
    args = shlex.split(line)
    return parse_config_args([args[args.index("--run-config") + 1]])


def ports(block: str) -> set[int]:
    return {int(p) for p in re.findall(r"--port (\d+)", block)}


def sockets(block: str) -> list[Path]:
    """The workers' socket paths."""
    return [Path(s) for s in re.findall(r"--socket (\S+)", block)]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _procs() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every process on the machine."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        out[int(d.name)] = (int(fields[1]), int(fields[2]))
    return out


def _started_by(pgid: int) -> set[int]:
    """The processes of process group ``pgid`` and all their descendants (Flower starts some of
    its helpers, e.g. the SuperLink's SuperExec, in process groups of their own)."""
    procs = _procs()
    found = {pid for pid, (_, g) in procs.items() if g == pgid}
    grew = True
    while grew:
        more = {pid for pid, (pp, _) in procs.items() if pp in found} - found
        found |= more
        grew = bool(more)
    return found


def _stop(pgid: int) -> set[int]:
    """SIGTERM the group and its descendants, SIGKILL what is left after 15 s; the pids alive after."""
    pids = _started_by(pgid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with_kids = pids | _started_by(pgid)
        for pid in with_kids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            alive = {pid for pid in with_kids if _alive(pid)}
            if not alive:
                return set()
            time.sleep(0.2)
        pids = alive
    return {pid for pid in pids if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"  # a zombie is done, only not reaped yet


def test_readme_loopback_block_runs_as_written_and_matches_in_process(tmp_path):
    block = readme_loopback_block()
    assert "flower-superlink" in block and "flower-supernode" in block and "flwr run flower/" in block
    rc = flwr_run_config(block)
    assert f"--trainer.default_root_dir={README_ROOT}" in rc["overrides"], "the README names where results go"
    busy = sorted(p for p in ports(block) if not port_free(p))
    if busy:
        pytest.fail(f"the README's ports {busy} are in use on 127.0.0.1: stop what holds them")
    socks = sockets(block)
    if taken := [str(s) for s in socks if s.exists()]:  # a worker would take over a running worker's path
        pytest.fail(f"the README's worker sockets {taken} exist: stop their workers or remove them")

    flower_root, inproc_root = tmp_path / "flower-loopback", tmp_path / "inprocess"
    script = block.replace(f"--trainer.default_root_dir={README_ROOT}", f"--trainer.default_root_dir={flower_root}")
    assert script.count(str(flower_root)) == 1
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "FLWR_HOME"}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    log_path = tmp_path / "readme_block.log"

    def tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])

    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        bash = subprocess.Popen(
            ["bash", "-c", script], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        try:
            bash_rc = bash.wait(TIMEOUT_S)  # returns when `flwr run --stream` does
        except subprocess.TimeoutExpired:
            pytest.fail(f"`flwr run` did not return within {TIMEOUT_S} s:\n{tail()}")
        assert bash_rc == 0, f"the README block exited with {bash_rc}:\n{tail()}"
        assert (home / ".flwr" / "config.toml").is_file()
        done = [flower_root / "encoder.pt", flower_root / "summary.json"]
        deadline = t0 + TIMEOUT_S
        while not all(p.is_file() for p in done):  # the stream may end before the server writes
            if "ServerApp raised an exception" in log_path.read_text(errors="replace"):
                pytest.fail(f"the ServerApp failed:\n{tail()}")
            if time.perf_counter() > deadline:
                pytest.fail(f"no {flower_root}/encoder.pt and summary.json after {TIMEOUT_S} s:\n{tail()}")
            time.sleep(0.5)
        time.sleep(1)  # summary.json is written last; let the server finish its files
        flower_s = time.perf_counter() - t0
    finally:
        left = _stop(bash.pid)
        try:
            bash.wait(5)  # reaped already, unless it timed out
        except subprocess.TimeoutExpired:
            left.add(bash.pid)
        for s in socks:  # a stopped worker leaves its socket file
            s.unlink(missing_ok=True)
        assert not left, f"processes still running after cleanup: {sorted(left)}"

    t1 = time.perf_counter()
    overrides = [*shlex.split(rc["overrides"]), f"--trainer.default_root_dir={inproc_root}"]
    subprocess.run(
        ["fcl-lightning", "fit", "--config", rc["config"], *overrides],
        cwd=REPO,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=TIMEOUT_S,
    )
    inproc_s = time.perf_counter() - t1
    print(f"README Flower block: {flower_s:.1f} s; in-process fit: {inproc_s:.1f} s")

    import torch

    a = torch.load(flower_root / "encoder.pt", weights_only=True)
    b = torch.load(inproc_root / "encoder.pt", weights_only=True)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"the Flower run's encoder differs from the in-process one in {differ}"


#: what the "Several machines" blocks need changed to run on one machine, and why
MACHINES = {
    "server.example.org": "127.0.0.1",  # the server's address: this machine (its certificate names it)
    "/data/fcl/site0": None,  # the hospital's data folder: a phantom site in ACDC's layout (set below)
    "/var/lib/fcl": None,  # the hospital's state folder (set below)
    "num-clients=10": "num-clients=1",  # one hospital here
}
#: appended to the run's overrides: the ACDC pre-training config at the phantom site's scale
SMALL = (
    "--model.features=[8,16,16,16] --model.proj_hidden=32 --model.proj_dim=16 --data.img_size=32 "
    "--data.spacing=4.0 --data.num_clients=1 --federation.rounds=2 --federation.local_steps=2 --trainer.accelerator=cpu"
)


def tls_files(folder: Path) -> dict[str, Path]:
    """A CA and the server's certificate for 127.0.0.1 and localhost (``cryptography``, which Flower
    brings): ca.crt, server.pem, server.key, as the docs name them."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
        .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(2).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=False).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    out = {"ca.crt": folder / "ca.crt", "server.pem": folder / "server.pem", "server.key": folder / "server.key"}
    out["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["server.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = serialization.PrivateFormat.TraditionalOpenSSL
    out["server.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, pem, serialization.NoEncryption()))
    return out


def machines_blocks() -> list[str]:
    """The ``bash`` blocks of docs/flower.md's "Several machines" part: server, hospital, launch."""
    text = (REPO / "docs" / "flower.md").read_text()
    start = text.index("**Several machines.**")
    return re.findall(r"^```bash\n(.*?)^```", text[start:], re.S | re.M)[:3]


def test_the_several_machines_blocks_run_with_tls_on_one_machine(tmp_path):
    """docs/flower.md's "Several machines" blocks, with TLS, on loopback: the SuperLink with the
    certificates, one hospital (worker and SuperNode with its data-root and state-dir), the
    ``[superlink.hospitals]`` section the page describes, and ``flwr run flower/ hospitals``;
    changed only as MACHINES says, the run made small (SMALL) and written into tmp_path."""
    server, hospital, launch = machines_blocks()
    assert "flower-superlink --ssl-ca-certfile" in server and "flower-supernode --root-certificates" in hospital
    assert launch.startswith("flwr run flower/ hospitals")
    from fcl_lightning.data.phantom import PhantomSource, write_acdc_layout

    site = write_acdc_layout(PhantomSource(num_subjects=4, size=64, num_sites=1), str(tmp_path / "site0"))
    state = tmp_path / "state"
    state.mkdir()
    certs = tls_files(tmp_path)
    subs = {**MACHINES, "/data/fcl/site0": str(site), "/var/lib/fcl": str(state)}
    if not port_free(9091):
        pytest.fail("port 9091 (the page's SuperLink port) is in use on 127.0.0.1")

    def as_here(block: str) -> str:
        for a, b in subs.items():
            block = block.replace(a, b)
        for name, path in certs.items():  # the page runs where the certificates are
            block = re.sub(rf"(?<![\w/.-]){re.escape(name)}(?![\w.-])", str(path), block)
        return block

    out_root = tmp_path / "server_run"
    run_line = as_here(launch).replace(
        'overrides="--federation.round_timeout=3600"',
        f'overrides="--federation.round_timeout=3600 {SMALL} --trainer.default_root_dir={out_root}"',
    )
    assert str(out_root) in run_line
    home = tmp_path / "home"
    (home / ".flwr").mkdir(parents=True)
    (home / ".flwr" / "config.toml").write_text(  # the section the page describes in prose
        f'[superlink]\ndefault = "hospitals"\n\n[superlink.hospitals]\naddress = "127.0.0.1:9091"\n'
        f'root-certificates = "{certs["ca.crt"]}"\n'
    )
    background = "\n".join(
        ln if ln.rstrip().endswith(("&", "\\")) or not ln.strip() else ln + " &"
        for ln in (as_here(server) + as_here(hospital)).splitlines()
    )
    sock = state / "worker.sock"
    script = (
        f"export FLWR_TELEMETRY_ENABLED=0\n{background}\n"
        f"until flwr ls hospitals >/dev/null 2>&1 && [ -S {sock} ]; do sleep 1; done\n{run_line}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FLWR_HOME"}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    log_path = tmp_path / "machines.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        bash = subprocess.Popen(
            ["bash", "-c", script], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    tail = lambda: "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])  # noqa: E731
    try:
        try:
            assert bash.wait(TIMEOUT_S) == 0, f"the blocks exited with an error:\n{tail()}"
        except subprocess.TimeoutExpired:
            pytest.fail(f"`flwr run` did not return within {TIMEOUT_S} s:\n{tail()}")
        while not (out_root / "summary.json").is_file():
            if time.perf_counter() - t0 > TIMEOUT_S or "ServerApp raised an exception" in log_path.read_text():
                pytest.fail(f"no {out_root}/summary.json:\n{tail()}")
            time.sleep(0.5)
    finally:
        left = _stop(bash.pid)
        sock.unlink(missing_ok=True)
        assert not left, f"processes still running after cleanup: {sorted(left)}"
    assert (out_root / "encoder.pt").is_file()
    assert list(state.rglob("state-*.pt")), "the hospital keeps its client state in its state-dir"
