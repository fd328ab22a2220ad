"""Stage 2: encoder loading by key, a tiny fine-tune that learns, test outputs, the demo end to end."""

import csv
import json
import shutil

import lightning.pytorch as pl
import pytest
import torch
from support import FINETUNE, REPO, bare_trainer

from fcl_lightning.cli import main
from fcl_lightning.data.datamodule import FederatedDataModule
from fcl_lightning.data.phantom import PhantomSource
from fcl_lightning.downstream import DownstreamEvaluation
from fcl_lightning.errors import ConfigError
from fcl_lightning.evaluation import evaluate_volumes, summarize
from fcl_lightning.lit.pretrain import ContrastivePretrainModule
from fcl_lightning.lit.segment import PretrainedWeightsError, SegmentationModule

SMALL = [8, 16, 16, 16]


def test_pretrained_encoder_loads_by_key(tmp_path):
    pre = ContrastivePretrainModule(features=SMALL, proj_hidden=32, proj_dim=16)
    torch.save(pre.encoder_state(), tmp_path / "encoder.pt")
    seg = SegmentationModule(features=SMALL, pretrained=str(tmp_path / "encoder.pt"))
    for k, v in pre.encoder.state_dict().items():
        assert torch.equal(seg.net.encoder.state_dict()[k], v), k
    fresh = SegmentationModule(features=SMALL)
    assert not torch.equal(fresh.net.encoder.conv_0.conv_0.conv.weight, seg.net.encoder.conv_0.conv_0.conv.weight)


