"""experiments/privacy_utility.py on a hand-made run_tables folder: Dice, paired gains against FCL
and random init, bytes per client-round, epsilon and the attack rows land in the arm they belong to."""

import csv
import json
from pathlib import Path

import pytest


@pytest.fixture
def pu(experiment):
    return experiment("privacy_utility")


def pretrain(out: Path, method: str, weights: int, feats: int, epsilon: float | None, probe: float) -> None:
    d = out / "pretrain" / method / "logs" / "version_0"
    d.mkdir(parents=True)
    rows = []
    for r in (1, 2):
        row = {
            "round": f"{r}.0",
            "round/clients": "2",
            "round/comm/weights_up_bytes": str(2 * weights),
            "round/comm/features_up_bytes": str(2 * feats),
            "round/monitor/probe_acc": str(probe if r == 2 else 0.1),
        }
        if epsilon is not None:
            row["round/privacy/epsilon"] = str(epsilon * r / 2)
        rows.append(row)
    with open(d / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted(rows[-1]))
        w.writeheader()
        w.writerows(rows)


def test_table_pairs_each_arm_with_fcl_and_random_and_its_attack(pu, experiment, tmp_path):
    dice = {  # method -> Dice of (client, seed) 0..3
        "random": [0.40, 0.50, 0.30, 0.60],
        "fcl": [0.45, 0.55, 0.35, 0.65],
        "fcl_dp8": [0.44, 0.54, 0.34, 0.64],  # 0.01 below FCL in every pair
        "fclopt": [0.50, 0.60, 0.40, 0.70],
    }
    with open(tmp_path / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method", "setting", "N", "client", "fold", "seed", "dice_mean"])
        w.writeheader()
        for m, vals in dice.items():
            for i, v in enumerate(vals):
                w.writerow(
                    {
                        "method": m,
                        "setting": "local",
                        "N": 1,
                        "client": i % 2,
                        "fold": "",
                        "seed": i // 2,
                        "dice_mean": v,
                    }
                )
    pretrain(tmp_path, "fcl", 3 * 2**20, 2048, None, 0.6)
    pretrain(tmp_path, "fcl_dp8", 3 * 2**20, 1024, 8.0, 0.5)
    pretrain(tmp_path, "fclopt", 4 * 2**20, 0, None, 0.55)
    attack = {
        "reid_top1": 0.2,
        "reid_top1_chance": 0.1,
        "reid_top5": 0.5,
        "reid_top5_chance": 0.3,
        "site_acc": 0.9,
        "site_chance": 0.2,
        "membership_auc": 0.8,
        "membership_auc_ci": [0.7, 0.9],
    }
    attacks = [{**attack, "setting": "no DP"}, {**attack, "setting": "epsilon 8", "reid_top1": 0.11}]
    md, fig = pu.build(tmp_path, attacks, [1])
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()[2:]}
    assert set(rows) == {"Random init", "FCL", "FCL, DP exchange at epsilon 8", "FCLOpt (no negatives, no exchange)"}
    dp = rows["FCL, DP exchange at epsilon 8"].split(" | ")
    assert dp[1] == "8.00"  # the last round's epsilon
    assert dp[3].startswith("-0.010 [-0.010, -0.010]")  # every pair 0.01 below FCL
    assert dp[4].startswith("+0.040")  # against random init
    assert dp[5] == "0.50" and dp[6] == "3.00 / 1"  # probe; MiB and KiB per client-round
    assert dp[7] == "0.110 (0.100)"
    assert "no vectors sent" in rows["FCLOpt (no negatives, no exchange)"]
    assert rows["FCL"].split(" | ")[3] == "-"  # FCL is not compared with itself
    assert fig["arms"][3] == "FCLOpt (no negatives, no exchange)" and fig["attacks"][3] is None
    assert rows["Random init"].split(" | ")[3].startswith("-0.050")  # against FCL
    assert "nothing sent" in rows["Random init"]
    (tmp_path / "attacks").mkdir()
    (tmp_path / "attacks/attacks.json").write_text(json.dumps(attacks))
    prov = experiment("provenance")
    prov.append(tmp_path, prov.record(["experiments/run_tables.py", "--out", "runs/i25"], data="ACDC"))
    prov.append(tmp_path / "attacks", prov.record(["experiments/privacy_attacks.py", "--out", "a.json"]))
    pu.main(["--tables", str(tmp_path), "--attacks", str(tmp_path / "attacks/attacks.json"), "--ns", "1"])
    out = tmp_path / "privacy_utility"
    assert (out / "privacy_utility.png").stat().st_size > 0
    page = (out / "results.md").read_text()
    assert page.startswith("# Privacy and utility\n\n| arm |") and "membership AUC" in page.split("\n\n")[-1]
    # what a published page says measured it: the tables, the attacks, then this call
    commands = [c["command"].split()[1] for c in prov.read(out)]
    assert commands[:2] == ["experiments/run_tables.py", "experiments/privacy_attacks.py"]
    assert len(commands) == 3  # and this call (here: pytest's command line)
