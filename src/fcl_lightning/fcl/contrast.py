"""The contrastive pre-training step without any framework: the networks, the objective and, for
momentum methods, the momentum copies and the tagged memory banks, with ``step(batch)``.

As solo-learn splits its methods, :class:`ContrastModel` is the base without a momentum encoder
(SimCLR, SwAV, rotation, Chaitanya's G_D: they carry none) and :class:`MomentumContrastModel` adds
the momentum encoder and head (FCL, MoCo). Memory banks exist when the objective contrasts
against them (``objective.uses_bank``). ``lit/pretrain.py`` wires a model to Lightning and
``experiments/bench_harness.py`` (``experiments/bench_pretrain.py``) drives the same step in a bare PyTorch loop.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from monai.networks.utils import eval_mode
from torch import nn

from fcl_lightning.fcl.exchange import embed_slices, subsample_per_partition
from fcl_lightning.fcl.memory_bank import BankEntries, MemoryBank
from fcl_lightning.fcl.momentum import make_momentum_copy, update_momentum
from fcl_lightning.fcl.objectives import PretrainObjective, PretrainStep
from fcl_lightning.models.encoder import ProjectionHead, UNetEncoder
from fcl_lightning.models.unet import decode_skips, decoder_blocks


class ContrastModel(nn.Module):
    """Encoder + projection head (+ the U-Net's first ``decoder_levels`` decoder blocks) and the
    objective; keys come from the main encoder without gradient.

    Args:
        features, norm: encoder channels per level and normalisation (as the segmentation U-Net's).
        proj_hidden, proj_dim: projection head sizes.
        head_norm: ``batch`` (default): a BatchNorm in the head's hidden layer; ``none``: a plain head (``ProjectionHead``).
        objective: the loss plug-in (copied: a config's default instance is shared).
        decoder_levels: decoder blocks to pre-train with the encoder (objectives with a dense term).
        local_bank_size, remote_bank_size: memory bank capacities (only if the objective uses banks).
    """

    #: whether keys come from momentum copies (a client's own state, kept across rounds)
    has_momentum = False

    def __init__(
        self,
        features: list[int],
        norm: str,
        proj_hidden: int,
        proj_dim: int,
        objective: PretrainObjective,
        decoder_levels: int = 0,
        local_bank_size: int = 1024,
        remote_bank_size: int = 4096,
        head_norm: str = "batch",
    ) -> None:
        super().__init__()
        self.encoder = UNetEncoder(1, features, norm)
        self.head = ProjectionHead(self.encoder.features[-1], 4, proj_hidden, proj_dim, head_norm)
        self.objective = copy.deepcopy(objective)
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
        self.proj_dim = proj_dim
        self.uses_bank = self.objective.uses_bank
        if self.uses_bank:
            k = int(getattr(self.objective, "num_negatives", 0) or 0)
            if k > local_bank_size + remote_bank_size:
                raise ValueError(
                    f"the objective samples num_negatives={k} from the memory banks, which hold at most "
                    f"local_bank_size + remote_bank_size = {local_bank_size + remote_bank_size}"
                )
            if min(local_bank_size, remote_bank_size) < 1:
                raise ValueError(
                    f"local_bank_size and remote_bank_size must be >= 1, got {local_bank_size}, {remote_bank_size}"
                )
            self.local_bank = MemoryBank(local_bank_size, proj_dim)  # this client's keys
            self.remote_bank = MemoryBank(remote_bank_size, proj_dim)  # vectors of other clients
        self.round_keys = 0  # keys enqueued since the last start_round (what exchange_source="keys" shares)

    # ---------------------------------------------------------------- nets
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Queries: main encoder + head, L2-normalised."""
        return F.normalize(self.head(self.encoder(x)[-1]), dim=1)

    @torch.no_grad()
    def embed_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys: here the main encoder + head without gradient, L2-normalised."""
        return F.normalize(self.head(self.encoder(x)[-1]), dim=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The main encoder's bottleneck feature map (what rotation prediction classifies)."""
        return self.encoder(x)[-1]

    def embed_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the main encoder: the queries and the last pre-trained decoder block's map."""
        skips = self.encoder(x)
        return F.normalize(self.head(skips[-1]), dim=1), decode_skips(self.decoder, skips)

    def probe_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and the pooled bottleneck from one encoder pass (what the monitors probe)."""
        b = self.encoder(x)[-1]
        return F.normalize(self.head(b), dim=1), b.mean(dim=(2, 3))

    # ---------------------------------------------------------------- step
    def bank(self, device: torch.device) -> BankEntries:
        """``Q``: the local and remote banks as the objective sees them (empty without banks)."""
        if not self.uses_bank:
            return BankEntries.empty(self.proj_dim, device)
        return BankEntries.cat([self.local_bank.entries(), self.remote_bank.entries()], self.proj_dim)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One training step's loss and metrics (``loss`` is what to backpropagate); the keys the
        objective returns go into the local bank."""
        x_q = batch["image"]
        out, keys = self.objective.step(
            PretrainStep(
                (x_q, batch.get("image_k", x_q)),
                batch["partition"],
                batch["volume"],
                self.embed,
                self.embed_keys,
                self.encode,
                self.bank(x_q.device),
                self.embed_decode if self.decoder is not None else None,
            )
        )
        if keys is not None and self.uses_bank:
            self.local_bank.enqueue(BankEntries(keys, batch["partition"], batch["client"]))
            self.round_keys += len(keys)
        return out

    def after_step(self, momentum: float) -> None:
        """After the optimiser step (the momentum update, for momentum models)."""

    # ---------------------------------------------------------- federation
    def start_round(self) -> None:
        self.round_keys = 0

    def reset_client(self) -> None:
        """A new client: empty banks (and momentum nets equal to the current global nets)."""
        if self.uses_bank:
            self.local_bank.reset()
            self.remote_bank.reset()

    def receive(self, entries: BankEntries | None) -> None:
        """The vectors other clients shared become the remote bank."""
        if not self.uses_bank:
            return
        if entries is None:
            self.remote_bank.reset()
        else:  # unit vectors again (DP-noised vectors arrive as noised; for the others a no-op)
            self.remote_bank.replace(
                BankEntries(F.normalize(entries.vectors, dim=1), entries.partitions, entries.clients)
            )

    @torch.no_grad()
    def shared_features(
        self,
        volumes: list[torch.Tensor],
        num_partitions: int,
        client: int,
        per_partition: int | None,
        generator: torch.Generator,
        source: str = "embed",
    ) -> BankEntries:
        """What this client shares after a round: ``embed`` its slices with the key encoder (the
        paper), or the ``keys`` this round already enqueued; at most ``per_partition`` each."""
        if source == "keys":
            bank = self.local_bank.entries()
            n = min(len(bank), self.round_keys)  # the newest n entries are this round's keys
            vectors, partitions = bank.vectors[len(bank) - n :].cpu(), bank.partitions[len(bank) - n :].cpu()
            recent = BankEntries(vectors, partitions, torch.full_like(partitions, client))
            return subsample_per_partition(recent, num_partitions, per_partition, generator)
        if source != "embed":
            raise ValueError(f"exchange_source must be 'embed' or 'keys', got {source!r}")
        with eval_mode(self):
            return embed_slices(self.embed_keys, volumes, num_partitions, client, per_partition, generator)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The main encoder's plain state dict (and the pre-trained decoder blocks under
        ``decoder.``): what ``encoder.pt`` holds and the U-Net loads."""
        out = {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}
        if self.decoder is not None:
            out.update({f"decoder.{k}": v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()})
        return out


class MomentumContrastModel(ContrastModel):
    """:class:`ContrastModel` + momentum (EMA) copies of the encoder and head that embed the keys
    (MoCo; FCL's key encoder). After every optimiser step, ``after_step(m)`` moves them by ``1 - m``."""

    has_momentum = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.momentum_encoder = make_momentum_copy(self.encoder)
        self.momentum_head = make_momentum_copy(self.head)

    @torch.no_grad()
    def embed_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys: momentum encoder + head, L2-normalised."""
        return F.normalize(self.momentum_head(self.momentum_encoder(x)[-1]), dim=1)

    def after_step(self, momentum: float) -> None:
        update_momentum(self.encoder, self.momentum_encoder, momentum)
        update_momentum(self.head, self.momentum_head, momentum)

    def reset_client(self) -> None:
        self.momentum_encoder.load_state_dict(self.encoder.state_dict())
        self.momentum_head.load_state_dict(self.head.state_dict())
        super().reset_client()


def contrast_model(
    use_momentum: bool, local_bank_size: int = 1024, remote_bank_size: int = 4096, **kwargs
) -> ContrastModel:
    """The model a method needs: momentum copies if ``use_momentum``, banks if its objective uses them."""
    return (MomentumContrastModel if use_momentum else ContrastModel)(
        local_bank_size=local_bank_size, remote_bank_size=remote_bank_size, **kwargs
    )
