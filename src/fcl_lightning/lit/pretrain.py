"""Stage 1: contrastive pre-training of the U-Net encoder (momentum encoder, memory banks,
partition-aware objective). The objective is a plug-in; this module only wires the parts."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance
from lightning.pytorch.cli import OptimizerCallable

from fcl_lightning.fcl.exchange import embed_slices, subsample_per_partition
from fcl_lightning.fcl.memory_bank import BankEntries, MemoryBank
from fcl_lightning.fcl.momentum import cosine_schedule, make_momentum_copy, update_momentum
from fcl_lightning.fcl.objectives import FCLObjective, PretrainObjective, PretrainStep
from fcl_lightning.lit.base import FederatedModule
from fcl_lightning.models.encoder import DEFAULT_FEATURES, ProjectionHead, UNetEncoder
from fcl_lightning.models.unet import decode_skips, decoder_blocks


class ContrastivePretrainModule(FederatedModule):
    """Main encoder + head (trained, federated), momentum copy + local/remote banks (per client).

    Args:
        features: encoder channels per level (must match the segmentation U-Net's).
        norm: ``instance`` or ``batch``.
        proj_hidden, proj_dim: projection head sizes (Chaitanya: 1024, 128).
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
        self.save_hyperparameters(ignore=["objective", "optimizer"])
        self.encoder = UNetEncoder(1, features, norm)
        self.head = ProjectionHead(self.encoder.features[-1], 4, proj_hidden, proj_dim)
        self.objective = copy.deepcopy(objective)  # a config default instance is shared; never mutate it
        self.objective.build(self.encoder.features[-1], proj_dim)
        if not 0 <= decoder_levels < len(self.encoder.features):
            raise ValueError(f"decoder_levels must be in [0, {len(self.encoder.features) - 1}], got {decoder_levels}")
        if self.objective.needs_decoder and decoder_levels == 0:
            raise ValueError(
                f"{type(self.objective).__name__} trains decoder blocks: set model.init_args.decoder_levels >= 1"
            )
        self.decoder = decoder_blocks(self.encoder.features, norm, levels=decoder_levels) if decoder_levels else None
        if decoder_levels:
            self.objective.build_decoder(self.encoder.features[-1 - decoder_levels])
        k = int(getattr(self.objective, "num_negatives", 0) or 0)
        if self.objective.uses_bank and k > local_bank_size + remote_bank_size:
            raise ValueError(
                f"the objective samples num_negatives={k} from the memory banks, which hold at most "
                f"local_bank_size + remote_bank_size = {local_bank_size + remote_bank_size}"
            )
        if min(local_bank_size, remote_bank_size) < 1:
            raise ValueError(
                f"local_bank_size and remote_bank_size must be >= 1, got {local_bank_size}, {remote_bank_size}"
            )
        self.use_momentum = use_momentum
        self.momentum_encoder = make_momentum_copy(self.encoder)
        self.momentum_head = make_momentum_copy(self.head)
        self.local_bank = MemoryBank(local_bank_size, proj_dim)
        self.remote_bank = MemoryBank(remote_bank_size, proj_dim)
        self.momentum, self.momentum_end = momentum, momentum_end
        self.optimizer_factory = optimizer
        self.proj_dim = proj_dim
        self._round_keys = 0

    @property
    def input_multiple(self) -> int:
        return self.encoder.downsampling

    # ---------------------------------------------------------------- nets
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Queries: main encoder + head, L2-normalised."""
        return F.normalize(self.head(self.encoder(x)[-1]), dim=1)

    @torch.no_grad()
    def embed_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys: momentum encoder + head (or the main one without gradient), L2-normalised."""
        if not self.use_momentum:
            return F.normalize(self.head(self.encoder(x)[-1]), dim=1)
        return F.normalize(self.momentum_head(self.momentum_encoder(x)[-1]), dim=1)

    def current_momentum(self) -> float:
        if self.momentum_end is None:
            return self.momentum
        r, total = self.round_progress
        steps = max(1, self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        step_in_round = self.trainer.global_step if self._trainer is not None else 0
        return cosine_schedule(int(1000 * (r + step_in_round / steps)), 1000 * total, self.momentum, self.momentum_end)

    @property
    def shares_features(self) -> bool:
        """FCL exchanges features; objectives without memory banks (the baselines) do not."""
        return self.objective.uses_bank

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The main encoder's bottleneck feature map (what rotation prediction classifies)."""
        return self.encoder(x)[-1]

    def probe_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and the pooled bottleneck from one encoder pass (what the monitors probe)."""
        b = self.encoder(x)[-1]
        return F.normalize(self.head(b), dim=1), b.mean(dim=(2, 3))

    def embed_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the main encoder: the queries and the last pre-trained decoder block's map."""
        skips = self.encoder(x)
        return F.normalize(self.head(skips[-1]), dim=1), decode_skips(self.decoder, skips)

    # ------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x_q = batch["image"]
        x_k = batch.get("image_k", x_q)
        if self.objective.uses_bank:
            bank = BankEntries.cat([self.local_bank.entries(), self.remote_bank.entries()], self.proj_dim)
        else:
            bank = BankEntries.empty(self.proj_dim, x_q.device)
        out, keys = self.objective.step(
            PretrainStep(
                (x_q, x_k),
                batch["partition"],
                batch["volume"],
                self.embed,
                self.embed_keys,
                self.encode,
                bank,
                self.embed_decode if self.decoder is not None else None,
            )
        )
        if keys is not None:
            self.local_bank.enqueue(BankEntries(keys, batch["partition"], batch["client"]))
            self._round_keys += len(keys)
        bs = x_q.shape[0]
        for name, value in out.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=bs)
        self.log("train/local_bank_fill", self.local_bank.fill, on_step=False, on_epoch=True, batch_size=bs)
        self.log("train/remote_bank_fill", self.remote_bank.fill, on_step=False, on_epoch=True, batch_size=bs)
        return out["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.use_momentum:
            m = self.current_momentum()
            update_momentum(self.encoder, self.momentum_encoder, m)
            update_momentum(self.head, self.momentum_head, m)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for n, p in self.named_parameters() if self._is_global(n) and p.requires_grad]
        return self.optimizer_factory(params)

    # ---------------------------------------------------------- federation
    def init_client_state(self) -> None:
        """A new client starts with momentum nets equal to the global nets and empty banks."""
        self.momentum_encoder.load_state_dict(self.encoder.state_dict())
        self.momentum_head.load_state_dict(self.head.state_dict())
        self.local_bank.reset()
        self.remote_bank.reset()

    def train_loader(self, datamodule: Any, client: int, seed: int):
        return datamodule.pretrain_loader(client, seed)

    def receive_features(self, entries: BankEntries | None) -> None:
        if entries is None:
            self.remote_bank.reset()
        else:
            self.remote_bank.replace(entries)

    def on_train_start(self) -> None:
        super().on_train_start()
        self._round_keys = 0  # keys enqueued this round (what exchange_source="keys" shares)

    @torch.no_grad()
    def export_features(
        self, datamodule: Any, client: int, per_partition: int | None, generator: torch.Generator, source: str = "embed"
    ) -> BankEntries:
        if source == "keys":
            bank = self.local_bank.entries()
            n = min(len(bank), self._round_keys)  # the newest n entries are this round's keys
            vectors, partitions = bank.vectors[len(bank) - n :].cpu(), bank.partitions[len(bank) - n :].cpu()
            recent = BankEntries(vectors, partitions, torch.full_like(partitions, client))
            return subsample_per_partition(recent, datamodule.num_partitions, per_partition, generator)
        if source != "embed":
            raise ValueError(f"exchange_source must be 'embed' or 'keys', got {source!r}")
        was_training = self.training
        self.eval()
        vols = [v.image.to(self.device) for v in datamodule.train[client]]
        out = embed_slices(self.embed_keys, vols, datamodule.num_partitions, client, per_partition, generator)
        self.train(was_training)
        return out

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The main encoder's plain state dict (and the pre-trained decoder blocks under
        ``decoder.``): what ``encoder.pt`` holds and the U-Net loads."""
        out = {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}
        if self.decoder is not None:
            out.update({f"decoder.{k}": v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()})
        return out
