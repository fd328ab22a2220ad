"""``test`` / ``validate`` of a fine-tuned run: load its checkpoint, score every client's model on
whole held-out volumes, write a per-patient CSV and the ``test/*`` (``val/*``) summary keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fcl_lightning.data.volume import DataError
from fcl_lightning.errors import ConfigError
from fcl_lightning.evaluation import STRUCTURES, evaluate_volumes, over_clients, summarize, write_rows_csv
from fcl_lightning.federation.checkpoint import client_states_of, load_checkpoint, resolve_ckpt_path, update_summary
from fcl_lightning.federation.lock import RunLock
from fcl_lightning.figures import save_bland_altman_figure
from fcl_lightning.indices import INDEX_NAMES, agreement, patient_indices, write_indices_csv
from fcl_lightning.predict import score_native

SUMMARY_KEYS = tuple(f"dice_{s}" for s in STRUCTURES) + ("dice_mean", "hd95_mean")
#: where ``test`` / ``validate`` score: the scan's own grid, or the preprocessed training grid
SPACES = ("native", "preprocessed")


def checkpoint_weights(ckpt: dict[str, Any], num_clients: int) -> dict[int, dict[str, torch.Tensor]]:
    """client -> the weights a fine-tuning checkpoint scores for it: in local mode each client's
    own (its best validation round's with ``select_best``), else the global model for every client."""
    weights = {int(c): w for c, w in ckpt["client_weights"].items()}
    weights.update({int(c): w for c, w in ckpt.get("best_client_weights", {}).items()})  # select_best
    return weights or {c: ckpt["global"] for c in range(num_clients)}


def evaluate_run(
    module: Any,
    datamodule: Any,
    ckpt_path: str | None,
    root: str | Path,
    stage: str = "test",
    console: Console | None = None,
    device: str | torch.device = "cpu",
    space: str = "native",
) -> dict[str, float]:
    """Score the run in ``ckpt_path`` (``last`` = ``<root>/checkpoints/last.ckpt``; ``None``: the
    module as configured). Federated runs have one global model; local runs one model per client,
    and the summary is then the mean +- std over clients, as in the paper's tables.

    ``space``: ``native`` scores each prediction on its scan's own grid at the header spacing
    (brought back as ``predict`` does: what the ACDC challenge and published tables report);
    ``preprocessed`` on the training grid (faster; what the round monitors use). Patients with an
    ED and an ES frame also get their cardiac indices, predicted against true."""
    check_evaluation(module, stage, space)
    root = Path(root)
    datamodule.setup(stage)
    if hasattr(datamodule, "place"):  # data.volumes_on: device: scored where they already are
        datamodule.place(device)
    path = resolve_ckpt_path(ckpt_path, root)
    states: dict[int, Any] = {}
    if path is not None:
        ckpt = load_checkpoint(path)
        weights = checkpoint_weights(ckpt, datamodule.num_clients)
        states = scored_client_states(module, ckpt, path)
    else:
        current = module.global_state()
        weights = {c: current for c in range(datamodule.num_clients)}
    clients, rows, per_client = score_clients(module, datamodule, weights, stage, space, device, states)
    out = summary_of(rows, per_client, clients, stage)
    for r in rows:
        r["space"] = space
    write_rows_csv(rows, root / f"{stage}_per_patient.csv")
    idx_rows, agree = index_agreement(rows, root, stage, space, out)
    update_summary(root, {**out, f"{stage}/space": space})
    if console is not None:
        print_evaluation(console, out, rows, per_client, idx_rows, agree, root, stage, space)
    return out


def scored_client_states(module: Any, ckpt: dict[str, Any], path: Path) -> dict[int, Any]:
    """client -> its saved state, when the scored network is client state (``model.scored:
    teacher``); read from the run folder the checkpoint ``path`` lies in. Empty otherwise."""
    if not getattr(module, "scores_client_state", False):
        return {}
    if ckpt.get("best_client_weights"):
        raise ConfigError(
            f"{path} kept each client's best validation round (federation.select_best), which holds the "
            "student only: score it with model.scored student"
        )
    return client_states_of(ckpt, path.parent.parent)


def check_evaluation(module: Any, stage: str, space: str) -> None:
    """What ``test`` / ``validate`` can tell from the config alone."""
    if space not in SPACES:
        raise ConfigError(f"--space must be one of {SPACES}, got {space!r}")
    if module.scored_net() is None:
        verb = "test" if stage == "test" else "validate"
        raise ConfigError(
            f"{verb} scores segmentation models; {type(module).__name__} is a pre-training module: its "
            "rounds are measured by the monitors (round/monitor/*, on validation patients) and its encoder "
            "by federation.downstream or by fine-tuning it (configs/acdc/finetune.yaml)"
        )


def score_clients(
    module: Any,
    datamodule: Any,
    weights: dict[int, dict],
    stage: str,
    space: str,
    device: str | torch.device,
    states: dict[int, Any] | None = None,
) -> tuple[list[int], list[dict[str, Any]], list[dict[str, float]]]:
    """Each scored model on its held-out labelled volumes: (the clients scored, one row per volume,
    each client's summary). A global model on a shared test set is scored once (client ``global``);
    ``states``: each client's own state to load too (a teacher that is scored)."""
    rows: list[dict[str, Any]] = []
    per_client: list[dict[str, float]] = []
    shared_test = stage == "test" and datamodule.scores_test_set
    global_only = len({id(w) for w in weights.values()}) == 1 and not states
    clients = [0] if (shared_test and global_only) else sorted(weights)
    for c in clients:
        vols = datamodule.eval_volumes(c) if stage == "test" else datamodule.validation_volumes(c)
        if not vols:
            raise DataError(
                f"client {c} has no labelled {stage} scan (set data.test_source, data.cv_folds or data.val_fraction; "
                "only scans with a label are scored)"
            )
        module.load_global_state(weights[c])
        if states:
            module.load_client_state(states[c])
        net = module.scored_net().to(device)
        if space == "native":
            source = datamodule.test_source if shared_test else datamodule.source
            r = score_native(net, datamodule.preprocessor, source, vols, module.eval_batch_size)
        else:
            r = evaluate_volumes(net, vols, module.eval_batch_size)
        for row in r:
            row["client"] = "global" if (shared_test and global_only) else c
        rows.extend(r)
        per_client.append(summarize(r))
    return clients, rows, per_client


def summary_of(
    rows: list[dict[str, Any]], per_client: list[dict[str, float]], clients: list[int], stage: str
) -> dict[str, float]:
    """The ``{stage}/*`` summary: mean (+- std over clients), per frame, per client."""
    out = over_clients(per_client, SUMMARY_KEYS, stage, std=len(per_client) > 1)
    out[f"{stage}/num_volumes"] = len(rows)
    for frame in sorted({r["frame"] for r in rows if r["frame"]}):
        out[f"{stage}/{frame}/dice_mean"] = summarize([r for r in rows if r["frame"] == frame])["dice_mean"]
    if len(per_client) > 1:
        for c, p in zip(clients, per_client):
            out[f"{stage}/client{c}/dice_mean"] = p["dice_mean"]
    return out


def index_agreement(
    rows: list[dict[str, Any]], root: Path, stage: str, space: str, out: dict[str, float]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """The cardiac indices of every patient with an ED and an ES frame, predicted against true:
    their agreement into ``out``, ``{stage}_indices.csv`` and the Bland-Altman figure."""
    idx_rows = patient_indices(rows)
    agree: dict[str, dict[str, float]] = {}
    if idx_rows:
        for name in INDEX_NAMES:
            agree[name] = agreement([r[f"{name}_pred"] for r in idx_rows], [r[f"{name}_true"] for r in idx_rows])
            out.update({f"{stage}/indices/{name}/{k}": float(v) for k, v in agree[name].items()})
        write_indices_csv(idx_rows, root / f"{stage}_indices.csv")
        pairs = {n: ([r[f"{n}_pred"] for r in idx_rows], [r[f"{n}_true"] for r in idx_rows]) for n in INDEX_NAMES[:7]}
        save_bland_altman_figure(
            root / f"{stage}_bland_altman.png", pairs, title=f"{stage}: predicted - true ({space})"
        )
    return idx_rows, agree


def print_evaluation(
    console: Console,
    out: dict[str, float],
    rows: list[dict[str, Any]],
    per_client: list[dict[str, float]],
    idx_rows: list[dict[str, Any]],
    agree: dict[str, dict[str, float]],
    root: Path,
    stage: str,
    space: str,
) -> None:
    """The Dice table, the indices' agreement table and where the outputs are."""
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
    if agree:
        pairs_of = "patients" if len(per_client) == 1 else "(model, patient) pairs"
        ti = Table(title=f"cardiac indices of {len(idx_rows)} {pairs_of}, predicted against true ({space} grid)")
        for col in ("index", "corr", "bias", "limits of agreement", "MAE"):
            ti.add_column(col, justify="right")
        for name, a in agree.items():
            ti.add_row(
                name,
                f"{a['corr']:.3f}",
                f"{a['bias']:+.2f}",
                f"{a['loa_low']:+.2f} .. {a['loa_high']:+.2f}",
                f"{a['mae']:.2f}",
            )
        console.print(ti)
    files = f"{root / f'{stage}_per_patient.csv'}" + (
        f", {stage}_indices.csv, {stage}_bland_altman.png" if agree else ""
    )
    console.print(f"scored on the {space} grid; per-patient rows: {files}; summary: {root / 'summary.json'}")


def run_predict(
    module: Any,
    datamodule: Any,
    ckpt_path: str | None,
    input: str | None,
    output: str | None,
    client: int,
    probabilities: bool,
    root: Path,
    device: str | torch.device = "cpu",
    on_bad_scan: str = "stop",
) -> dict[str, Any]:
    """``fcl-lightning predict``: the model of a fine-tuning checkpoint (``client``'s in local
    mode), the data section's preprocessing, every scan of ``input`` segmented into ``output``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fcl_lightning.console import log_console
    from fcl_lightning.predict import find_scans, predict_scans

    if module.scored_net() is None:
        raise ConfigError(
            f"predict segments with a fine-tuned U-Net; the config's model is {type(module).__name__} "
            "(pre-training): give the fine-tuning config (e.g. configs/acdc/finetune.yaml)"
        )
    if not ckpt_path:
        raise ConfigError(
            "predict needs --ckpt_path: a fine-tuning run's checkpoint (e.g. <run>/checkpoints/last.ckpt)"
        )
    if not input:
        raise ConfigError("predict needs --input: a NIfTI file, folder, glob, manifest or ACDC-layout root")
    path, per_client = load_predict_model(module, ckpt_path, root, client)
    scans = find_scans(input)
    out = Path(output) if output else root / "predictions"
    net = module.scored_net().to(device)
    with Progress(
        TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), console=log_console(), transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("", total=len(scans))

        def show(i: int, scan: Any) -> None:
            bar.update(task, completed=i, description=scan.path.name)

        with RunLock(out, "--output"):  # one predict per output folder at a time
            result = predict_scans(
                net, datamodule.preprocessor, scans, out, module.eval_batch_size, probabilities, show, on_bad_scan
            )
        bar.update(task, completed=len(scans))
    whose = f"client {client}'s model" if per_client else "the global model"
    report_predict(result, out, f"{whose}, {path.name}")
    return result


def load_predict_model(module: Any, ckpt_path: str, root: Path, client: int) -> tuple[Path, bool]:
    """Load the scored model of a fine-tuning checkpoint into ``module`` (``client``'s weights, and
    its teacher when the run scores it), after checking that it is one and fits; return the
    checkpoint's path and whether it holds one model per client."""
    from fcl_lightning.federation.checkpoint import CheckpointError

    path = resolve_ckpt_path(ckpt_path, root)
    ckpt = load_checkpoint(path)
    if ckpt.get("module") != type(module).__name__:
        raise CheckpointError(
            f"{path} is a checkpoint of a {ckpt.get('module')} run (pre-training), not of fine-tuning: "
            "predict needs a fine-tuning run's checkpoint"
        )
    weights = checkpoint_weights(ckpt, int(ckpt["num_clients"]))
    per_client = bool(ckpt["client_weights"])
    if per_client and client not in weights:
        raise ConfigError(f"--client {client}: {path} holds the models of clients {sorted(weights)}")
    w = weights[client if per_client else next(iter(weights))]
    problem = module.global_state_mismatch(w)
    if problem:
        raise CheckpointError(f"{path} does not fit the configured model: {problem}; use the run's config.yaml")
    module.load_global_state(w)
    states = scored_client_states(module, ckpt, path)
    if states:
        module.load_client_state(states[client])
    return path, per_client


def report_predict(result: dict[str, Any], out: Path, model: str, shown: int = 5) -> None:
    """What predict wrote, then the scans it skipped, the patients without indices and the
    implausible indices: ``shown`` lines of each kind, the rest summarised by their count."""
    from fcl_lightning.console import output_console

    n = sum(1 for f in result["files"] if f.name.endswith("_seg.nii.gz"))
    extra = [f.name for f in result["files"] if f.suffix == ".csv"]
    console = output_console()
    console.print(f"outputs in {out}: {n} label maps ({model})" + "".join(f", {e}" for e in extra), soft_wrap=True)

    def say(line: str, style: str | None = None) -> None:  # plain text: names may hold [brackets]
        console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)

    for line in result.get("bad", [])[:shown]:
        say(f"skipped: {line}", "yellow")
    if len(result.get("bad", [])) > shown:
        say(f"... {len(result['bad'])} scans skipped in all (volumes.csv's status column)", "yellow")
    reasons = result.get("no_indices", [])
    if len(reasons) > shown:
        say(f"{len(reasons)} patients or inputs without cardiac indices; the first {shown}:")
    for line in reasons[:shown]:
        say(line)
    flagged = [r for r in result["indices"] if r.get("flags")]
    if len(flagged) > shown:
        say(
            f"{len(flagged)} patients with implausible cardiac indices (the flags column of indices.csv): "
            f"check the segmentation; the first {shown}:",
            "yellow",
        )
    for r in flagged[:shown]:
        say(f"{r['patient']}: implausible indices {r['flags'].replace(';', ', ')}: check the segmentation", "yellow")
