"""``python -m fcl_lightning.flower.simulation`` checks its own arguments and the config it is given
before Ray starts: one ``error:`` line, exit 2, no traceback, no file written."""

import pytest

pytest.importorskip("flwr")

import fcl_lightning.flower.simulation as sim  # noqa: E402
from fcl_lightning.cli import PACKAGED_CONFIGS  # noqa: E402

TINY = str(PACKAGED_CONFIGS / "tiny.yaml")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--config", TINY, "--num-supernodes", "0"], "--num-supernodes must be >= 1, got 0"),
        (["--config", TINY, "--num-supernodes", "3"], "--num-supernodes 3 but data.num_clients is 2"),
        (["--config", TINY, "--num-supernodes", "2", "--", "--federation.clients_per_round=0"], "clients_per_round must be >= 1"),
        (["--config", "nope.yaml", "--num-supernodes", "2"], "--config nope.yaml: no such file"),
        # a shipped config is found from any folder (as fit finds it) and then checked
        (["--config", "configs/demo_pretrain.yaml", "--num-supernodes", "3"], "--num-supernodes 3 but data.num_clients is 4"),
        (["--config", TINY, "--num-supernodes", "2", "--", "--federation.roundz=3"], "unrecognized arguments: --federation.roundz"),
        (["--config", TINY, "--num-supernodes", "2", "--cpus", "0"], "--cpus must be >= 1"),
        (["--config", TINY], "the following arguments are required: --num-supernodes"),
        (["--config", TINY, "--num-supernodes", "2", "--", "--federation.mode=local"], "Flower runs federation.mode federated"),
        (["--config", TINY, "--num-supernodes", "2", "--state-root", TINY], "is a file, not a folder"),
    ],
)  # fmt: skip
def test_bad_arguments_are_one_line_and_start_nothing(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sim, "simulate", lambda *a, **k: pytest.fail("the simulation started"))
    argv = [*argv, f"--trainer.default_root_dir={tmp_path / 'run'}"] if "--" in argv else argv
    with pytest.raises(SystemExit) as exc:
        sim.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert exc.value.code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())  # no config.yaml, no run folder


def test_a_server_error_inside_the_runtime_is_the_commands_exit_code(monkeypatch):
    """The runtime would log a ServerApp's exception and return: the entry point re-raises it."""
    from fcl_lightning.errors import ConfigError

    def fake_run_simulation(server_app, client_app, **_):
        try:
            server_app._main(None, None)  # noqa: SLF001 - the registered main, as the runtime calls it
        except ConfigError:
            pass  # the runtime logs and goes on

    monkeypatch.setattr(
        "fcl_lightning.flower.server.run_server", lambda grid, rc: (_ for _ in ()).throw(ConfigError("bad"))
    )
    monkeypatch.setattr("flwr.simulation.run_simulation", fake_run_simulation)
    with pytest.raises(ConfigError, match="bad"):
        sim.simulate(TINY, [], 2)


@pytest.mark.parametrize("make", ["missing folder", "plain file"])
def test_the_worker_refuses_a_socket_path_it_cannot_use(tmp_path, capsys, make):
    from fcl_lightning.flower.worker import main

    path = tmp_path / "nope" / "w.sock"
    if make == "plain file":
        path = tmp_path / "w.sock"
        path.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--socket", str(path)])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: --socket")
