"""The gain of pre-training over random init as curves, from finished `run_tables.py` outputs.

Issue 12 asks, where the gain stays small, for the gain against pre-training steps and against
fine-tuning steps at each N, with the partition probe alongside. Every figure here is read from
cells that `run_tables.py` already ran (nothing is trained): a fine-tuning cell logs the held-out
Dice (mean over its clients) after every round, so one cell gives the whole fine-tuning curve; a
pre-training's ``metrics.csv`` gives the probe per round, and a ``METHOD@R`` cell (fine-tuned
from round R) gives one more point of the pre-training curve.

    python experiments/gain_curves.py --runs runs/acdc-cpu runs/acdc-cpu-fcl --setting local

writes ``gain_curves.md`` and ``gain_curves.png`` into the first ``--runs`` folder (or ``--out``).
Only cells whose fine-tuning measures held-out patients are meaningful (the ``acdc-cpu`` profile:
its validation patients are held out of pre-training and fine-tuning and are the scored ones).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the repository's package
from fcl_lightning.io import atomic_write_text  # noqa: E402 (after the path it comes from)

CELL = re.compile(r"(?P<setting>local|federated)_N(?P<n>\d+)_fold(?P<fold>[^_]+)_seed(?P<seed>\d+)$")


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def metrics_csv(run: Path) -> Path:
    """The ``logs/version_N/metrics.csv`` of a run folder that reaches the furthest round (a
    resumed run continues its version; another run pointed at the folder's logs starts a new one)."""
    found = list(run.glob("logs/version_*/metrics.csv"))
    if not found:
        raise SystemExit(f"{run}: no logs/version_*/metrics.csv (not a finished run)")
    return max(found, key=lambda p: max((float(r["round"]) for r in read_rows(p) if r.get("round")), default=-1))


def config_value(run: Path, *keys: str):
    node = yaml.safe_load((run / "config.yaml").read_text())
    for k in keys:
        node = node[k]
    return node


def finished(cell: Path) -> bool:
    """A fine-tuning cell that ran to its test (as ``run_tables.py`` counts it done)."""
    s = cell / "summary.json"
    return s.is_file() and "test/dice_mean" in json.loads(s.read_text())


def finetune_curve(cell: Path) -> tuple[list[int], list[float]]:
    """(steps after each round, held-out Dice mean over clients after it) of one fine-tuning cell."""
    steps = int(config_value(cell, "federation", "local_steps"))
    rows = [r for r in read_rows(metrics_csv(cell)) if r.get("round/val/dice_mean")]
    return [int(float(r["round"])) * steps for r in rows], [float(r["round/val/dice_mean"]) for r in rows]


def pretrain_point(runs: Path, method: str) -> tuple[int, float | None]:
    """Pre-training steps per client behind ``method`` (``random``: 0) and the probe there."""
    if method == "random":
        return 0, None
    base, _, rnd = method.partition("@")
    pre = runs / "pretrain" / base
    rows = read_rows(metrics_csv(pre))
    rows = [r for r in rows if r.get("round")]
    rounds = int(rnd) if rnd else max(int(float(r["round"])) for r in rows)
    probe = [
        float(r["round/monitor/probe_acc"])
        for r in rows
        if int(float(r["round"])) == rounds and r.get("round/monitor/probe_acc")
    ]
    return rounds * int(config_value(pre, "federation", "local_steps")), (probe[-1] if probe else None)


def collect(folders: list[Path], setting: str) -> dict[tuple[str, int], dict[int, tuple[list[int], list[float]]]]:
    """{(label, N): {seed: curve}}; a label is ``method`` or ``method@R``, prefixed by the
    folder name where two folders hold the same method."""
    names = defaultdict(list)
    for runs in folders:
        for m in (runs / "finetune").iterdir() if (runs / "finetune").is_dir() else ():
            names[m.name].append(runs)
    out: dict = defaultdict(dict)
    for method, where in sorted(names.items()):
        for runs in where:
            label = method if (len(where) == 1 or method == "random") else f"{runs.name}:{method}"
            for cell in sorted((runs / "finetune" / method).iterdir()):
                m = CELL.match(cell.name)
                if not m or m["setting"] != setting or not finished(cell):
                    continue
                key, seed = (label, int(m["n"])), int(m["seed"])
                if seed in out[key]:
                    continue  # random init cells repeated in several folders are the same run
                out[key][seed] = finetune_curve(cell)
                out[key].setdefault("runs", runs)
    return out


def mean_last(curves: dict, seeds: list[int]) -> float:
    return float(np.mean([curves[s][1][-1] for s in seeds]))


def report(data: dict, setting: str) -> tuple[str, list[tuple]]:
    """The markdown tables and the points of the figure."""
    lines = [f"## Gain over random init, {setting} fine-tuning (held-out Dice, mean over clients)", ""]
    lines += [
        "| init | N | pre-training steps / client | probe | seeds | Dice | gain (same seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    points = []
    for (label, n), curves in sorted(data.items(), key=lambda kv: (kv[0][1], kv[0][0] != "random", kv[0][0])):
        seeds = sorted(s for s in curves if s != "runs")
        rnd = data.get(("random", n), {})
        common = [s for s in seeds if s in rnd]
        method = label.split(":")[-1]
        steps, probe = pretrain_point(curves["runs"], method)
        dice = mean_last(curves, seeds)
        gain = mean_last(curves, common) - mean_last(rnd, common) if common and label != "random" else None
        lines.append(
            f"| {label} | {n} | {steps} | {'-' if probe is None else f'{probe:.2f}'} | {','.join(map(str, seeds))} | "
            f"{dice:.3f} | {'-' if gain is None else f'{gain:+.3f}'} |"
        )
        points.append((label, n, steps, probe, seeds, curves, common, rnd))
    lines += ["", "### Gain against fine-tuning steps (seeds shared with random init)", ""]
    for label, n, _, _, _, curves, common, rnd in points:
        if label == "random" or not common:
            continue
        x = curves[common[0]][0]
        g = np.mean([np.array(curves[s][1]) - np.array(rnd[s][1]) for s in common], axis=0)
        r = np.mean([rnd[s][1] for s in common], axis=0)
        if not lines[-1].startswith("|"):
            lines += ["| init | N | " + " | ".join(f"{s} steps" for s in x) + " |", "|---|---|" + "---|" * len(x)]
        lines.append(f"| random init | {n} | " + " | ".join(f"{v:.3f}" for v in r) + " |")
        lines.append(f"| gain of {label} | {n} | " + " | ".join(f"{v:+.3f}" for v in g) + " |")
    return "\n".join(lines) + "\n", points


def figure(points: list[tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, n, steps, probe, _, curves, common, rnd in points:
        if label == "random" or not common:
            continue
        g = [np.array(curves[s][1]) - np.array(rnd[s][1]) for s in common]
        b.plot(curves[common[0]][0], np.mean(g, axis=0), marker="o", label=f"{label}, N={n}")
        a.scatter(
            steps, np.mean([x[-1] for x in g]), label=f"{label}, N={n}" + (f" (probe {probe:.2f})" if probe else "")
        )
    for ax, xl in ((a, "pre-training steps per client"), (b, "fine-tuning steps")):
        ax.axhline(0.05, ls="--", c="grey", lw=0.8)
        ax.axhline(0.0, c="k", lw=0.6)
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out Dice gain over random init")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="run_tables.py --out folders")
    p.add_argument("--setting", default="local", choices=["local", "federated"])
    p.add_argument("--out", type=Path, default=None, help="where gain_curves.md/.png go (default: first --runs)")
    a = p.parse_args(argv)
    data = collect(a.runs, a.setting)
    if not any(k[0] == "random" for k in data):
        raise SystemExit("no random-init cells found: the gain needs them (run_tables.py --methods random)")
    text, points = report(data, a.setting)
    out = a.out or a.runs[0]
    atomic_write_text(text, out / "gain_curves.md")
    figure(points, out / "gain_curves.png")
    print(text)
    print(f"wrote {out / 'gain_curves.md'} and {out / 'gain_curves.png'}")


if __name__ == "__main__":
    main()