def test_pretrained_mismatch_lists_keys(tmp_path):
    pre = ContrastivePretrainModule(features=[8, 16, 16], proj_hidden=32, proj_dim=16)
    torch.save(pre.encoder_state(), tmp_path / "encoder.pt")
    with pytest.raises(PretrainedWeightsError, match=r"[0-9]+ missing \(first: down_3"):
        SegmentationModule(features=SMALL, pretrained=str(tmp_path / "encoder.pt"))
    wide = ContrastivePretrainModule(features=[4, 16, 16, 16], proj_hidden=32, proj_dim=16)
    torch.save(wide.encoder_state(), tmp_path / "wide.pt")
    with pytest.raises(PretrainedWeightsError, match="of another shape"):
        SegmentationModule(features=SMALL, pretrained=str(tmp_path / "wide.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(PretrainedWeightsError, match="is not a file written by torch.save"):
        SegmentationModule(features=SMALL, pretrained=str(tmp_path / "junk.pt"))
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        SegmentationModule(features=SMALL, pretrained=str(tmp_path / "nope.pt"))


def test_loads_from_federated_checkpoint(pretrained_tiny):
    seg = SegmentationModule(features=SMALL, pretrained=str(pretrained_tiny / "checkpoints" / "last.ckpt"))
    enc = torch.load(pretrained_tiny / "encoder.pt", weights_only=True)
    assert all(torch.equal(seg.net.encoder.state_dict()[k], v) for k, v in enc.items())


def test_tiny_finetune_beats_untrained():
    pl.seed_everything(0)
    dm = FederatedDataModule(
        PhantomSource(num_subjects=6, size=64),
        num_clients=1,
        val_fraction=0.0,
        test_source=PhantomSource(num_subjects=2, size=64, seed=99),
        labelled_per_client=2,
        img_size=32,
        spacing=3.0,
        augment_finetune=False,
    )
    dm.setup()
    seg = SegmentationModule(features=SMALL, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    before = summarize(evaluate_volumes(seg.net, dm.test))["dice_mean"]
    trainer = bare_trainer(60)
    trainer.fit(seg, train_dataloaders=dm.finetune_loader(0, seed=0))
    after = summarize(evaluate_volumes(seg.net, dm.test))["dice_mean"]
    assert after > before + 0.2, (before, after)


@pytest.mark.parametrize(
    "mode", ["local", pytest.param("federated", marks=pytest.mark.slow)]
)  # federated: make test-slow
def test_finetune_fit_then_test_writes_csv_and_summary(tmp_path, mode):
    args = [*FINETUNE, f"--trainer.default_root_dir={tmp_path}", f"--federation.mode={mode}"]
    main(["fit", *args])
    main(["test", *args, "--ckpt_path=last", "--space=preprocessed"])  # native: tests/test_predict.py
    summary = json.loads((tmp_path / "summary.json").read_text())
    for k in ("test/dice_rv", "test/dice_myo", "test/dice_lv", "test/dice_mean", "test/hd95_mean"):
        assert k in summary
        assert summary[k] == summary[k] or k == "test/hd95_mean"
    assert 0.0 <= summary["test/dice_mean"] <= 1.0
    rows = list(csv.DictReader((tmp_path / "test_per_patient.csv").open()))
    # 2 test subjects x 2 frames; local mode scores each client's own model
    assert len(rows) == (8 if mode == "local" else 4)
    assert {"key", "patient", "frame", "dice_mean", "hd95_mean", "client"} <= set(rows[0])
    assert {r["space"] for r in rows} == {"preprocessed"}
    if mode == "local":
        assert "test/dice_mean_std" in summary
        assert {r["client"] for r in rows} == {"0", "1"}


def test_test_refuses_pretraining_module(tmp_path, tiny):
    with pytest.raises(ConfigError, match="pre-training module"):
        main(["test", *tiny(tmp_path)[1:]])
    with pytest.raises(ConfigError, match="validate scores segmentation models"):
        main(["validate", *tiny(tmp_path)[1:]])


@pytest.mark.parametrize(
    "config",
    [
        "demo.yaml",
        pytest.param("demo_semi.yaml", marks=pytest.mark.slow),
        pytest.param("demo.yaml+native", marks=pytest.mark.slow),  # downstream scored on the scans' grids
    ],
)
def test_demo_config_end_to_end_reduced(tmp_path, config):
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / config.split("+")[0]),
            *(["--federation.downstream.space=native"] if config.endswith("+native") else []),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.accelerator=cpu",
            "--model.features=[8,16,16,16]",
            "--model.proj_hidden=32",
            "--data.img_size=32",
            "--data.spacing=3.0",
            "--data.source.num_subjects=8",
            "--data.source.size=64",
            "--data.source.num_sites=2",
            "--data.test_source.num_subjects=2",
            "--data.test_source.size=64",
            "--data.num_clients=2",
            "--federation.rounds=1",
            "--federation.local_epochs=1",
            "--federation.downstream.steps=5",
            "--federation.downstream.seeds=2",  # the demo's 3, cut for time
        ]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    for init in ("fcl", "random", *(["fcl_semi"] if config == "demo_semi.yaml" else [])):
        assert 0.0 <= summary[f"downstream/{init}/dice_mean"] <= 1.0
    if config == "demo.yaml":  # the demo's gain: paired over 2 clients x 2 fine-tuning seeds
        gain = {k: summary[f"downstream/gain/fcl_vs_random/{k}"] for k in ("mean", "low", "high", "pairs")}
        assert gain["pairs"] == 4 and gain["low"] <= gain["mean"] <= gain["high"]
        # a balanced design: the mean paired difference is the difference of the per-client means
        diff = summary["downstream/fcl/dice_mean"] - summary["downstream/random/dice_mean"]
        assert gain["mean"] == pytest.approx(diff, abs=1e-9)
    for fig in ("downstream.png", "embedding.png"):
        assert (tmp_path / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "encoder.pt").exists()


def test_per_client_encoders_start_local_clients_apart(tmp_path):
    """`{client}` in model.pretrained: each client of a local fine-tuning starts from its own
    encoder file; a federated run refuses it (one start model for all)."""
    encs = {}
    for c in range(2):
        torch.manual_seed(c)
        encs[c] = SegmentationModule(features=[8, 16, 16, 16]).net.encoder.state_dict()
        (tmp_path / "encoders").mkdir(exist_ok=True)
        torch.save(encs[c], tmp_path / "encoders" / f"client{c}.pt")
    args = [*FINETUNE, f"--model.pretrained={tmp_path}/encoders/client{{client}}.pt"]
    seg = SegmentationModule(features=[8, 16, 16, 16], pretrained=f"{tmp_path}/encoders/client{{client}}.pt")
    g = seg.global_state()
    for c in range(2):
        w = seg.client_initial_weights(c, g)
        for k, v in encs[c].items():
            assert torch.equal(w[f"net.encoder.{k}"], v), (c, k)
    with pytest.raises(PretrainedWeightsError, match="client5.pt does not exist"):
        seg.client_initial_weights(5, g)
    with pytest.raises(ValueError, match="needs federation.mode local"):
        main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'fed'}", "--federation.mode=federated"])


