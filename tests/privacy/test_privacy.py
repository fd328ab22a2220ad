"""Differential privacy of what leaves a client: the accountant against the library's own
closed-form Gaussian figures, the clipping bound, the noise scale, one vector per patient and
partition, that nothing un-noised leaves a client (what the round's results and Flower's replies
carry), resume with the client's secret, and the config errors."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from fcl_lightning.cli import main
from fcl_lightning.errors import ConfigError
from fcl_lightning.federation.hooks import RoundHook
from fcl_lightning.privacy import accountant
from fcl_lightning.privacy.config import Privacy
from fcl_lightning.privacy.mechanism import (
    VAR_FLOOR,
    clip_rows,
    noise_generator,
    one_per_patient,
    private_features,
    private_update,
    update_norm,
    vector_sensitivity,
)

pytest.importorskip("dp_accounting")


def analytic_gaussian_delta(eps: float, mu: float) -> float:
    """delta(eps) of a Gaussian mechanism of sensitivity 1 and noise 1/mu (Balle & Wang 2018, Thm 8):
    the exact curve that the composition of k Gaussians of noise z follows with mu = sqrt(k)/z."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)


@pytest.mark.parametrize("z,rounds", [(1.0, 1), (2.5, 16), (8.0, 50)])
def test_accountant_agrees_with_the_librarys_closed_form_gaussian(z, rounds):
    import dp_accounting

    # k Gaussians of noise z compose exactly into one of noise z / sqrt(k): the library's own
    # closed form for a single Gaussian (get_epsilon_gaussian) is the reference
    exact = dp_accounting.get_epsilon_gaussian(z / math.sqrt(rounds), 1e-5)
    pld = accountant.epsilon(z, rounds, 1e-5, kind="pld")
    rdp = accountant.epsilon(z, rounds, 1e-5, kind="rdp")
    assert exact <= pld <= exact * 1.01 + 1e-3  # PLD: tight, pessimistic by its discretisation only
    assert exact <= rdp <= exact * 1.35  # RDP: an upper bound, looser
    assert analytic_gaussian_delta(pld, math.sqrt(rounds) / z) <= 1e-5 * 1.001
    # two mechanisms a round are the same as twice the rounds
    assert accountant.epsilon(z, rounds, 1e-5, mechanisms=2) == pytest.approx(accountant.epsilon(z, 2 * rounds, 1e-5))


def test_calibration_meets_the_target_and_no_more_noise_than_needed():
    for target in (8.0, 1.0):
        z = accountant.calibrate(target, 1e-5, 16)
        assert accountant.epsilon(z, 16, 1e-5) <= target
        assert accountant.epsilon(z * 0.99, 16, 1e-5) > target
    p = Privacy(epsilon=8.0)
    p.calibrate(16)
    assert p.epsilon(16) <= 8.0 and p.epsilon(8) < p.epsilon(16)
    assert p.feature_sigma(4) == pytest.approx(p.noise_multiplier * 2 * 1.0 * 2)  # 2 C sqrt(S)


def test_clipping_bounds_every_vector_and_every_update():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(200, 16, generator=g) * torch.rand(200, 1, generator=g) * 3
    c = clip_rows(v, 1.0)
    assert (c.norm(dim=1) <= 1.0 + 1e-6).all()
    inside = v.norm(dim=1) <= 1.0
    assert inside.any() and torch.equal(c[inside], v[inside])  # inside the ball: untouched
    start = {"w": torch.zeros(50), "b": torch.zeros(3), "n": torch.tensor(4)}
    upd = {"w": torch.randn(50, generator=g) * 5, "b": torch.ones(3), "n": torch.tensor(9)}
    out = private_update(upd, start, clip=0.5, sigma=0.0, generator=g)
    assert update_norm(out, start) == pytest.approx(0.5, rel=1e-6)
    assert out["n"] == 9  # integer buffers pass
    small = {"w": torch.full((50,), 1e-3), "b": torch.zeros(3), "n": torch.tensor(9)}
    assert torch.allclose(private_update(small, start, 0.5, 0.0, g)["w"], small["w"])


