"""The docs' commands as a newcomer types them: every ``fcl-lightning`` command in ``docs/*.md``
parses; the pages run as written, from an empty folder (slow): the own-data guide, the pages in
reading order, the tracking page offline and the Flower simulation. The Flower page's
process blocks run in tests/flower/test_readme_flower.py (opt-in)."""

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

from fcl_lightning.cli import main

DOCS = sorted((REPO / "docs").glob("*.md"))


def commands(page: Path) -> list[list[str]]:
    """The command lines of a page's ``bash`` blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [
        shlex.split(line, comments=True)
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


CLI_COMMANDS = [(p.name, c) for p in DOCS for c in commands(p) if c[0] == "fcl-lightning"]


def test_the_docs_have_commands():
    assert DOCS and any(name == "own-data.md" for name, _ in CLI_COMMANDS)


@pytest.mark.parametrize("page,argv", CLI_COMMANDS, ids=[f"{n}:{' '.join(c[1:3])}" for n, c in CLI_COMMANDS])
def test_docs_command_parses(page, argv, tmp_path, monkeypatch, capsys):
    """``--print_config`` parses and validates the whole command without running it, from a
    folder that is not the repository (the shipped configs are found as a wheel install finds them)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([*argv[1:], "--print_config"])
    assert exc.value.code in (0, None)
    assert "federation:" in capsys.readouterr().out