def test_encoder_lr_scale_sets_the_encoders_learning_rate():
    m = SegmentationModule(features=[4, 8, 8], encoder_lr_scale=0.1, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    opt = m.configure_optimizers()
    enc, rest = opt.param_groups
    assert enc["lr"] == pytest.approx(1e-4) and rest["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in enc["params"]} == {id(p) for p in m.net.encoder.parameters()}
    assert len(enc["params"]) + len(rest["params"]) == len(list(m.parameters()))
    with pytest.raises(ValueError, match="encoder_lr_scale"):
        SegmentationModule(features=[4, 8, 8], encoder_lr_scale=-1)


@pytest.mark.slow  # kept out of make test for its time (make test-slow)
def test_select_best_keeps_each_clients_best_validation_round(tmp_path):
    from fcl_lightning.federation.checkpoint import load_checkpoint

    args = [
        *FINETUNE,
        f"--trainer.default_root_dir={tmp_path}",
        "--federation.mode=local",
        "--federation.rounds=2",
        "--federation.local_steps=2",
        "--federation.select_best=true",
        "--data.val_fraction=0.5",
    ]
    main(["fit", *args])
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert set(ckpt["best_client_weights"]) == {"0", "1"}
    for c in ("0", "1"):
        per_round = [row[3] for row in ckpt["dice_rows"] if row[1] == int(c) and row[2] == "val"]
        assert len(per_round) == 2 and ckpt["best_val_dice"][c] == pytest.approx(max(per_round))
    with pytest.raises(ValueError, match="select_best"):
        main(["fit", *args[:-1], "--data.val_fraction=0.0", f"--trainer.default_root_dir={tmp_path / 'b'}"])


@pytest.mark.slow  # the suite's 3-minute budget (make test-slow)
def test_pretraining_exports_the_weights_it_started_from(pretrained_tiny, tmp_path, tiny):
    """encoder_init.pt is the encoder before the first step (a resume leaves it alone), and the
    downstream's paired random init (random_init: start) fine-tunes from exactly it."""
    shutil.copytree(pretrained_tiny, tmp_path, dirs_exist_ok=True, symlinks=True)
    pl.seed_everything(0)
    start = ContrastivePretrainModule(features=SMALL, proj_hidden=32, proj_dim=16).encoder_state()
    init = torch.load(tmp_path / "encoder_init.pt", weights_only=True)
    assert init.keys() == start.keys() and all(torch.equal(init[k], v) for k, v in start.items())
    trained = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert not all(torch.equal(trained[k], v) for k, v in init.items())
    before = (tmp_path / "encoder_init.pt").stat().st_mtime_ns
    main(tiny(tmp_path, rounds=2, extra=["--seed_everything=0", "--ckpt_path=last"]))
    assert (tmp_path / "encoder_init.pt").stat().st_mtime_ns == before
    paired = DownstreamEvaluation(random_init="start").random_weights(tmp_path)
    assert all(torch.equal(paired[k], v) for k, v in init.items())
    assert DownstreamEvaluation().random_weights(tmp_path) is None
    with pytest.raises(ConfigError, match="encoder_init.pt"):
        DownstreamEvaluation(random_init="start").random_weights(tmp_path / "elsewhere")
    # resuming a run that has no encoder_init.pt (older than it) fails before any round
    (tmp_path / "encoder_init.pt").unlink()
    with pytest.raises(ConfigError, match="random_init: start needs"):
        main(
            tiny(
                tmp_path,
                rounds=3,
                extra=["--ckpt_path=last", "--federation.downstream.random_init=start"],
            )
        )
    assert not (tmp_path / "checkpoints" / "round-003.ckpt").exists()
    with pytest.raises(ConfigError, match="random_init must be"):
        DownstreamEvaluation(random_init="same")


def test_validation_dice_is_the_torchmetrics_mean_of_the_per_volume_monai_dice():
    import lightning.pytorch as pl

    from fcl_lightning.data.phantom import PhantomSource
    from fcl_lightning.data.preprocess import Preprocessor, load_volumes
    from fcl_lightning.evaluation import evaluate_volumes
    from fcl_lightning.lit.segment import VolumeDataset

    src = PhantomSource(num_subjects=2, num_sites=1, size=64, seed=5)
    vols = load_volumes(src, src.records(), Preprocessor(spacing=3.0, size=32))
    seg = SegmentationModule(features=[8, 16, 16, 16])
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(seg, torch.utils.data.DataLoader(VolumeDataset(vols), batch_size=None), verbose=False)
    rows = evaluate_volumes(seg.net, vols)
    for k in ("dice_mean", "dice_lv", "hd95_mean"):
        vals = [r[k] for r in rows if r[k] == r[k]]
        expect = sum(vals) / len(vals) if vals else float("nan")
        got = float(trainer.callback_metrics[f"val/{k}"])
        assert (got != got and expect != expect) or abs(got - expect) < 1e-6 * max(1.0, abs(expect)), (k, got, expect)
