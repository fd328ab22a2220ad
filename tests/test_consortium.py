"""A consortium's own scans through the CLI, as a user types it: 3 site folders (ACDC layout,
another axis order, a manifest with empty label cells), most scans unlabelled. Pre-training,
semi-supervised fine-tuning, test and predict; Flower sites that name their folder as data-root
give the in-process run's bits; every bad case is one ``error:`` line, exit 2, nothing written."""

import csv
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from support import REPO


def sites(consortium) -> list[str]:
    return [
        "--data.source=SiteFolders",
        f"--data.source.root={consortium}",
        "--data.split=site",
        "--data.num_clients=3",
    ]


def pretrain_args(consortium, root, rounds=1) -> list[str]:
    return [
        "--config",
        REPO / "configs/tiny.yaml",
        *sites(consortium),
        "--model.objective.num_negatives=32",
        f"--federation.rounds={rounds}",
        f"--trainer.default_root_dir={root}",
    ]


def finetune_args(consortium, root, *extra) -> list[str]:
    """The shipped fine-tuning config and mean teacher on the consortium, at a test's size."""
    return [
        "--config",
        REPO / "configs/demo_finetune.yaml",
        "--config",
        REPO / "configs/semi/mean_teacher.yaml",
        "--trainer.accelerator=cpu",
        "--model.features=[8,16,16,16]",
        "--model.semi_supervised.init_args.rampup_steps=2",
        "--data.img_size=32",
        "--data.spacing=3.0",
        "--data.augment_on=device",
        *sites(consortium),
        "--data.test_source=null",
        "--data.labelled_per_client=null",
        "--data.val_fraction=0.5",
        "--federation.local_steps=3",
        "--federation.rounds=1",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def test_pretrain_semi_finetune_test_and_predict_on_partially_labelled_site_folders(consortium, tmp_path, cli):
    code, _, err = cli(["fit", *pretrain_args(consortium, tmp_path / "pre")])
    assert code == 0, err
    # the data: lines: per client its patients / volumes, labelled and unlabelled
    assert "client 1: train 4 / 8 (labelled 1 / 2, unlabelled 3 / 6), validation 2 / 4 (labelled 1 / 2" in err

    run = tmp_path / "fine"
    code, out, err = cli(["fit", *finetune_args(consortium, run, f"--model.pretrained={tmp_path / 'pre/encoder.pt'}")])
    assert code == 0, err
    assert "client 2: labelled 1 patients / 2 volumes, unlabelled 8 volumes, validation 2 labelled volumes" in err
    assert "supervised" in out and "unlabelled" in out and "val Dice" in out  # the round line's split of the loss

    code, _, err = cli(["test", *finetune_args(consortium, run), "--ckpt_path=last"])
    assert code == 0, err
    rows = list(csv.DictReader((run / "test_per_patient.csv").open()))
    # local mode, no test set: each client scored on its own labelled held-out patient, natively
    assert len(rows) == 6 and all(r["patient"].split("/")[1] in ("patient005", "patient006") for r in rows)
    assert {r["client"] for r in rows} == {"0", "1", "2"} and all(0 <= float(r["dice_mean"]) <= 1 for r in rows)

    code, out, err = cli(
        ["predict", *finetune_args(consortium, run), "--ckpt_path=last",
         f"--input={consortium / 'site2/manifest.csv'}", f"--output={tmp_path / 'pred'}"]
    )  # fmt: skip
    assert code == 0, err
    assert len(list((tmp_path / "pred").glob("*_seg.nii.gz"))) == 12
    assert len(list(csv.DictReader((tmp_path / "pred/indices.csv").open()))) == 6  # ED + ES known per patient


def unlabelled_copy(consortium, tmp_path, site="site0") -> Path:
    out = tmp_path / "cons"
    shutil.copytree(consortium, out)
    for p in (out / site).rglob("*_gt.nii.gz"):
        p.unlink()
    return out


@pytest.mark.parametrize(
    "case,needle",
    [
        ("no labels at a site", "client 0 has no labelled training scan"),
        ("more labelled patients asked than a site has", "client 0 has 1 labelled training patient(s) but data.labelled_per_client is 2"),
        ("cross-validation folds beyond the labelled patients", "client 0 has 2 labelled patient(s), fewer than data.cv_folds=5"),
        ("semi-supervised without unlabelled scans", "semi-supervised fine-tuning needs unlabelled training scans"),
    ],
)  # fmt: skip
def test_fine_tuning_data_that_cannot_serve_is_one_error_and_nothing_written(consortium, tmp_path, cli, case, needle):
    data, extra = consortium, []
    if case == "no labels at a site":
        data = unlabelled_copy(consortium, tmp_path)
    elif case == "more labelled patients asked than a site has":
        extra = ["--data.labelled_per_client=2"]
    elif case == "cross-validation folds beyond the labelled patients":
        extra = ["--data.cv_folds=5"]
    else:
        extra = ["--data.source=FolderSource", f"--data.source.root={consortium / 'site2'}", "--data.num_clients=1",
                 "--data.split=iid", "--data.val_fraction=0.0", "--data.labelled_per_client=null"]  # fmt: skip
        data = tmp_path / "labelled"
        for p in (consortium / "site2").glob("patient00[56]*"):
            data.mkdir(exist_ok=True)
            shutil.copy(p, data / p.name)
        extra[1] = f"--data.source.root={data}"
    run = tmp_path / "run"
    code, out, err = cli(["fit", *finetune_args(data, run, *extra)])
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not run.exists() or not any(run.iterdir()), sorted(run.rglob("*"))


def test_validate_without_labelled_held_out_scans_is_one_error(consortium, tmp_path, cli):
    args = finetune_args(consortium, tmp_path / "run", "--data.val_fraction=0.0")
    code, _, err = cli(["fit", *args])
    assert code == 0, err
    assert "no labelled validation scan: val/* is not measured" in err
    code, _, err = cli(["validate", *args, "--ckpt_path=last"])
    assert code == 2 and "error: client 0 has no labelled val scan" in err, err


def test_the_sources_are_listed_and_their_short_names_resolve(tmp_path, cli):
    code, out, _ = cli(["fit", "--help"])
    listed = " ".join(out.split())
    for name in ("manifest.ManifestSource", "folders.FolderSource", "folders.SiteFolders", "acdc.ACDCSource"):
        assert f"fcl_lightning.data.{name}" in listed
    code, out, _ = cli(["fit", "--data.source.help", "ManifestSource"])
    assert "``label`` (empty: an unlabelled scan)" in " ".join(out.split())


pytest.importorskip("flwr")


def test_flower_sites_that_name_their_folder_equal_the_in_process_run(consortium, tmp_path, cli):
    """Each node's data-root is its site folder, no other override; the encoder is bitwise that of
    the in-process run over SiteFolders."""
    from flower_grid import LocalGrid

    from fcl_lightning.flower.apps import client_app
    from fcl_lightning.flower.server import run_server

    code, _, err = cli(["fit", *pretrain_args(consortium, tmp_path / "inproc", rounds=2)])
    assert code == 0, err
    args = pretrain_args(consortium, tmp_path / "flower", rounds=2)
    run_config = {"config": str(args[1]), "overrides": " ".join(shlex.quote(str(a)) for a in args[2:]), "wait-s": 5}
    nodes = {100 + c: {"partition-id": c, "data-root": str(consortium / f"site{c}")} for c in range(3)}
    run_server(LocalGrid(client_app, run_config, nodes), run_config)
    a = torch.load(tmp_path / "inproc/encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "flower/encoder.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sites_bad_data_reaches_the_server_before_round_one(consortium, tmp_path):
    from flower_grid import LocalGrid

    from fcl_lightning.flower.apps import client_app
    from fcl_lightning.flower.server import SiteError, run_server

    args = finetune_args(consortium, tmp_path / "run", "--federation.mode=federated")
    run_config = {"config": str(args[1]), "overrides": " ".join(shlex.quote(str(a)) for a in args[2:]), "wait-s": 5}
    data = unlabelled_copy(consortium, tmp_path, "site1")
    nodes = {100 + c: {"partition-id": c, "data-root": str(data / f"site{c}")} for c in range(3)}
    with pytest.raises(SiteError, match="site 1: client 1 has no labelled training scan"):
        run_server(LocalGrid(client_app, run_config, nodes), run_config)
    assert not (tmp_path / "run/checkpoints").exists()


def test_a_node_that_fails_to_answer_is_named_on_the_server_console(tmp_path, tiny, capsys):
    from flower_grid import LocalGrid

    from fcl_lightning.flower.apps import client_app
    from fcl_lightning.flower.server import run_server

    args = tiny(tmp_path / "run", rounds=1)[1:]
    run_config = {"config": str(args[1]), "overrides": " ".join(shlex.quote(str(a)) for a in args[2:]), "wait-s": 5}
    grid = LocalGrid(client_app, run_config, {100 + c: {"partition-id": c} for c in range(2)}, fail={-1: {101}})
    run_server(grid, run_config)
    err = capsys.readouterr().err
    assert "flower: a node failed to answer: node 101: node 101 crashed" in err
    assert "round 1: client 1 left out of this round (no node connected)" in " ".join(err.split())