def test_noise_has_the_scale_the_accountant_was_told():
    z, clip, S = 1.7, 1.0, 4
    sigma = z * vector_sensitivity(clip, "patient", S)
    vols = [torch.rand(1, 8, 8, 12) for _ in range(40)]  # 20 patients x 2 frames
    patients = [f"p{i // 2}" for i in range(40)]

    def embed(x):
        return torch.nn.functional.normalize(x.flatten(1)[:, :32], dim=1)

    out = private_features(
        embed, vols, patients, S, 0, None, clip, sigma, torch.Generator().manual_seed(1), noise_generator(5, 0, 0)
    )
    assert len(out.vectors) == 20 * S  # one slice per patient and partition
    # the vectors are unit vectors plus N(0, sigma^2): the mean square per coordinate is sigma^2 + 1/d
    ms = float(out.vectors.pow(2).mean())
    assert ms == pytest.approx(sigma**2 + 1 / 32, rel=0.05)
    w = {"w": torch.zeros(200_000)}
    noisy = private_update(w, w, 1.0, 0.3, noise_generator(5, 0, 1))
    assert float(noisy["w"].std()) == pytest.approx(0.3, rel=0.01)


def test_noised_batchnorm_variances_stay_positive():
    bn = torch.nn.BatchNorm1d(1000)
    start = {k: v.clone() for k, v in bn.state_dict().items()}
    out = private_update(bn.state_dict(), start, 1.0, 5.0, noise_generator(3, 0, 1))
    assert float(out["running_mean"].min()) < -1  # the noise is there
    assert float(out["running_var"].min()) >= VAR_FLOOR  # but no variance went negative
    bn.load_state_dict(out)
    assert torch.isfinite(bn.eval()(torch.randn(4, 1000))).all()


def slow_one_per_patient_ok(partitions, patients, keep, S, per_partition):
    for s in range(S):
        chosen = [int(patients[i]) for i in keep if partitions[i] == s]
        assert len(chosen) == len(set(chosen))  # a patient at most once per partition
        avail = {int(patients[i]) for i in range(len(partitions)) if partitions[i] == s}
        assert len(chosen) == min(len(avail), per_partition or len(avail))


@pytest.mark.parametrize("per_partition", [None, 1, 3])
def test_each_patient_sends_at_most_one_vector_per_partition(per_partition):
    g = torch.Generator().manual_seed(3)
    partitions = torch.randint(0, 4, (120,), generator=g)
    patients = torch.randint(0, 7, (120,), generator=g)
    keep = one_per_patient(partitions, patients, 4, per_partition, g)
    assert torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == len(keep)
    slow_one_per_patient_ok(partitions.tolist(), patients.tolist(), keep.tolist(), 4, per_partition)


class Capture(RoundHook):
    """Records what each client of round 1 hands the server (the in-process transport) and the
    weights it started from."""

    seen: list = []

    def on_round_start(self, run, state, round_idx) -> None:
        if round_idx == 0:
            self.start = {k: v.clone() for k, v in state.global_w.items()}

    def on_round_end(self, run, state, results, metrics) -> None:
        if state.round == 1:  # the round is finished (state.round counts it) when its hooks run
            Capture.seen.append((self.start, {c: r for c, r in results.items()}))


CAPTURE = f"--federation.hooks=[{{class_path: {__name__}.Capture}}]"
DP = [
    "--federation.privacy.noise_multiplier=1.0",
    "--federation.privacy.weights=true",
    "--federation.privacy.weights_clip=0.05",
]


def check_noised(start, clean, noisy, privacy_sigma, clip):
    """``noisy - start = clip(clean - start) + N(0, sigma^2)`` on the float tensors."""
    assert update_norm(clean, start) > clip  # the clipping was in force
    scale = clip / update_norm(clean, start)
    noise = torch.cat(
        [
            (noisy[k].double() - start[k].double() - (clean[k].double() - start[k].double()) * scale).flatten()
            for k in start
            if start[k].is_floating_point()
        ]
    )
    assert float(noise.std()) == pytest.approx(privacy_sigma, rel=0.02)
    assert abs(float(noise.mean())) < 5 * privacy_sigma / math.sqrt(len(noise))  # 5 standard errors


