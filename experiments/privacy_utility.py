"""The privacy-utility table and figure of issue 25 (experiments/README.md): for FCL without DP,
FCL with DP feature exchange at each epsilon and FCLOpt, beside each other,

- utility: held-out Dice at each N (mean +- std over clients), the paired gain against FCL without
  DP and against random init over (client, seed) pairs with its 95% bootstrap interval, and the
  pre-training's last k-NN partition probe;
- what a client sends: weights and feature bytes per client-round, epsilon spent;
- risk: the attacks of ``privacy_attacks.py`` (re-identification, site attribution, membership)
  at the same settings.

It reads what other commands wrote and runs nothing:

    python experiments/run_tables.py --profile acdc-cpu --root $ACDC --out runs/i25 \\
        --methods random,fcl,fcl_dp8,fcl_dp2,fcl_dp1,fclopt --ns 1,2 --seeds 0,1,2
    python experiments/privacy_attacks.py --run runs/i25/pretrain/fcl --root $ACDC \\
        --cache runs/i25/cache --epsilons 8,2,1 --out runs/i25/attacks.json
    python experiments/privacy_utility.py --tables runs/i25 --attacks runs/i25/attacks.json
    python experiments/publish_results.py runs/i25/privacy_utility docs/results/privacy-utility.md \\
        --title "Privacy and utility"
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "experiments"))

import provenance  # noqa: E402
from run_tables import NO_PRETRAIN, label, paired, read_rounds, table  # noqa: E402

from fcl_lightning.evaluation import paired_gain  # noqa: E402

#: method -> the attack row (``privacy_attacks.py``'s ``setting``) that measures what it sends
ARMS = {
    NO_PRETRAIN: None,  # the baseline: no pre-training, nothing sent
    "fcl": "no DP",
    "fcl_dp8": "epsilon 8",
    "fcl_dp2": "epsilon 2",
    "fcl_dp1": "epsilon 1",
    "fcl_dp8w": "epsilon 8",  # the same vectors; the weights noised too
    "fclopt": None,  # sends no vectors: nothing for these attacks to read
}
NOTHING = {NO_PRETRAIN: "nothing sent", "fclopt": "no vectors sent"}
#: what the table's columns are, printed under it
LEGEND = """\
Dice: held-out Dice of local fine-tuning from each arm's encoder (the last model), mean +- std over
clients after averaging seeds. "vs FCL" and "vs random": the paired difference over (client, seed)
pairs with its 95% bootstrap interval and the pairs in its favour; one whose interval holds 0 is
"not shown". Probe: the pre-training's last k-NN partition probe. Epsilon: what the run spent by
its last round (delta per patient as configured). The attacks (`privacy_attacks.py`) are run by a
receiving client that also holds the global model, on every round's vectors pooled: re-identifying
a patient's ED vector among ES vectors (top-1, top-5), naming the sending site by a 10-NN vote,
and telling the sender's training patients from its held-out ones (membership AUC); chance in
brackets."""


def read_rows(path: Path) -> list[dict]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["N"], r["dice_mean"] = int(r["N"]), float(r["dice_mean"])
    return rows


def last(values: dict[int, float]) -> float:
    return values[max(values)] if values else math.nan


def sent_per_round(pre: Path) -> dict[str, float]:
    """Mean over rounds of what one client sent: weights and feature bytes; the last epsilon."""
    up = read_rounds(pre, "round/comm/weights_up_bytes")
    feats = read_rounds(pre, "round/comm/features_up_bytes")
    clients = read_rounds(pre, "round/clients")
    rounds = max(1, len(up))
    return {
        "weights_mib": sum(up[r] / clients[r] for r in up) / rounds / 2**20,
        "features_kib": sum(feats.get(r, 0) / clients[r] for r in up) / rounds / 2**10,
        "epsilon": last(read_rounds(pre, "round/privacy/epsilon")),
        "probe": last(read_rounds(pre, "round/monitor/probe_acc")),
    }


def build(tables: Path, attacks: list[dict], ns: list[int], setting: str = "local") -> tuple[str, dict]:
    rows = read_rows(tables / "results.csv")
    by_attack = {a["setting"]: a for a in attacks}
    have = {r["method"] for r in rows}
    arms = [m for m in ARMS if m in have]
    _, stats = table(rows, arms, ns, setting)  # label -> N -> (mean, std) over clients, as run_tables reports
    head = (
        "| arm | epsilon | "
        + " | ".join(f"Dice N={n} | vs FCL N={n} | vs random N={n}" for n in ns)
        + " | probe | weights MiB / feature KiB up per client-round | re-id top-1 (chance) | top-5 (chance) "
        "| site (chance) | membership AUC [95% CI] |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fig: dict = {"arms": [], "dice": {n: [] for n in ns}, "attacks": []}
    for m in arms:
        sent = sent_per_round(tables / "pretrain" / m)
        cells = []
        for n in ns:
            if n not in stats.get(label(m), {}):
                cells += ["-", "-", "-"]
                fig["dice"][n].append((math.nan, math.nan))
                continue
            mean, std = stats[label(m)][n]
            fig["dice"][n].append((mean, std))
            vs = [
                paired_gain(paired(rows, m, setting, n), paired(rows, base, setting, n)) if base != m else None
                for base in ("fcl", NO_PRETRAIN)
            ]
            cells += [f"{mean:.3f} ± {std:.3f}", *("-" if g is None else str(g) for g in vs)]
        a = by_attack.get(ARMS[m]) if ARMS[m] else None
        if a:
            risk = [
                f"{a['reid_top1']:.3f} ({a['reid_top1_chance']:.3f})",
                f"{a['reid_top5']:.3f} ({a['reid_top5_chance']:.3f})",
                f"{a['site_acc']:.3f} ({a['site_chance']:.3f})",
                f"{a['membership_auc']:.3f} [{a['membership_auc_ci'][0]:.2f}, {a['membership_auc_ci'][1]:.2f}]",
            ]
        else:
            risk = [NOTHING.get(m, "-")] * 4
        eps = "-" if math.isnan(sent["epsilon"]) else f"{sent['epsilon']:.2f}"
        lines.append(
            f"| {label(m)} | {eps} | "
            + " | ".join(cells)
            + (
                " | - | 0 / 0 | "
                if m == NO_PRETRAIN
                else f" | {sent['probe']:.2f} | {sent['weights_mib']:.2f} / {sent['features_kib']:.0f} | "
            )
            + " | ".join(risk)
            + " |"
        )
        fig["arms"].append(label(m))
        fig["attacks"].append(a)
    return "\n".join(lines), fig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", required=True, help="run_tables.py's --out folder (results.csv, pretrain/)")
    ap.add_argument("--attacks", required=True, help="privacy_attacks.py's --out JSON")
    ap.add_argument("--ns", default="1,2")
    ap.add_argument(
        "--out", type=Path, default=None, help="results folder (default: <tables>/privacy_utility; publish_results.py)"
    )
    args = ap.parse_args(argv)
    tables = Path(args.tables)
    md, fig = build(tables, json.loads(Path(args.attacks).read_text()), [int(n) for n in args.ns.split(",")])
    md += "\n\n" + LEGEND
    from fcl_lightning.figures import save_privacy_utility_figure

    out = args.out or tables / "privacy_utility"
    # the folder's provenance: the calls that made the tables and the attacks (recorded beside
    # them), then this one
    earlier = provenance.read(tables)
    earlier += [c for c in provenance.read(Path(args.attacks).parent) if c not in earlier]
    provenance.write_results(out, "Privacy and utility", md, "ACDC", earlier)  # the figure: publish shows it
    save_privacy_utility_figure(out / "privacy_utility.png", fig["arms"], fig["dice"], fig["attacks"])
    print(md)
    print(f"\nwrote {out / 'results.md'} and {out / 'privacy_utility.png'}")


if __name__ == "__main__":
    main()
