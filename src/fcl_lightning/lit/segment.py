"""Stage 2: U-Net segmentation fine-tuning from the pre-trained encoder, evaluated on whole volumes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from fcl_lightning.errors import UserError
from fcl_lightning.evaluation import METRIC_KEYS, predict_volume, volume_metrics
from fcl_lightning.io import safe_torch_load
from fcl_lightning.lit.base import FederatedModule, check_optimizer, state_mismatch
from fcl_lightning.models.encoder import DEFAULT_FEATURES
from fcl_lightning.models.unet import UNet
from fcl_lightning.semi.objectives import SemiSupervised

#: what ``SegmentationModule(scored=...)`` may score
SCORED = ("student", "teacher")
LR_SCHEDULES = ("constant", "poly")


class PretrainedWeightsError(UserError):
    """A pre-trained file that does not fit the U-Net encoder; names the file and the keys."""


def encoder_state_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read encoder weights from ``encoder.pt`` (plain state dict) or a federated round checkpoint
    (its global ``encoder.*`` weights), always with ``weights_only=True``."""
    path = Path(path)
    obj = safe_torch_load(path, "pretrained weights", PretrainedWeightsError)
    finetuned = isinstance(obj, dict) and (
        (obj.get("module") == "SegmentationModule" and "global" in obj)
        or any(str(k).startswith("net.encoder.") for k in (obj.get("state_dict") or obj.get("global") or obj))
    )
    if finetuned:
        what = f", round {obj['round']}" if isinstance(obj.get("round"), int) else ""
        raise PretrainedWeightsError(
            f"{path} is a fine-tuning checkpoint (a segmentation model{what}); model.pretrained takes a "
            "pre-training run's encoder.pt, encoders/client<c>.pt or round checkpoint"
        )
    if isinstance(obj, dict) and "format" in obj and "global" in obj:
        obj = {
            (k[len("encoder.") :] if k.startswith("encoder.") else k): v
            for k, v in obj["global"].items()
            if k.startswith(("encoder.", "decoder."))
        }
    elif isinstance(obj, dict) and "state_dict" in obj:  # a Lightning checkpoint of the pre-training module
        obj = {k[len("encoder.") :]: v for k, v in obj["state_dict"].items() if k.startswith("encoder.")}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"{path} holds no encoder state dict")
    return obj


def load_encoder(net: UNet, state: dict[str, torch.Tensor], source: str = "pretrained weights") -> None:
    """Load ``state`` into ``net.encoder`` (and its ``decoder.*`` entries, pre-trained decoder
    blocks, into ``net.decoder``); any missing, unexpected or mis-shaped encoder key (counted, the
    first of each named), or a decoder key the U-Net lacks, is an error (never a silent partial load)."""
    dec = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
    state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    own_dec = net.decoder.state_dict()
    bad_dec = sorted(f"decoder.{k}" for k, v in dec.items() if k not in own_dec or own_dec[k].shape != v.shape)
    if bad_dec:
        raise PretrainedWeightsError(f"{source}: decoder entries {bad_dec} do not fit the U-Net's decoder")
    if dec:
        net.decoder.load_state_dict(dec, strict=False)
    problem = state_mismatch(net.encoder.state_dict(), state, "the configured U-Net encoder")
    if problem:
        raise PretrainedWeightsError(
            f"{source} do not fit the U-Net encoder (model.features, model.norm): encoder weights {problem}"
        )
    net.encoder.load_state_dict(state, strict=True)


class VolumeDataset(torch.utils.data.Dataset):
    """Whole labelled volumes for validation/test: one item per volume."""

    def __init__(self, volumes: list) -> None:
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v = self.volumes[i]
        return {"image": v.image, "label": v.label, "spacing": torch.tensor(v.spacing), "index": i}