def test_nothing_un_noised_leaves_a_client_in_process(tmp_path, tiny):
    Capture.seen.clear()
    main(tiny(tmp_path / "clean", rounds=1, extra=[CAPTURE]))
    main(tiny(tmp_path / "dp", rounds=1, extra=[CAPTURE, *DP]))
    (start, clean), (start2, noisy) = Capture.seen
    assert all(torch.equal(start[k], start2[k]) for k in start)
    sigma_w = 1.0 * 2 * 0.05
    for c in clean:
        check_noised(start, clean[c].update, noisy[c].update, sigma_w, 0.05)
        v = noisy[c].features.vectors  # clipped unit vectors + N(0, (z 2 C sqrt(S))^2)
        # the mean square of n noised coordinates: relative standard error sqrt(2 / n); 5 of them
        # (the noise seed is each client's random secret, so this test draws anew every run)
        assert float(v.pow(2).mean()) == pytest.approx(4.0**2 + 1 / v.shape[1], rel=5 * math.sqrt(2 / v.numel()))
        assert (v.norm(dim=1) > 3).all()  # no vector leaves as a unit vector
        assert "privacy_secret" in noisy[c].state  # the secret stays in the client's own state
    import json

    s = json.loads((tmp_path / "dp/summary.json").read_text())["pretrain"]["privacy"]
    assert s["epsilon"] == pytest.approx(accountant.epsilon(1.0, 1, 1e-5, mechanisms=2))


def test_nothing_un_noised_leaves_a_flower_node(tmp_path, tiny):
    pytest.importorskip("flwr")
    from flower_grid import flower_run

    from fcl_lightning.flower.codec import record_to_features, record_to_weights

    Capture.seen.clear()
    main(tiny(tmp_path / "clean", rounds=1, extra=[CAPTURE]))
    ((start, clean),) = Capture.seen
    grid, summary = flower_run(tmp_path, tiny, tmp_path / "flower", rounds=1, extra=DP)
    replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(replies) == 2
    node_client = {100: 0, 101: 1}
    for r in replies:
        c = node_client[r.metadata.src_node_id]
        check_noised(start, clean[c].update, record_to_weights(r.content["update"]), 0.1, 0.05)
        assert (record_to_features(r.content["features"]).vectors.norm(dim=1) > 3).all()
        assert "privacy_secret" not in str(list(r.content.keys()))
    assert summary["privacy"]["epsilon"] > 0


@pytest.mark.slow  # the suite's time: the target-epsilon resume below is the same check with its noise and ledger
def test_a_resumed_dp_run_repeats_its_noise(tmp_path, tiny):
    """The secret is in each client's state: resuming from round 1 gives round 2's weights again."""
    main(tiny(tmp_path / "a", rounds=2, extra=DP))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    main(tiny(tmp_path / "b", rounds=2, extra=[*DP, f"--ckpt_path={tmp_path / 'b/checkpoints/round-001.ckpt'}"]))
    a = torch.load(tmp_path / "a/encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "b/encoder.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epsilon": 0.0}, "epsilon must be in"),
        ({"epsilon": 1e9}, "epsilon must be in"),
        ({"epsilon": 8, "delta": 0.5}, "delta must be in"),
        ({"epsilon": 8, "delta": 0.0}, "delta must be in"),
        ({}, "exactly one of epsilon"),
        ({"epsilon": 8, "noise_multiplier": 1.0}, "exactly one of epsilon"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be > 0"),
        ({"epsilon": 8, "features": False}, "protects nothing"),
        ({"epsilon": 8, "feature_clip": 0}, "feature_clip must be > 0"),
    ],
)
def test_bad_privacy_settings_are_one_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Privacy(**kwargs)


def test_an_unreachable_target_is_one_clear_error():
    with pytest.raises(ConfigError, match="cannot be reached over 200 rounds"):
        Privacy(epsilon=1e-5).calibrate(200)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--federation.privacy.epsilon=8", "--federation.exchange=false"], "but federation.exchange is false"),
        (
            ["--config=configs/methods/fclopt.yaml", "--federation.exchange=true", "--federation.privacy.epsilon=8"],
            "exchanges none",
        ),
        (["--federation.privacy.epsilon=8", "--federation.mode=local"], "nothing leaves a client"),
        (["--federation.privacy.epsilon=0.00001", "--federation.rounds=300"], "cannot be reached"),
    ],
)
def test_privacy_config_errors_come_before_any_data(tmp_path, tiny, capsys, monkeypatch, extra, match):
    from support import one_error_line, run_cli

    from fcl_lightning.data.datamodule import FederatedDataModule

    monkeypatch.setattr(FederatedDataModule, "setup", lambda *a, **k: pytest.fail("data loaded before validation"))
    code, _, err = run_cli(tiny(tmp_path / "run", extra=extra), capsys)
    assert code == 2 and match in one_error_line(err)
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def summary_privacy(root):
    import json

    return json.loads((root / "summary.json").read_text())["pretrain"]["privacy"]


