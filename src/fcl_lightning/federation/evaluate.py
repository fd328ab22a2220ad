"""``test`` / ``validate`` of a fine-tuned run: load its checkpoint, score every client's model on
whole held-out volumes, write a per-patient CSV and the ``test/*`` (``val/*``) summary keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fcl_lightning.errors import ConfigError
from fcl_lightning.evaluation import STRUCTURES, evaluate_volumes, over_clients, summarize, write_rows_csv
from fcl_lightning.federation.checkpoint import load_checkpoint, resolve_ckpt_path, update_summary

SUMMARY_KEYS = tuple(f"dice_{s}" for s in STRUCTURES) + ("dice_mean", "hd95_mean")


def evaluate_run(
    module: Any,
    datamodule: Any,
    ckpt_path: str | None,
    root: str | Path,
    stage: str = "test",
    console: Console | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Score the run in ``ckpt_path`` (``last`` = ``<root>/checkpoints/last.ckpt``; ``None``: the
    module as configured). Federated runs have one global model; local runs one model per client,
    and the summary is then the mean +- std over clients, as in the paper's tables."""
    if module.scored_net() is None:
        verb = "test" if stage == "test" else "validate"
        raise ConfigError(
            f"{verb} scores segmentation models; {type(module).__name__} is a pre-training module: its "
            "rounds are measured by the monitors (round/monitor/*, on validation patients) and its encoder "
            "by federation.downstream or by fine-tuning it (configs/acdc/finetune.yaml)"
        )
    root = Path(root)
    datamodule.setup(stage)
    if hasattr(datamodule, "place"):  # data.volumes_on: device: scored where they already are
        datamodule.place(device)
    C = datamodule.num_clients
    weights: dict[int, dict] = {}
    path = resolve_ckpt_path(ckpt_path, root)
    if path is not None:
        ckpt = load_checkpoint(path)
        weights = {int(c): w for c, w in ckpt["client_weights"].items()}
        weights.update({int(c): w for c, w in ckpt.get("best_client_weights", {}).items()})  # select_best
        if not weights:
            weights = {c: ckpt["global"] for c in range(C)}
    else:
        current = module.global_state()
        weights = {c: current for c in range(C)}
    rows: list[dict[str, Any]] = []
    per_client: list[dict[str, float]] = []
    shared_test = stage == "test" and datamodule.test and not datamodule.cv_folds
    global_only = len({id(w) for w in weights.values()}) == 1
    clients = [0] if (shared_test and global_only) else sorted(weights)
    for c in clients:
        vols = datamodule.eval_volumes(c) if stage == "test" else datamodule.val[c]
        if not vols:
            raise ValueError(f"client {c} has no {stage} volumes (set data.test_source, data.cv_folds or val_fraction)")
        module.load_global_state(weights[c])
        r = evaluate_volumes(module.scored_net().to(device), vols, module.eval_batch_size)
        for row in r:
            row["client"] = "global" if (shared_test and global_only) else c
        rows.extend(r)
        per_client.append(summarize(r))
    out = over_clients(per_client, SUMMARY_KEYS, stage, std=len(per_client) > 1)
    out[f"{stage}/num_volumes"] = len(rows)
    for frame in sorted({r["frame"] for r in rows if r["frame"]}):
        out[f"{stage}/{frame}/dice_mean"] = summarize([r for r in rows if r["frame"] == frame])["dice_mean"]
    if len(per_client) > 1:
        for c, p in zip(clients, per_client):
            out[f"{stage}/client{c}/dice_mean"] = p["dice_mean"]
    write_rows_csv(rows, root / f"{stage}_per_patient.csv")
    update_summary(root, out)
    if console is not None:
        t = Table(
            title=f"{stage}: {len(rows)} volumes, {len(per_client)} model(s)"
            + (" - mean ± std over clients" if len(per_client) > 1 else "")
        )
        for k in SUMMARY_KEYS:
            t.add_column(k, justify="right")
        t.add_row(
            *[
                f"{out[f'{stage}/{k}']:.3f}" + (f" ± {out[f'{stage}/{k}_std']:.3f}" if len(per_client) > 1 else "")
                for k in SUMMARY_KEYS
            ]
        )
        console.print(t)
        console.print(f"per-patient rows: {root / f'{stage}_per_patient.csv'}; summary: {root / 'summary.json'}")
    return out
