"""Stage 1: contrastive pre-training of the U-Net encoder, the Lightning wiring of the
framework-free model in ``fcl/contrast.py`` (networks, momentum copies, memory banks, step)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import OptimizerCallable
from monai.networks.utils import eval_mode

from fcl_lightning.fcl.contrast import contrast_model
from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.fcl.momentum import cosine_schedule
from fcl_lightning.fcl.objectives import FCLObjective, PretrainObjective
from fcl_lightning.lit.base import FederatedModule, check_optimizer
from fcl_lightning.models.encoder import DEFAULT_FEATURES
from fcl_lightning.privacy.config import Privacy
from fcl_lightning.privacy.mechanism import private_features


class ContrastivePretrainModule(FederatedModule):
    """Main encoder + head (trained, federated), momentum copy + local/remote banks (per client;
    only what the method uses: the baselines carry no momentum copy and no banks).

    Args:
        features: encoder channels per level (must match the segmentation U-Net's).
        norm: ``instance`` or ``batch``.
        proj_hidden: hidden size of the projection head (Chaitanya: 1024).
        proj_dim: output size of the projection head (Chaitanya: 128).
        head_norm: ``batch`` (default) puts a BatchNorm in the head's hidden layer, which keeps
            FCL's embedding from collapsing in its first rounds; ``none`` is Chaitanya's plain
            head (README, "The FCL objective").
        objective: the pre-training loss plug-in (``FCLObjective`` by default).
        momentum: EMA coefficient m of the momentum encoder.
        momentum_end: if set, m follows a cosine schedule from ``momentum`` to this value over the run.
        use_momentum: ``False`` embeds keys with the main encoder (no-grad) instead (ablation).
        decoder_levels: also hold (and pre-train, federate and export) the U-Net's first this many
            decoder blocks; objectives with a dense term need them (``DenseFCLObjective``).
        local_bank_size: capacity of the local memory bank.
        remote_bank_size: capacity of the remote bank (vectors received from other clients).
        optimizer: optimiser factory (``class_path`` of any ``torch.optim`` class).
    """

    stage = "pretrain"

    global_prefixes = ("encoder.", "decoder.", "head.", "objective.")
    transient_prefixes = ("remote_bank.",)

    def __init__(
        self,
        features: list[int] = list(DEFAULT_FEATURES),  # noqa: B006 (shown by --print_config; never mutated)
        norm: str = "instance",
        proj_hidden: int = 1024,
        proj_dim: int = 128,
        head_norm: Literal["none", "batch"] = "batch",
        objective: PretrainObjective = lazy_instance(FCLObjective),
        momentum: float = 0.99,
        momentum_end: float | None = None,
        use_momentum: bool = True,
        decoder_levels: int = 0,
        local_bank_size: int = 1024,
        remote_bank_size: int = 4096,
        optimizer: OptimizerCallable = torch.optim.Adam,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if momentum_end is not None and not 0.0 <= momentum_end <= 1.0:
            raise ValueError(f"momentum_end must be in [0, 1], got {momentum_end}")
        if proj_hidden < 1 or proj_dim < 1:
            raise ValueError(f"proj_hidden and proj_dim must be >= 1, got {proj_hidden}, {proj_dim}")
        if not features or any(int(f) < 1 for f in features):
            raise ValueError(f"features must be a non-empty list of channel counts >= 1, got {features}")
        if decoder_levels < 0:
            raise ValueError(f"decoder_levels must be >= 0, got {decoder_levels}")
        self.save_hyperparameters(ignore=["objective", "optimizer"])
        core = contrast_model(
            use_momentum,
            local_bank_size,
            remote_bank_size,
            features=features,
            norm=norm,
            proj_hidden=proj_hidden,
            proj_dim=proj_dim,
            objective=objective,
            decoder_levels=decoder_levels,
            head_norm=head_norm,
        )
        # the core's nets and banks under their own names (encoder., head., momentum_encoder., ...):
        # the same modules, so the core steps what Lightning moves, saves and optimises
        for name, child in core.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "core", core)  # not a second registration of the same modules
        self.use_momentum = use_momentum
        self.momentum, self.momentum_end = momentum, momentum_end
        check_optimizer(optimizer)
        self.optimizer_factory = optimizer
        self.proj_dim = proj_dim

    @property
    def input_multiple(self) -> int:
        return self.encoder.downsampling

    # ---------------------------------------------------------------- nets
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Queries: main encoder + head, L2-normalised."""
        return self.core.embed(x)

    def embed_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys: momentum encoder + head (or the main one without gradient), L2-normalised."""
        return self.core.embed_keys(x)

    def current_momentum(self) -> float:
        if self.momentum_end is None:
            return self.momentum
        r, total = self.round_progress
        steps = max(1, self.steps_of_fit) if self._trainer is not None else 1
        step_in_round = self.step_in_fit
        return cosine_schedule(int(1000 * (r + step_in_round / steps)), 1000 * total, self.momentum, self.momentum_end)

    @property
    def shares_features(self) -> bool:
        """FCL exchanges features; objectives without memory banks (the baselines) do not."""
        return self.objective.uses_bank

    def probe_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and the pooled bottleneck from one encoder pass (what the monitors probe)."""
        return self.core.probe_features(x)

    # ------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.core.step(batch)
        bs = batch["image"].shape[0]
        for name, value in out.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=bs)
        if self.core.uses_bank:
            self.log("train/local_bank_fill", self.local_bank.fill, on_step=False, on_epoch=True, batch_size=bs)
            self.log("train/remote_bank_fill", self.remote_bank.fill, on_step=False, on_epoch=True, batch_size=bs)
        return out["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # once per optimiser step (solo-learn's rule): with gradient accumulation not every batch steps
        if self.stepped_since_last_call() and self.core.has_momentum:
            self.core.after_step(self.current_momentum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for n, p in self.named_parameters() if self._is_global(n) and p.requires_grad]
        return self.optimizer_factory(params)

    # ---------------------------------------------------------- federation
    def init_client_state(self) -> None:
        """A new client starts with momentum nets equal to the global nets and empty banks."""
        self.core.reset_client()

    def train_loader(self, datamodule: Any, client: int, seed: int):
        self.batch_augment = self.augment_of(datamodule, "pretrain")
        return datamodule.pretrain_loader(client, seed)

    def receive_features(self, entries: BankEntries | None) -> None:
        self.core.receive(entries)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.core.start_round()

    def export_features(
        self, datamodule: Any, client: int, per_partition: int | None, generator: torch.Generator, source: str = "embed"
    ) -> BankEntries:
        vols = [v.image.to(self.device) for v in datamodule.train[client]] if source == "embed" else []
        return self.core.shared_features(vols, datamodule.num_partitions, client, per_partition, generator, source)

    def export_private_features(
        self,
        datamodule: Any,
        client: int,
        per_partition: int | None,
        sample_generator: torch.Generator,
        noise_generator: torch.Generator,
        privacy: Privacy,
    ) -> BankEntries:
        """The DP payload (:func:`~fcl_lightning.privacy.mechanism.private_features`): embedded by
        the main encoder and head as they are now (the round's global weights), in eval mode."""
        vols = datamodule.train[client]
        with eval_mode(self.core):
            return private_features(
                self.core.embed,
                [v.image.to(self.device) for v in vols],
                [v.record.patient for v in vols],
                datamodule.num_partitions,
                client,
                per_partition,
                privacy.feature_clip,
                privacy.feature_sigma(datamodule.num_partitions),
                sample_generator,
                noise_generator,
            )

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The main encoder's plain state dict (and the pre-trained decoder blocks under
        ``decoder.``): what ``encoder.pt`` holds and the U-Net loads."""
        return self.core.encoder_state()
