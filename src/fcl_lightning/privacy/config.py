"""``federation.privacy``: opt-in differential privacy of what a client sends (README, "What
leaves a hospital")."""

from __future__ import annotations

import math
from typing import Any, Literal

from fcl_lightning.errors import ConfigError
from fcl_lightning.privacy import accountant
from fcl_lightning.privacy.mechanism import vector_sensitivity

#: the largest delta accepted: above it a mechanism may publish one patient in a hundred outright
MAX_DELTA = 1e-2
#: the largest epsilon accepted (beyond it the bound says nothing a reader could use)
MAX_EPSILON = 100.0


class Privacy:
    """Differential privacy of what each client sends, per patient (or per slice), over the run.

    The exchanged vectors (``features``) are embedded by the global model the client received at
    the start of the round (known to every client; the client's momentum encoder has trained on
    its patients without noise, so vectors it embeds would carry them), one slice per patient and
    partition, clipped to ``feature_clip`` and noised. Each weight update (``weights``) is clipped
    to ``weights_clip`` and noised on the client, before it leaves (local DP: the server sees only
    noised updates). One noise multiplier serves both; the accountant composes every release of
    every round and the run reports epsilon at ``delta`` (``round/privacy/epsilon``, the round
    line, ``summary.json``).

    Args:
        epsilon: the run's target epsilon (the noise multiplier is computed); or ``None`` and
            ``noise_multiplier`` (epsilon is reported).
        delta: delta of the guarantee, per ``unit``.
        noise_multiplier: ``z``: the noise's standard deviation over the release's L2 sensitivity.
        features: noise the exchanged vectors (needs a method that exchanges them).
        feature_clip: L2 bound ``C`` of each vector (they are unit vectors: 1 clips nothing).
        weights: clip and noise each client's weight update.
        weights_clip: L2 bound of a client's update (weights minus the round's start weights).
        unit: ``patient`` (a patient's vectors of a round together) or ``slice``.
        accountant: ``rdp`` (Renyi DP, Mironov 2017) or ``pld`` (privacy loss distributions, tighter).
    """

    def __init__(
        self,
        epsilon: float | None = None,
        delta: float = 1e-5,
        noise_multiplier: float | None = None,
        features: bool = True,
        feature_clip: float = 1.0,
        weights: bool = False,
        weights_clip: float = 1.0,
        unit: Literal["patient", "slice"] = "patient",
        accountant: Literal["rdp", "pld"] = "rdp",
    ) -> None:
        if (epsilon is None) == (noise_multiplier is None):
            raise ConfigError("federation.privacy: give exactly one of epsilon (a target) and noise_multiplier")
        if epsilon is not None and not (0 < epsilon <= MAX_EPSILON and math.isfinite(epsilon)):
            raise ConfigError(f"federation.privacy.epsilon must be in (0, {MAX_EPSILON:g}], got {epsilon}")
        if not 0 < delta <= MAX_DELTA:
            raise ConfigError(f"federation.privacy.delta must be in (0, {MAX_DELTA:g}], got {delta}")
        if noise_multiplier is not None and not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise ConfigError(f"federation.privacy.noise_multiplier must be > 0, got {noise_multiplier}")
        if not (features or weights):
            raise ConfigError("federation.privacy protects nothing: set features and/or weights to true")
        for name, c in (("feature_clip", feature_clip), ("weights_clip", weights_clip)):
            if not (c > 0 and math.isfinite(c)):
                raise ConfigError(f"federation.privacy.{name} must be > 0, got {c}")
        if unit not in ("patient", "slice"):
            raise ConfigError(f"federation.privacy.unit must be 'patient' or 'slice', got {unit!r}")
        if accountant not in ("rdp", "pld"):
            raise ConfigError(f"federation.privacy.accountant must be 'rdp' or 'pld', got {accountant!r}")
        self.target_epsilon, self.delta, self.noise_multiplier = epsilon, delta, noise_multiplier
        self.features, self.feature_clip = features, feature_clip
        self.weights, self.weights_clip = weights, weights_clip
        self.unit, self.accountant = unit, accountant
        self.rounds: int | None = None

    @property
    def mechanisms(self) -> int:
        """Gaussian releases per client and round."""
        return int(self.features) + int(self.weights)

    def calibrate(self, rounds: int, spent: accountant.Releases = ()) -> None:
        """Fix the noise multiplier for ``rounds`` more rounds (from the target epsilon, which the
        releases already ``spent`` by a resumed run count against), or check the given one; one
        clear error if the target cannot be reached."""
        self.rounds = rounds
        if self.target_epsilon is not None:
            self.noise_multiplier = accountant.calibrate(
                self.target_epsilon, self.delta, rounds, self.mechanisms, self.accountant, spent
            )
        else:
            self.epsilon(rounds)  # a noise multiplier the accountant cannot handle fails here

    def settings(self) -> dict[str, Any]:
        """What the user set (a resume that changes any of it is refused unless allowed)."""
        return {
            "epsilon": self.target_epsilon,
            "delta": self.delta,
            "noise_multiplier": None if self.target_epsilon is not None else self.noise_multiplier,
            "features": self.features,
            "feature_clip": self.feature_clip,
            "weights": self.weights,
            "weights_clip": self.weights_clip,
            "unit": self.unit,
            "accountant": self.accountant,
        }

    def release(self) -> tuple[float, int]:
        """What one round releases per client: (noise multiplier, Gaussian releases)."""
        assert self.noise_multiplier is not None
        return float(self.noise_multiplier), self.mechanisms

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` spent by a client that sent in ``rounds`` rounds."""
        assert self.noise_multiplier is not None
        return accountant.epsilon(self.noise_multiplier, rounds, self.delta, self.mechanisms, self.accountant)

    def feature_sigma(self, num_partitions: int) -> float:
        """Standard deviation of the noise on each coordinate of an exchanged vector."""
        assert self.noise_multiplier is not None
        return self.noise_multiplier * vector_sensitivity(self.feature_clip, self.unit, num_partitions)

    @property
    def weights_sigma(self) -> float:
        """Standard deviation of the noise on each coordinate of a weight update."""
        assert self.noise_multiplier is not None
        return self.noise_multiplier * 2.0 * self.weights_clip

    def summary(
        self, rounds_done: int, num_partitions: int | None = None, spent: accountant.Releases | None = None
    ) -> dict[str, Any]:
        """What ``summary.json`` records (``spent``: every release of the run, resumes included;
        ``None``: ``rounds_done`` rounds at this noise)."""
        eps = (
            self.epsilon(rounds_done) if spent is None else accountant.spent_epsilon(spent, self.delta, self.accountant)
        )
        out: dict[str, Any] = {
            "epsilon": eps,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "unit": self.unit,
            "accountant": self.accountant,
            "rounds": rounds_done,
            "features": self.features,
            "weights": self.weights,
        }
        if self.features and num_partitions:
            out["feature_sigma"] = self.feature_sigma(num_partitions)
        if self.weights:
            out["weights_sigma"] = self.weights_sigma
        return out