def ledger_of(root):
    return torch.load(root / "checkpoints/last.ckpt", weights_only=True)["privacy"]["ledger"]


def test_the_epsilon_reported_across_resumes_is_the_epsilon_spent(tmp_path, tiny, cli):
    """Target 8 over 2 rounds, resumed to 4: the last rounds are noised so that all 4 meet the
    target; a resume that changes the privacy settings (target, off) is refused with one line,
    unless privacy_change=continue, and then the epsilon composes both parts (inf once off)."""
    from fcl_lightning.privacy.accountant import spent_epsilon

    root, dp8 = tmp_path / "run", ["--federation.privacy.epsilon=8"]
    main(tiny(root, rounds=2, extra=dp8))
    z_first = ledger_of(root)[0][0]
    for extra, needle in (
        (["--federation.privacy.epsilon=50"], "changes epsilon 8.0 -> 50.0"),
        ([], "turns privacy off"),
    ):
        code, _, err = cli(tiny(root, rounds=3, extra=[*extra, "--ckpt_path=last"]))
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "privacy_change=continue" in lines[0], err
    main(tiny(root, rounds=4, extra=[*dp8, "--ckpt_path=last"]))
    ledger = ledger_of(root)
    assert [z for z, _ in ledger[:2]] == [z_first] * 2 and ledger[2][0] == ledger[3][0] > z_first
    eps = summary_privacy(root)["epsilon"]
    assert eps == pytest.approx(spent_epsilon([tuple(e) for e in ledger], 1e-5)) and 7.9 < eps <= 8.0
    history = torch.load(root / "checkpoints/last.ckpt", weights_only=True)["history"]
    reported = [h["round/privacy/epsilon"] for h in history]
    assert reported == sorted(reported) and reported[-1] == pytest.approx(eps)
    # going on under new settings, then without privacy: both parts composed
    main(
        tiny(
            root,
            rounds=5,
            extra=["--federation.privacy.epsilon=50", "--federation.privacy_change=continue", "--ckpt_path=last"],
        )
    )
    ledger = ledger_of(root)
    eps = summary_privacy(root)["epsilon"]
    assert eps == pytest.approx(spent_epsilon([tuple(e) for e in ledger], 1e-5)) and eps > 8
    main(tiny(root, rounds=6, extra=["--federation.privacy_change=continue", "--ckpt_path=last"]))
    record = summary_privacy(root)
    assert record["epsilon"] == float("inf") and record["off_from_round"] == 6 and ledger_of(root)[-1][0] is None


@pytest.mark.slow  # the suite's time: the target-epsilon resume below covers the ledger's resume bitwise
def test_a_resumed_fixed_noise_run_spends_what_an_uninterrupted_one_does(tmp_path, tiny):
    z = ["--federation.privacy.noise_multiplier=1.5"]
    main(tiny(tmp_path / "a", rounds=3, extra=z))
    main(tiny(tmp_path / "b", rounds=1, extra=z))
    main(tiny(tmp_path / "b", rounds=3, extra=[*z, "--ckpt_path=last"]))
    assert summary_privacy(tmp_path / "b")["epsilon"] == summary_privacy(tmp_path / "a")["epsilon"] > 0
    assert ledger_of(tmp_path / "a") == ledger_of(tmp_path / "b") == [[1.5, 1]] * 3


def test_a_target_epsilon_run_resumed_mid_way_is_bitwise_the_uninterrupted_one(tmp_path, tiny):
    """Same config, resumed from round 1 of 2: the noise calibrated for the whole run is kept (no
    recalibration), so the weights and the ledger are the uninterrupted run's."""
    dp8 = ["--federation.privacy.epsilon=8"]
    main(tiny(tmp_path / "a", rounds=2, extra=dp8))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    main(tiny(tmp_path / "b", rounds=2, extra=[*dp8, f"--ckpt_path={tmp_path / 'b/checkpoints/round-001.ckpt'}"]))
    a = torch.load(tmp_path / "a/encoder.pt", weights_only=True)
    b = torch.load(tmp_path / "b/encoder.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ledger_of(tmp_path / "a") == ledger_of(tmp_path / "b")
