"""What ``federation.privacy`` does inside one client's round, in one place: the client's secret
noise seed (kept in its own state, never sent, so a resumed run repeats its noise), the DP
payload of vectors taken from the round's global model before training, and the clipped,
noised weight update. The client step calls it at those three points and knows nothing else of
privacy."""

from __future__ import annotations

from typing import Any

import torch

from fcl_lightning.fcl.memory_bank import BankEntries
from fcl_lightning.privacy.config import Privacy
from fcl_lightning.privacy.mechanism import noise_generator, private_update, secret

#: the client state's entry holding its secret noise seed (never sent: client state stays on the site)
PRIVACY_SECRET = "privacy_secret"


class ClientPrivacy:
    """``privacy`` (``None``: off) for ``round_idx`` of a client whose saved state is ``state``."""

    def __init__(self, privacy: Privacy | None, state: dict[str, Any] | None, round_idx: int) -> None:
        self.privacy, self.round = privacy, int(round_idx)
        self.noise_seed = None if privacy is None else int((state or {}).get(PRIVACY_SECRET, secret()))

    def features(
        self, module: Any, datamodule: Any, client: int, per_partition: int | None, sample_seed: int
    ) -> BankEntries | None:
        """The DP vectors to share (``None`` when the vectors are not private): embedded by the
        round's global model, before training (see :class:`~fcl_lightning.privacy.config.Privacy`)."""
        if self.privacy is None or not self.privacy.features:
            return None
        return module.export_private_features(
            datamodule,
            client,
            per_partition,
            torch.Generator().manual_seed(sample_seed),
            noise_generator(self.noise_seed, self.round, 0),
            self.privacy,
        )

    def update(self, update: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights to send: clipped and noised against the round's ``start`` when weights are private."""
        if self.privacy is None or not self.privacy.weights:
            return update
        p = self.privacy
        return private_update(
            update, start, p.weights_clip, p.weights_sigma, noise_generator(self.noise_seed, self.round, 1)
        )

    def keep(self, client_state: dict[str, Any]) -> dict[str, Any]:
        """``client_state`` with the secret noise seed in it (what the next round reads back)."""
        if self.noise_seed is not None:
            client_state[PRIVACY_SECRET] = torch.tensor(self.noise_seed, dtype=torch.long)
        return client_state