class SegmentationModule(FederatedModule):
    """2D U-Net fine-tuned on labelled slices, validated on whole volumes (3D Dice per structure).

    Args:
        features: U-Net encoder channels per level (must match pre-training).
        norm: U-Net normalisation, ``instance`` or ``batch`` (must match pre-training).
        num_classes: output classes (ACDC: background, RV, Myo, LV).
        pretrained: ``encoder.pt`` or a federated pre-training checkpoint; ``None``: random init.
            A path with ``{client}`` (e.g. ``runs/local_cl/encoders/client{client}.pt``) gives each
            client its own encoder (local fine-tuning after local pre-training).
        freeze_encoder_epochs: keep the encoder frozen for this many epochs (per client Trainer).
        encoder_lr_scale: the encoder's learning rate as a multiple of the optimiser's (the rest
            of the U-Net trains at the full rate); below 1 keeps more of a pre-trained encoder.
        loss: segmentation loss (MONAI ``DiceCELoss`` on softmax / one-hot labels by default).
        optimizer: the optimiser factory.
        scheduler: an optional LR scheduler factory.
        eval_batch_size: slices per forward pass when predicting a volume.
        semi_supervised: also train on the client's own unlabelled slices (``UniMatch``,
            ``MeanTeacher``, ``BCP``; ``None``: labelled slices only). Its state (a teacher) is
            the client's own, kept across rounds and never averaged.
        scored: what validation, ``test`` and ``predict`` score: ``student`` (the trained U-Net)
            or ``teacher`` (the EMA teacher of ``MeanTeacher`` / ``BCP``, the usual choice of
            mean-teacher methods: an average of the student's last steps, chosen without
            looking at any test patient).
        lr_schedule: ``constant``, or ``poly``: every parameter group's rate times
            ``(1 - step / steps)^0.9`` over the client's whole fine-tuning (all its rounds;
            UniMatch's and BCP's schedule). Not with ``scheduler``.
    """

    global_prefixes = ("net.",)

    def scored_net(self) -> nn.Module:
        """The student, or with ``scored: teacher`` the plug-in's EMA teacher."""
        return self.semi.teacher if self.scored == "teacher" else self.net

    @property
    def scores_client_state(self) -> bool:
        """Whether the scored network is client state (a teacher): ``test`` then loads each
        client's state beside its weights."""
        return self.scored == "teacher"

    def __init__(
        self,
        features: list[int] = list(DEFAULT_FEATURES),  # noqa: B006 (shown by --print_config; never mutated)
        norm: str = "instance",
        num_classes: int = 4,
        pretrained: str | None = None,
        freeze_encoder_epochs: int = 0,
        encoder_lr_scale: float = 1.0,
        loss: nn.Module = lazy_instance(DiceCELoss, to_onehot_y=True, softmax=True),
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        eval_batch_size: int = 32,
        semi_supervised: SemiSupervised | None = None,
        scored: str = "student",
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__()
        if not features or any(int(f) < 1 for f in features):
            raise ValueError(f"features must be a non-empty list of channel counts >= 1, got {features}")
        if num_classes < 2 or eval_batch_size < 1 or freeze_encoder_epochs < 0:
            raise ValueError(
                f"num_classes must be >= 2, eval_batch_size >= 1 and freeze_encoder_epochs >= 0, got {num_classes}, "
                f"{eval_batch_size}, {freeze_encoder_epochs}"
            )
        self.save_hyperparameters(ignore=["loss", "optimizer", "scheduler", "semi_supervised"])
        self.net = UNet(1, num_classes, features, norm)
        if pretrained:  # per-client paths are checked here with client 0's file
            first = pretrained.replace("{client}", "0")
            load_encoder(self.net, encoder_state_from_file(first), f"pretrained weights {first}")
        self.loss_fn = copy.deepcopy(loss)  # a config default instance is shared; never mutate it
        check_optimizer(optimizer, scheduler)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.freeze_encoder_epochs, self.eval_batch_size = freeze_encoder_epochs, eval_batch_size
        self.pretrained = pretrained
        if encoder_lr_scale < 0:
            raise ValueError(f"encoder_lr_scale must be >= 0, got {encoder_lr_scale}")
        self.encoder_lr_scale = encoder_lr_scale
        self.semi = copy.deepcopy(semi_supervised)  # a config instance may be shared
        if self.semi is not None:
            self.semi.attach(self.net)
        if scored not in SCORED:
            raise ValueError(f"scored must be one of {SCORED}, got {scored!r}")
        if scored == "teacher" and getattr(self.semi, "teacher", None) is None:
            raise ValueError(
                "scored: teacher scores a semi-supervised plug-in's EMA teacher (MeanTeacher, BCP); "
                f"{type(self.semi).__name__ if self.semi is not None else 'no plug-in'} has none"
            )
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if lr_schedule != "constant" and scheduler is not None:
            raise ValueError(f"lr_schedule {lr_schedule!r} and model.scheduler both set the rate: keep one")
        self.scored, self.lr_schedule = scored, lr_schedule
        self._base_lrs: list[float] = []
        #: on-device weak augmentation of the unlabelled slices (``data.augment_on: device``)
        self.unlabelled_augment: Any = None
        #: the epoch means of the validation / test volume metrics (torchmetrics: no state-dict entries)
        self.volume_means = nn.ModuleDict(
            {f"{p}_{k}": MeanMetric(nan_strategy="ignore") for p in ("val", "test") for k in METRIC_KEYS}
        )

    @property
    def input_multiple(self) -> int:
        return self.net.encoder.downsampling

    @property
    def per_client_init(self) -> bool:
        return bool(self.pretrained) and "{client}" in self.pretrained

    def client_initial_weights(self, client: int, global_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With a ``{client}`` pretrained path: the global weights with this client's encoder."""
        if not self.per_client_init:
            return global_weights
        path = self.pretrained.replace("{client}", str(client))
        self.load_global_state(global_weights)
        load_encoder(self.net, encoder_state_from_file(path), f"pretrained weights {path}")
        return {k: v.cpu() for k, v in self.global_state().items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        frozen = self.current_epoch < self.freeze_encoder_epochs
        for p in self.net.encoder.parameters():
            p.requires_grad_(not frozen)

    def init_client_state(self) -> None:
        """A fresh client's plug-in state (a mean teacher) starts from the current weights."""
        if self.semi is not None:
            self.semi.reset(self.net)

    @property
    def semi_step(self) -> float:
        """Optimiser steps of this client's fine-tuning so far (rounds before this one included),
        what the unlabelled weight ramps, the teacher's EMA warms up and the poly rate decays over."""
        if self._trainer is None:
            return 0
        per_round = self.steps_of_fit
        return (self.round_progress[0] * per_round if per_round != float("inf") else 0) + self.step_in_fit

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """``lr_schedule: poly``: the rate of the coming step from the client's step count alone
        (no scheduler state to carry across rounds; a resumed run gets the same rates)."""
        if self.lr_schedule != "poly":
            return
        total = self.round_progress[1] * self.steps_of_fit
        factor = 1.0 if total == float("inf") else max(0.0, 1.0 - self.semi_step / total) ** 0.9
        for group, base in zip(self.trainer.optimizers[0].param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if isinstance(batch, dict) and "u_image" in batch and batch["u_image"].dim() == 5:
            batch = dict(batch)  # [B, ratio, 1, H, W] -> [B * ratio, 1, H, W]
            batch["u_image"], batch["u_seed"] = batch["u_image"].flatten(0, 1), batch["u_seed"].flatten()
            if self.unlabelled_augment is not None:
                batch["u_image"], _ = self.unlabelled_augment(batch["u_image"], batch["u_seed"])
        return batch

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        bs = batch["image"].shape[0]
        if self.semi is None or "u_image" not in batch:
            loss = self.loss_fn(self.net(batch["image"]), batch["label"])
            self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=bs)
            return loss
        out = self.semi(self.net, self.loss_fn, batch["image"], batch["label"], batch["u_image"], batch["u_seed"])
        w = self.semi.weight_at(self.semi_step)
        loss = out["sup"] + w * out["unsup"]
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=bs)
        self.log("train/unsup_weight", w, on_step=False, on_epoch=True, batch_size=bs)
        for k, v in out.items():
            self.log(f"train/{k}", v.detach(), on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.stepped_since_last_call() and self.semi is not None:  # a teacher follows optimiser steps
            self.semi.after_step(self.net, int(self.semi_step) - 1)  # the step just taken

    def _volume_step(self, batch: dict[str, Any], prefix: str) -> dict[str, float]:
        """One whole volume: MONAI's Dice and HD95, averaged over the epoch's volumes by
        torchmetrics ``MeanMetric`` (nan HD95 skipped) and logged as ``{prefix}/<metric>``."""
        pred = predict_volume(self.scored_net(), batch["image"], self.eval_batch_size)
        m = volume_metrics(pred.cpu(), batch["label"].cpu(), tuple(float(s) for s in batch["spacing"]))
        for k, v in m.items():
            mean = self.volume_means[f"{prefix}_{k}"]
            mean.update(torch.tensor(v, dtype=torch.float64))
            self.log(f"{prefix}/{k}", mean, on_step=False, on_epoch=True, batch_size=1)
        return m

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._volume_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._volume_step(batch, "test")

    def configure_optimizers(self) -> Any:
        enc = [p for n, p in self.named_parameters() if n.startswith("net.encoder.")]
        rest = [p for n, p in self.named_parameters() if n.startswith("net.") and not n.startswith("net.encoder.")]
        opt = self.optimizer_factory([{"params": enc}, {"params": rest}])
        opt.param_groups[0]["lr"] *= self.encoder_lr_scale
        self._base_lrs = [g["lr"] for g in opt.param_groups]
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler_factory(opt)}

    # ---------------------------------------------------------- federation
    def train_loader(self, datamodule: Any, client: int, seed: int) -> DataLoader:
        self.attach_augment(datamodule)
        return datamodule.finetune_loader(client, seed, unlabelled_ratio=self.semi.ratio if self.semi else 0)

    def attach_augment(self, datamodule: Any) -> None:
        """The datamodule's on-device augmentation of labelled and (semi-supervised) unlabelled slices."""
        self.batch_augment = self.augment_of(datamodule, "finetune")
        self.unlabelled_augment = self.augment_of(datamodule, "unlabelled") if self.semi else None

    def val_loader(self, datamodule: Any, client: int) -> DataLoader | None:
        vols = datamodule.validation_volumes(client)
        return DataLoader(VolumeDataset(vols), batch_size=None) if vols else None

    def check_data(self, datamodule: Any, client_steps: int | None, console: Any) -> None:
        """Every client has labelled training scans (and unlabelled ones for a semi-supervised
        plug-in); prints the ``fine-tuning:`` lines, and warns when the run ends before the
        unlabelled weight's ramp does."""
        lines = datamodule.check_finetune(unlabelled=self.semi is not None)
        console.print("fine-tuning (labelled / unlabelled training scans):", markup=False, highlight=False)
        for line in lines:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        if not any(datamodule.validation_volumes(c) for c in range(datamodule.num_clients)):
            console.print("  no labelled validation scan: val/* is not measured (data.val_fraction, data.cv_folds)")
        warning = self.semi.ramp_warning(client_steps) if self.semi is not None else None
        if warning:
            console.print(f"[yellow]warning: {warning}[/]", soft_wrap=True)

    def num_samples(self, datamodule: Any, client: int) -> int:
        return len(datamodule.labelled_volumes(client))
