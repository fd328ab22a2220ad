"""experiments/gain_curves.py on hand-made run_tables folders: the gains it reports are the
differences of the logged held-out Dice, paired by seed, at the steps the configs imply."""

import json
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def curves(experiment):
    return experiment("gain_curves")


def write_run(d: Path, local_steps: int, rows: list[dict], summary: dict | None = None) -> None:
    (d / "logs" / "version_0").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"federation": {"local_steps": local_steps}}))
    keys = sorted({k for r in rows for k in r})
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    (d / "logs" / "version_0" / "metrics.csv").write_text("\n".join(lines) + "\n")
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))


def cell(out: Path, method: str, n: int, seed: int, dice: list[float], finished: bool = True) -> None:
    rows = [{"round": f"{r + 1}.0", "round/val/dice_mean": v} for r, v in enumerate(dice)]
    write_run(
        out / "finetune" / method / f"local_N{n}_fold-_seed{seed}",
        50,
        rows,
        {"test/dice_mean": dice[-1]} if finished else {},
    )


def test_gains_are_paired_by_seed_at_the_configured_steps(curves, tmp_path):
    out = tmp_path / "runs"
    probe = [{"round": f"{r}.0", "round/monitor/probe_acc": 0.3 + 0.05 * r} for r in range(5)]
    write_run(out / "pretrain" / "fcl", 40, probe)
    cell(out, "random", 1, 0, [0.30, 0.40])
    cell(out, "random", 1, 1, [0.20, 0.50])
    cell(out, "fcl", 1, 0, [0.35, 0.42])
    cell(out, "fcl", 1, 1, [0.30, 0.60])
    cell(out, "fcl", 1, 2, [0.90, 0.90])  # no random cell with seed 2: left out of the gain
    cell(out, "fcl@2", 1, 0, [0.31, 0.41])
    cell(out, "random", 2, 0, [0.5, 0.6], finished=False)  # unfinished: ignored
    data = curves.collect([out], "local")
    assert ("random", 2) not in data
    text, points = curves.report(data, "local")
    by = {(p[0], p[1]): p for p in points}
    label, n, steps, probe_at, seeds, fcl, common, rnd = by[("fcl", 1)]
    assert (steps, seeds, common) == (4 * 40, [0, 1, 2], [0, 1]) and probe_at == pytest.approx(0.5)
    assert by[("fcl@2", 1)][2:4] == (2 * 40, pytest.approx(0.4))
    assert fcl[0][0] == [50, 100]
    # gain at the end over the shared seeds: mean(0.42 - 0.40, 0.60 - 0.50) = 0.06
    assert "| fcl | 1 | 160 | 0.50 | 0,1,2 | 0.640 | +0.060 |" in text
    # against fine-tuning steps: (0.05 + 0.10) / 2 after 50 steps, 0.06 after 100
    assert "| gain of fcl | 1 | +0.075 | +0.060 |" in text
    curves.main(["--runs", str(out)])
    assert (out / "gain_curves.md").read_text() == text
    assert (out / "gain_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_random_cells_is_a_clear_error(curves, tmp_path):
    cell(tmp_path, "fcl", 1, 0, [0.3])
    with pytest.raises(SystemExit, match="no random-init cells"):
        curves.main(["--runs", str(tmp_path)])