def run(line: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    bin_ = Path(sys.executable).parent
    exe = {name: [str(bin_ / name)] for name in ("fcl-lightning", "fcl-lightning-sweep")} | {"python": [sys.executable]}
    proc = subprocess.run(
        [*exe[line[0]], *line[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"{' '.join(line)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_own_data_guide_runs_as_written(tmp_path):
    """Every command of docs/own-data.md, in order, in an empty folder: the consortium, pre-training,
    semi-supervised fine-tuning, test and predict; what the guide says they print is there."""
    out = "".join(run(c, tmp_path) for c in commands(REPO / "docs/own-data.md"))
    guide = (REPO / "docs/own-data.md").read_text()
    for line in re.findall(r"^(  client 0: .*)$", guide, flags=re.M):  # the data: lines the guide shows
        assert line in out, line
    rows = list(csv.DictReader((tmp_path / "runs/consortium_finetune/test_per_patient.csv").open()))
    assert len(rows) == 6 and all(r["patient"].split("/")[1] in ("patient005", "patient006") for r in rows)
    pred = tmp_path / "runs/consortium_predictions"
    assert len(list(pred.glob("*_seg.nii.gz"))) == 12 and (pred / "indices.csv").is_file()


@pytest.mark.slow
def test_the_demo_prints_what_getting_started_says(tmp_path):
    """``fcl-lightning fit --config configs/demo.yaml`` from an empty folder (what ``make demo`` runs
    after the set-up): the result lines the getting-started page quotes are what it prints."""
    out = run(["fcl-lightning", "fit", "--config", "configs/demo.yaml"], tmp_path)
    page = (REPO / "docs/getting-started.md").read_text()
    quoted = re.search(r"it printed:\n\n```text\n(.*?)```", page, flags=re.S).group(1).splitlines()
    assert len(quoted) == 3
    printed = [" ".join(ln.split()) for ln in out.splitlines()]
    for line in quoted:
        assert " ".join(line.split()) in printed, line


#: the pages a newcomer reads in this order, every command run in one folder, as typed, with
#: the ACDC paths pointing at a phantom in ACDC's layout and the ACDC configs shrunk (SHRINK)
READING_ORDER = ["getting-started.md", "semi-supervised.md", "predict.md", "privacy.md", "run-folder.md"]
#: commands no test runs here, by their first words, and why
NOT_RUN = {
    ("make",): "make demo is test_the_demo_prints_what_getting_started_says; make test is this suite",
    ("python", "experiments/"): "an experiment (hours); its own tests run it small (tests/experiments/test_tables.py)",
}
#: appended to a command that names the config (after the user's arguments): the ACDC configs at
#: the phantom's scale (its 8 patients, not ACDC's 100), one encoder for pre-training and fine-tuning
SHRINK = {
    "configs/acdc/fcl_pretrain.yaml": [
        "--model.features=[8,16,16,16]", "--model.proj_hidden=32", "--model.proj_dim=16",
        "--data.img_size=32", "--data.spacing=4.0", "--data.num_clients=2", "--data.source.patients=1-8",
        "--federation.rounds=2", "--federation.local_steps=2", "--trainer.accelerator=cpu",
    ],
    "configs/acdc/finetune.yaml": [
        "--model.features=[8,16,16,16]", "--data.img_size=32", "--data.spacing=4.0", "--data.num_clients=2",
        "--data.source.patients=1-8", "--data.cv_folds=2", "--federation.rounds=1", "--federation.local_steps=2", "--trainer.accelerator=cpu",
    ],
}  # fmt: skip
ACDC_PATHS = ("/path/to/ACDC/training", "/path/to/ACDC/testing", "$ACDC")


def as_run_here(line: list[str], acdc: Path) -> list[str] | None:
    """``line`` as this test runs it (``None``: in NOT_RUN): the phantom for the ACDC paths, the
    ACDC configs shrunk."""
    joined = " ".join(line)
    if any(joined.startswith(" ".join(words)) for words in NOT_RUN):
        return None
    out = [str(acdc) if a in ACDC_PATHS else a for a in line]
    for config, extra in SHRINK.items():
        if config in out and out[0] == "fcl-lightning" and out[1] in ("fit", "test", "predict"):
            out += extra if out[1] == "fit" else [a for a in extra if not a.startswith("--federation.")]
    return out


@pytest.mark.slow
def test_the_pages_run_as_a_newcomer_reads_them(tmp_path):
    """Every command of the pages in READING_ORDER, in order, from one empty folder (the state one
    page leaves is what the next page's commands find, as for a reader); a renamed option, a path
    that an earlier page's run occupies, or a missing file fails here, not for the reader."""
    from fcl_lightning.data.phantom import PhantomSource, write_acdc_layout

    acdc = write_acdc_layout(PhantomSource(num_subjects=8, size=64, num_sites=2), str(tmp_path / "acdc"))
    ran = 0
    for page in READING_ORDER:
        for line in commands(REPO / "docs" / page):
            argv = as_run_here(line, acdc)
            if argv is not None:
                run(argv, tmp_path)
                ran += 1
    assert ran >= 12


def block_after(page: str, heading: str) -> list[list[str]]:
    """The command lines of the first ``bash`` block after ``heading`` on ``page``."""
    text = (REPO / "docs" / page).read_text()
    block = re.compile(r"^```bash\n(.*?)^```", re.S | re.M).search(text, text.index(heading)).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(ln, comments=True) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_the_worker_block_is_the_loopback_blocks_own_lines():
    """docs/flower.md's "A worker per site" block is run as part of the loopback block
    (tests/flower/test_readme_flower.py): every line of it is there, word for word."""
    loopback = block_after("flower.md", "**One machine, several processes**")
    worker = block_after("flower.md", "**A worker per site**")
    assert worker and all(line in loopback for line in worker)


@pytest.mark.slow
def test_the_tracking_page_runs_offline(tmp_path):
    """docs/tracking.md from an empty folder, without a wandb server: the wandb-logged demo run
    offline (the page's offline row), where the page's ``wandb sync`` path says its files are, and
    the air-gapped sweep with one trial instead of 8, which leaves the files the page lists.
    Not run: ``wandb sweep`` / ``wandb agent`` (a wandb server)."""
    lines = commands(REPO / "docs/tracking.md")
    assert [ln[:2] for ln in lines] == [
        ["fcl-lightning", "fit"], ["wandb", "sweep"], ["wandb", "agent"], ["fcl-lightning-sweep", "configs/sweeps/fcl_pretrain.yaml"]
    ]  # fmt: skip
    run(lines[0], tmp_path, env={"WANDB_MODE": "offline"})
    assert list((tmp_path / "runs/demo/wandb").glob("offline-run-*"))  # `wandb sync runs/demo/wandb/offline-run-*`
    sweep = lines[3]
    sweep[sweep.index("--count") + 1] = "1"  # one demo pre-training, not 8
    run(sweep, tmp_path)
    out = tmp_path / "runs/sweeps/fcl_pretrain"
    for name in ("results.csv", "results.md", "best.json", "best_config.yaml"):
        assert (out / name).is_file(), name
    assert list(csv.DictReader((out / "results.csv").open()))[0]["status"] == "finished"


@pytest.mark.slow
def test_the_simulation_block_runs_as_written(tmp_path):
    """docs/flower.md's "Many sites on one machine" command from an empty folder: 100 simulated
    phantom sites, 10 a round for 3 rounds, the clients' states on disk under --state-root."""
    (line,) = block_after("flower.md", "**Many sites on one machine**")
    run(line, tmp_path)
    root = tmp_path / "runs/sim100"
    assert (root / "encoder.pt").is_file() and (root / "summary.json").is_file()
    sampled = {p.parent.name for p in (root / "states").rglob("state-*.pt")}
    assert 10 <= len(sampled) <= 30 and all(c.startswith("client") for c in sampled)  # 10 a round, 3 rounds
