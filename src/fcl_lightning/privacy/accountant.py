"""The privacy loss of a run, from Google's ``dp-accounting`` (the RDP or the PLD accountant; no
hand-written accounting). A round releases ``mechanisms`` Gaussian mechanisms per client (the
exchanged vectors, the weight update), each with noise multiplier ``z`` relative to its own L2
sensitivity; the run composes them over its rounds. No amplification by sampling is claimed (the
exchanged subset is drawn per partition and without replacement, not by Poisson sampling), so
the figures are upper bounds."""

from __future__ import annotations

import math
from typing import Literal

from fcl_lightning.errors import ConfigError

Accounting = Literal["rdp", "pld"]
#: noise multipliers the calibration searches between, per accountant (the PLD accountant's
#: distributions grow without bound as the noise vanishes: below 0.3 they fill the memory)
Z_RANGE = {"rdp": (1e-2, 1e4), "pld": (0.3, 1e4)}


def _dp():
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - the [privacy] extra is in [dev]
        raise ConfigError(
            "federation.privacy needs Google's dp-accounting: pip install 'fcl-lightning[privacy]'"
        ) from exc
    return dp_accounting


def run_event(noise_multiplier: float, rounds: int, mechanisms: int = 1):
    """The ``DpEvent`` of ``rounds`` rounds of ``mechanisms`` Gaussian releases each."""
    dp = _dp()
    return dp.SelfComposedDpEvent(dp.GaussianDpEvent(noise_multiplier), rounds * mechanisms)


def fresh_accountant(kind: Accounting = "rdp"):
    dp = _dp()
    if kind == "rdp":
        return dp.rdp.RdpAccountant()
    if kind == "pld":
        return dp.pld.PLDAccountant()
    raise ValueError(f"accountant must be 'rdp' or 'pld', got {kind!r}")


def epsilon(noise_multiplier: float, rounds: int, delta: float, mechanisms: int = 1, kind: Accounting = "rdp") -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds (0 rounds: 0)."""
    if rounds == 0 or mechanisms == 0:
        return 0.0
    if noise_multiplier < Z_RANGE[kind][0]:
        raise ConfigError(
            f"federation.privacy.noise_multiplier={noise_multiplier:g} is below what the {kind} accountant "
            f"handles ({Z_RANGE[kind][0]:g})"
        )
    acc = fresh_accountant(kind)
    acc.compose(run_event(noise_multiplier, rounds, mechanisms))
    return float(acc.get_epsilon(delta))


#: what a run has released so far: ``(noise multiplier, number of Gaussian releases)`` pairs;
#: a noise multiplier of ``None`` is a release without noise (privacy turned off on a resume)
Releases = list[tuple[float | None, int]]


def spent_event(spent: Releases):
    """The ``DpEvent`` of the releases ``spent`` (all noised)."""
    dp = _dp()
    return dp.ComposedDpEvent([dp.SelfComposedDpEvent(dp.GaussianDpEvent(z), n) for z, n in spent if n])


def spent_epsilon(spent: Releases, delta: float, kind: Accounting = "rdp") -> float:
    """Epsilon at ``delta`` of the releases ``spent``, composed; ``inf`` once one was not noised."""
    if any(z is None for z, n in spent if n):
        return math.inf
    if not any(n for _, n in spent):
        return 0.0
    acc = fresh_accountant(kind)
    acc.compose(spent_event(spent))
    return float(acc.get_epsilon(delta))


def calibrate(
    target_epsilon: float,
    delta: float,
    rounds: int,
    mechanisms: int = 1,
    kind: Accounting = "rdp",
    spent: Releases = (),
) -> float:
    """The smallest noise multiplier for ``rounds`` more rounds such that they, composed with the
    releases already ``spent`` (a resumed run's), stay within ``target_epsilon`` at ``delta``
    (``dp_accounting.calibrate_dp_mechanism``); a clear error if none in :data:`Z_RANGE` does."""
    dp = _dp()
    lo, hi = Z_RANGE[kind]
    spent = [(z, n) for z, n in spent if n]
    if any(z is None for z, _ in spent):
        raise ConfigError("federation.privacy: the run already released un-noised vectors or weights: no epsilon holds")

    def total(z: float) -> float:
        if not spent:
            return epsilon(z, rounds, delta, mechanisms, kind)
        return spent_epsilon([*spent, (z, rounds * mechanisms)], delta, kind)

    if total(hi) > target_epsilon:
        done = f" after the {sum(n for _, n in spent)} release(s) already spent" if spent else ""
        raise ConfigError(
            f"federation.privacy: epsilon={target_epsilon} at delta={delta} cannot be reached over {rounds} rounds "
            f"of {mechanisms} release(s){done} even with noise multiplier {hi:g}: raise epsilon or delta, or run "
            "fewer rounds"
        )
    if total(lo) <= target_epsilon:
        return lo

    def event(z: float):
        return (
            run_event(z, rounds, mechanisms)
            if not spent
            else dp.ComposedDpEvent([spent_event(spent), run_event(z, rounds, mechanisms)])
        )

    z = dp.calibrate_dp_mechanism(
        lambda: fresh_accountant(kind),
        event,
        target_epsilon,
        delta,
        dp.ExplicitBracketInterval(lo, hi),
        tol=1e-4,
    )
    z = float(z)
    # Brent's method returns a point within tol of the optimum: step up until the budget holds
    while total(z) > target_epsilon:
        z *= 1 + 1e-4
    if not math.isfinite(z):  # pragma: no cover - guarded by the range check above
        raise ConfigError("federation.privacy: the noise calibration failed")
    return z
