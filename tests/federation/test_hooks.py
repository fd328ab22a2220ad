"""The round engine's hooks: a hook chosen in the config by ``class_path`` sees every round in
order, what it adds to a round's metrics reaches the loggers and the history, and a failing run
still tears every started hook down."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest

from fcl_lightning.cli import main
from fcl_lightning.federation.hooks import RoundHook

CALLS: list[tuple] = []


class Recorder(RoundHook):
    """Records the engine's calls and adds one figure per round."""

    def __init__(self, fail_at_round: int | None = None) -> None:
        self.fail_at_round = fail_at_round

    def on_run_start(self, loop, state):
        CALLS.append(("run_start", state.round))

    def on_round_start(self, loop, state, round_idx):
        CALLS.append(("round_start", round_idx))
        if self.fail_at_round == round_idx + 1:
            raise RuntimeError(f"hook fails in round {round_idx + 1}")

    def on_client_start(self, loop, round_idx, i, client, n):
        CALLS.append(("client", round_idx, client))

    def on_round_end(self, loop, state, results, metrics):
        CALLS.append(("round_end", state.round, sorted(results)))
        metrics["round/hook/seen_clients"] = float(len(results))

    def on_round_recorded(self, loop, state, metrics):
        CALLS.append(("recorded", state.round, state.history[-1]["round/hook/seen_clients"]))

    def on_run_end(self, loop, state, summary):
        CALLS.append(("run_end", summary["rounds_completed"]))

    def teardown(self, loop, error):
        CALLS.append(("teardown", type(error).__name__ if error else None))


HOOK = f"--federation.hooks=[{{class_path: {__name__}.Recorder}}]"


@pytest.mark.slow  # the suite's 3-minute budget (make test-slow)
def test_a_config_hook_sees_every_round_and_its_metric_is_logged(tmp_path, tiny):
    CALLS.clear()
    main(tiny(tmp_path, rounds=2, extra=[HOOK]))
    assert CALLS == [
        ("run_start", 0),
        ("round_start", 0), ("client", 0, 0), ("client", 0, 1), ("round_end", 1, [0, 1]), ("recorded", 1, 2.0),
        ("round_start", 1), ("client", 1, 0), ("client", 1, 1), ("round_end", 2, [0, 1]), ("recorded", 2, 2.0),
        ("teardown", None),
        ("run_end", 2),
    ]  # fmt: skip
    rows = list(csv.DictReader(open(next(tmp_path.glob("logs/version_*/metrics.csv")))))
    assert [float(r["round/hook/seen_clients"]) for r in rows if r.get("round/hook/seen_clients")] == [2.0, 2.0]


def test_a_failing_round_tears_the_started_hooks_down(tmp_path, tiny):
    CALLS.clear()
    hook = f"--federation.hooks=[{{class_path: {__name__}.Recorder, init_args: {{fail_at_round: 2}}}}]"
    with pytest.raises(RuntimeError, match="hook fails in round 2"):
        main(tiny(tmp_path, rounds=3, extra=[hook]))
    assert CALLS[-1] == ("teardown", "RuntimeError") and ("run_end", 3) not in CALLS
    assert (tmp_path / "checkpoints" / "round-001.ckpt").is_file()  # round 1's checkpoint was written whole


class CountFits(pl.Callback):
    """A Lightning callback under ``trainer.callbacks``: counts the client fits it sees."""

    fits = 0

    def on_train_start(self, trainer, pl_module):
        CountFits.fits += 1


def test_trainer_callbacks_reach_clients_and_ignored_settings_are_named(tmp_path, tiny, capsys):
    CountFits.fits = 0
    extra = [
        "--trainer.max_epochs=7",
        f"--trainer.callbacks+={__name__}.CountFits",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    ]
    main(tiny(tmp_path, rounds=2, extra=extra))
    assert CountFits.fits == 4  # 2 clients x 2 rounds
    err = " ".join(capsys.readouterr().err.split())
    assert "ignored: trainer.max_epochs=7, trainer.callbacks (ModelCheckpoint)" in err
    assert "federation.local_epochs or local_steps" in err
