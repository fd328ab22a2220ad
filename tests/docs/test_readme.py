"""The README's commands as a newcomer types them: every config it names exists and parses."""

import re
import shlex

import pytest
from support import REPO

from fcl_lightning.cli import main

README = (REPO / "README.md").read_text()


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip().startswith("fcl-lightning ")]


def test_readme_has_the_two_newcomer_commands():
    assert "make demo" in README and "make test" in README
    make = (REPO / "Makefile").read_text()
    assert "fcl-lightning fit --config configs/demo.yaml" in make and "python -m pytest -q" in make
    assert "fcl-lightning fit --config configs/demo.yaml" in README  # the same by hand
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci  # CI runs the README's test command
    assert "mkdocs build --strict" in make  # which builds the docs site, failing on a broken link


def docs_commands() -> set[tuple[str, ...]]:
    """The commands docs/*.md also give (tests/test_docs.py parses those)."""
    out = set()
    for page in (REPO / "docs").glob("*.md"):
        text = "\n".join(re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)).replace("\\\n", " ")
        out |= {
            tuple(shlex.split(ln, comments=True)) for ln in text.splitlines() if ln.strip().startswith("fcl-lightning ")
        }
    return out


@pytest.mark.parametrize(
    "argv", [c for c in readme_commands() if tuple(c) not in docs_commands()], ids=lambda a: " ".join(a[1:4])
)
def test_readme_command_parses(argv, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    args = [a for a in argv[1:]]
    args = [a for i, a in enumerate(args) if a != "--print_config"]
    # --print_config parses and validates the whole config without running anything
    with pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    assert exc.value.code in (0, None)
    assert "federation:" in capsys.readouterr().out


def test_readme_sweep_files_exist_and_validate():
    from fcl_lightning.sweep import load_sweep

    docs = README + "".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    named = set(re.findall(r"configs/sweeps/[\w.]+\.yaml", docs))
    assert named, "neither the README nor the docs name a sweep file"
    for rel in named:
        load_sweep(REPO / rel)
    assert "fcl-lightning-sweep configs/sweeps/fcl_pretrain.yaml --count 8" in docs


def test_shipped_configs_run_from_another_folder(tmp_path, monkeypatch, capsys):
    """A wheel install has no configs/ folder: `--config configs/...` then names the copy shipped in
    the package (the repository's configs/); a file of that name in the working folder wins."""
    from fcl_lightning.cli import PACKAGED_CONFIGS, main, packaged_config

    monkeypatch.chdir(tmp_path)
    assert packaged_config("configs/demo.yaml") == str(PACKAGED_CONFIGS / "demo.yaml")
    assert (PACKAGED_CONFIGS / "methods" / "fcl_dense.yaml").is_file()
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/demo.yaml", "--config=configs/methods/fcl_dense.yaml", "--print_config"])
    printed = capsys.readouterr().out
    assert "DenseFCLObjective" in printed and "PhantomSource" in printed
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("seed_everything: 3\n")
    assert packaged_config("configs/demo.yaml") == "configs/demo.yaml"
    assert packaged_config("configs/missing.yaml") == "configs/missing.yaml"
