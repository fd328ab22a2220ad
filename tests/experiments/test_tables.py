"""The experiments runner on a 2-method x 1-N grid: a complete CSV and table, and a second call
that skips every finished cell."""

import csv

import pytest
import torch

TINY_DATA = [
    "--data.source.init_args.num_subjects=8",
    "--data.source.init_args.size=64",
    "--data.img_size=32",
    "--model.init_args.features=[8,16,16,16]",
    "--trainer.accelerator=cpu",
]


@pytest.fixture
def tables(experiment):
    return experiment("run_tables")


FINETUNE_ARGS = [
    *TINY_DATA,
    "--federation.rounds=1",
    "--federation.local_steps=2",
    "--data.test_source.init_args.size=64",
    "--data.test_source.init_args.num_subjects=2",
]


def run(tables, out, monkeypatch):
    calls = []
    real = tables.cli
    monkeypatch.setattr(tables, "cli", lambda args: (calls.append(args[0]), real(args)))
    tables.main(
        [
            "--profile",
            "quick",
            "--methods",
            "random,local_cl",
            "--ns",
            "1",
            "--out",
            str(out),
            *[
                f"--pretrain-arg={a}"
                for a in [
                    *TINY_DATA,
                    "--federation.rounds=1",
                    "--data.volumes_per_batch=2",
                    "--model.init_args.proj_hidden=32",
                ]
            ],
            *[f"--finetune-arg={a}" for a in FINETUNE_ARGS],
        ]
    )
    return calls


@pytest.mark.slow
def test_runner_writes_csv_table_and_resumes(tables, tmp_path, monkeypatch):
    out = tmp_path / "tables"
    calls = run(tables, out, monkeypatch)
    # local_cl pre-trains once (fit); 2 methods x 2 settings x N=1 fine-tune (fit + test each)
    assert calls.count("fit") == 1 + 4 and calls.count("test") == 4
    assert sorted(p.name for p in (out / "pretrain/local_cl/encoders").iterdir()) == [f"client{c}.pt" for c in range(4)]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert set(rows[0]) == set(tables.COLUMNS)
    local = [r for r in rows if r["setting"] == "local"]
    fed = [r for r in rows if r["setting"] == "federated"]
    assert sorted((r["method"], r["client"]) for r in local) == sorted(
        (m, str(c)) for m in ("random", "local_cl") for c in range(4)
    )  # one model per client
    assert sorted(r["method"] for r in fed) == ["local_cl", "random"]  # one global model on the shared test set
    assert all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in rows)
    md = (out / "results.md").read_text()
    assert "Table 1: local fine-tuning" in md and "Table 2: federated fine-tuning" in md
    assert "| Local CL |" in md and "| Random init |" in md
    assert (out / "dice_vs_n_local.png").stat().st_size > 0
    # the second call finds every cell finished and runs nothing
    assert run(tables, out, monkeypatch) == []
    assert list(csv.DictReader(open(out / "results.csv"))) == rows
    # a cell stopped after its checkpoint (here: before its test) continues from it, not from scratch
    cell = out / "finetune/random/local_N1_fold-_seed0"
    (cell / "test_per_patient.csv").unlink()
    seen = []
    real = tables.cli
    monkeypatch.setattr(tables, "cli", lambda args: (seen.append(args), real(args)))
    tables.main(["--profile", "quick", "--methods", "random", "--ns", "1", "--settings", "local", "--out", str(out),
                 *[f"--finetune-arg={a}" for a in FINETUNE_ARGS]])  # fmt: skip
    assert [a[0] for a in seen] == ["fit", "test"] and "--ckpt_path=last" in seen[0]
    assert list(csv.DictReader(open(out / "results.csv")))[0] == rows[0]  # the same figures
    # --report-only on a wider grid (the cells' own arguments) runs nothing and reports only the finished cells
    tables.main(
        ["--profile", "quick", "--methods", "random,local_cl,fcl", "--ns", "1,2", "--out", str(out), "--report-only",
         *[f"--finetune-arg={a}" for a in FINETUNE_ARGS]]
    )  # fmt: skip
    assert list(csv.DictReader(open(out / "results.csv"))) == rows
    assert "| FCL | - | - |" in (out / "results.md").read_text()


def test_unknown_method_is_a_clear_error(tables):
    with pytest.raises(SystemExit, match="unknown method"):
        tables.main(["--methods", "fcl,nope"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ns", "1,x"], "--ns: '1,x' is not a comma list of integers"),
        (["--ns", "0"], "--ns: '0': every value must be at least 1"),
        (["--seeds", "-1"], "--seeds: '-1': every value must be at least 0"),
        (["--settings", "locl"], "--settings: 'locl': a comma list of local, federated"),
        (["--root", "/nonexistent/acdc"], "--root /nonexistent/acdc: no such folder"),
        (["--records", "/etc/passwd"], "--records /etc/passwd: exists and is not a folder"),
    ],
)
def test_bad_arguments_are_one_clear_error_and_write_nothing(tables, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        tables.main([*argv, "--out", str(out)])
    assert message in f"{exc.value.code} {capsys.readouterr().err}"
    assert not out.exists()


def test_method_at_round_fine_tunes_from_that_rounds_checkpoint(tables, tmp_path):
    """``fcl@4`` reuses fcl's pre-training cell and fine-tunes from its round-4 checkpoint;
    ``fcl@0`` from the weights that pre-training started from (the paired random init)."""
    runner = tables.Runner(tables.PROFILES["quick"], tmp_path, [], [], [])
    cells = runner.cells(["random", "fcl", "fcl@4"])
    assert [c for c in cells if c[0] == "pretrain"] == [("pretrain", "random"), ("pretrain", "fcl")]
    assert runner.encoder_path("fcl@4") == str(tmp_path / "pretrain/fcl/checkpoints/round-004.ckpt")
    assert runner.encoder_path("fcl") == str(tmp_path / "pretrain/fcl/encoder.pt")
    assert runner.encoder_path("fcl@0") == str(tmp_path / "pretrain/fcl/encoder_init.pt")
    assert {c[1] for c in cells if c[0] == "finetune"} == {"random", "fcl", "fcl@4"}
    # a finished pre-training whose round 4 was not kept says so, with the rounds it has
    (tmp_path / "pretrain/fcl/checkpoints").mkdir(parents=True)
    for name in ("encoder.pt", "checkpoints/round-003.ckpt", "checkpoints/round-010.ckpt"):
        (tmp_path / "pretrain/fcl" / name).write_bytes(b"")
    with pytest.raises(SystemExit, match=r"fcl@4: round 4 of fcl's pre-training was not kept .* rounds 3, 10"):
        runner.encoder_path("fcl@4")


def test_semi_methods_reuse_pretraining_and_add_the_semi_config(tables, tmp_path, monkeypatch):
    """``fcl+unimatch`` pre-trains as ``fcl`` (one cell) and fine-tunes with configs/semi/unimatch.yaml."""
    runner = tables.Runner(tables.PROFILES["quick"], tmp_path, [], [], [])
    cells = runner.cells(["random", "random+unimatch", "fcl", "fcl+unimatch", "fcl@4+mean_teacher"])
    assert [c for c in cells if c[0] == "pretrain"] == [("pretrain", "random"), ("pretrain", "fcl")]
    assert tables.split_method("fcl@4+mean_teacher") == ("fcl", "4", "mean_teacher")
    assert tables.label("random+unimatch") == "Random init + UniMatch (extension)"
    calls = []
    monkeypatch.setattr(tables, "cli", calls.append)
    runner.run_finetune("fcl@4+mean_teacher", "local", 1, None, 0)
    fit = calls[0]
    assert fit[fit.index(str(tables.SEMI_DIR / "mean_teacher.yaml")) - 1] == "--config"
    assert fit.index(str(tables.SEMI_DIR / "mean_teacher.yaml")) > fit.index("--config")  # after the base config
    assert f"--model.pretrained={tmp_path}/pretrain/fcl/checkpoints/round-004.ckpt" in fit
    with pytest.raises(SystemExit, match="unknown method"):
        tables.main(["--methods", "fcl+nope"])


def test_pretrain_from_fine_tunes_another_tables_encoders_and_never_pretrains(tables, tmp_path, monkeypatch):
    """``--pretrain-from DIR`` fine-tunes DIR/pretrain/<method>'s encoders (the same pre-training
    at another budget); one it lacks is refused before anything runs or is written."""
    first, second = tmp_path / "first", tmp_path / "second"
    enc = first / "pretrain/fcl/encoder.pt"
    enc.parent.mkdir(parents=True)
    enc.write_bytes(b"")
    argv = ["--methods", "random,fcl+bcp", "--ns", "1", "--settings", "local", "--seeds", "0", "--out", str(second)]
    with pytest.raises(SystemExit, match=r"--pretrain-from .*no finished pre-training at .*local_cl/encoder\.pt"):
        tables.main([*argv[:1], "fcl,local_cl", *argv[2:], f"--pretrain-from={first}"])
    assert not second.exists()  # refused before the output folder was made
    calls = []
    monkeypatch.setattr(tables, "cli", calls.append)
    monkeypatch.setattr(tables, "write_results", lambda *a: "")
    monkeypatch.setattr(tables.provenance, "append", lambda *a: None)
    tables.main([*argv, f"--pretrain-from={first}"])
    fits = [c for c in calls if c[0] == "fit"]
    assert len(fits) == 2  # random and fcl+bcp fine-tune; fcl does not pre-train again
    assert f"--model.pretrained={enc}" in fits[1] and not (second / "pretrain").exists()


def test_a_cell_records_its_arguments_and_another_budget_is_refused(tables, tmp_path, monkeypatch):
    """Each fine-tuning cell records its arguments (``cell.json``, locations left out); a later
    call with another budget for that folder stops before running anything, naming the cell
    and the differing arguments, instead of mixing 1,500- and 3,000-step cells in one table."""
    profile = tables.Profile(**{**tables.PROFILES["quick"].__dict__, "ns": [1, 2], "settings": ["local"]})
    profile.finetune_by_n = {2: ["--federation.rounds=12"]}
    calls = []
    monkeypatch.setattr(tables, "cli", calls.append)
    runner = tables.Runner(profile, tmp_path, [f"--data.cache_dir={tmp_path}/cache"], [], [])
    runner.run(["random"])
    fits = [c for c in calls if c[0] == "fit"]
    assert ["--federation.rounds=12" in f for f in fits] == [False, True]  # N=1, N=2
    cell = tmp_path / "finetune/random/local_N2_fold-_seed0"
    recorded = tables.json.loads((cell / tables.CELL_FILE).read_text())["args"]
    assert "--federation.rounds=12" in recorded and "configs/demo_finetune.yaml" in recorded
    assert not [a for a in recorded if a.startswith(("--trainer.default_root_dir", "--data.cache_dir"))]
    calls.clear()
    other = tables.Runner(profile, tmp_path, [], [], ["--federation.rounds=6"])
    with pytest.raises(
        SystemExit, match=r"2 cell\(s\) .* other fine-tuning arguments.*local_N1.*--federation.rounds=6"
    ):
        other.run(["random"])
    assert calls == []
    before = (tmp_path / "finetune").stat().st_mtime_ns, sorted(p.name for p in tmp_path.iterdir())
    argv = ["--methods", "random", "--ns", "1", "--settings", "local", "--out", str(tmp_path), "--report-only"]
    with pytest.raises(SystemExit, match="other fine-tuning arguments"):  # a report would mix them as well
        tables.main([*argv, "--finetune-arg=--federation.rounds=6"])
    assert ((tmp_path / "finetune").stat().st_mtime_ns, sorted(p.name for p in tmp_path.iterdir())) == before
    runner.run(["random"])  # the same arguments (locations aside) go on
    assert len([c for c in calls if c[0] == "fit"]) == 2
    (cell / tables.CELL_FILE).write_text("{not json")
    with pytest.raises(SystemExit, match=r"cell\.json: not a cell record of this runner; remove .*local_N2"):
        runner.run(["random"])


def test_gains_are_paired_with_intervals_and_say_not_shown(tables):
    rows = []
    for seed in range(3):
        for client in range(5):
            base = 0.4 + 0.05 * client + 0.01 * seed
            for m, d in (("random", 0.0), ("fcl", 0.02 * (-1) ** (client + seed)), ("fcl+unimatch", 0.2)):
                rows.append({"method": m, "setting": "local", "N": 1, "client": str(client), "fold": "", "seed": seed,
                             "dice_mean": base + d + 0.001 * client})  # fmt: skip
    md = tables.gains(rows, ["random", "fcl", "fcl+unimatch"], [1], "local")
    fcl = next(line for line in md.splitlines() if line.startswith("| FCL |"))
    semi = next(line for line in md.splitlines() if line.startswith("| FCL + UniMatch"))
    assert "not shown" in fcl and "/15 pairs" in fcl
    assert "+0.200 [+0.200, +0.200], 15/15 pairs" in semi and "not shown" not in semi


def test_a_table_being_filled_names_each_cells_seeds(tables):
    """Means over different seeds are not comparable: where a column's methods differ in seeds,
    each cell says which; a complete column says nothing."""
    rows = [{"method": m, "setting": "local", "N": n, "client": str(c), "fold": "", "seed": s, "dice_mean": 0.5 + 0.1 * s}
            for m, seeds in (("random", (0, 1, 2)), ("random+bcp", (0,))) for n in (1, 2) for c in range(2)
            for s in (seeds if n == 2 else (0,))]  # fmt: skip
    md, stats = tables.table(rows, ["random", "random+bcp"], [1, 2], "local")
    random_line, bcp_line = md.splitlines()[2:]
    assert random_line == "| Random init | 0.500 ± 0.000 | 0.600 ± 0.000 (seeds 0, 1, 2) |"
    assert bcp_line == "| Random init + BCP (extension) | 0.500 ± 0.000 | 0.500 ± 0.000 (seed 0) |"
    assert stats["Random init"][2][0] == pytest.approx(0.6)  # the marker is text only


def finished_cell(d, dice_by_client: list[float]) -> None:
    """A finished fine-tuning cell's files in ``d``: its summary and one test volume per client."""
    (d / "summary.json").write_text('{"test/dice_mean": 0.5}')
    lines = [f"{c},p{c},0.5,0.5,0.5,{v},3.0" for c, v in enumerate(dice_by_client)]
    (d / "test_per_patient.csv").write_text(
        "client,patient,dice_rv,dice_myo,dice_lv,dice_mean,hd95_mean\n" + "\n".join(lines) + "\n"
    )


def test_plateau_curves_say_whether_each_arm_flattened(tables, tmp_path):
    """From finished cells (written here, nothing trained): the held-out Dice after every 250 steps,
    the last third's gain (the end against the round at two thirds) and the verdict per arm."""
    profile = tables.Profile(
        pretrain=[], finetune=["--federation.local_steps=100", "--federation.local_steps=250"], ns=[1],
        methods=["random", "random+bcp"], settings=["local"], seeds=[0, 1],
    )  # fmt: skip
    runner = tables.Runner(profile, tmp_path, [], [], [])
    training = runner.finetune_dir("random", "local", 1, None, 1) / "logs" / "version_0"  # seed 1: 2 rounds in
    training.mkdir(parents=True)
    (training / "metrics.csv").write_text("round,round/val/dice_mean\n1,0.1\n2,0.2\n")
    curves = {"random": [0.40, 0.45, 0.46, 0.46, 0.465, 0.466], "random+bcp": [0.30, 0.40, 0.50, 0.55, 0.60, 0.65]}
    for method, curve in curves.items():
        d = runner.finetune_dir(method, "local", 1, None, 0)
        (d / "logs" / "version_0").mkdir(parents=True)
        rows = "\n".join(f"{r + 1},{v}" for r, v in enumerate(curve))
        (d / "logs" / "version_0" / "metrics.csv").write_text("round,round/val/dice_mean\n" + rows + "\n")
        finished_cell(d, [0.5])
    assert tables.local_steps(profile.finetune) == 250
    assert tables.plateau_gain([0.1, 0.2]) is None
    assert tables.plateau_gain(curves["random"]) == pytest.approx(
        0.466 - 0.46
    )  # round 6 against 4: 1,500 against 1,000 steps
    md = tables.write_results(runner, profile.methods, "plateau", 1.0)
    assert "## Held-out Dice after every 250 steps (local)" in md
    # the cell still training neither shortens nor shifts the curve
    assert "| Random init | 1 | 1 | 0.400 / 0.450 / 0.460 / 0.460 / 0.465 / 0.466 | +0.0060 | yes |" in md
    assert (
        "| Random init + BCP (extension) | 1 | 1 | 0.300 / 0.400 / 0.500 / 0.550 / 0.600 / 0.650 | +0.1000 | **no** |"
        in md
    )
    assert (tmp_path / "curves_local.png").stat().st_size > 10_000  # two curves drawn, not an empty canvas


def test_pretraining_gain_pools_its_pretraining_runs(tables):
    """``fcl+bcp`` and ``fcl~1+bcp`` against ``random+bcp``: one line whose pairs are
    (pre-training run, client, seed), 2 runs x 5 clients = 10 pairs."""
    rows = []
    for client in range(5):
        base = 0.5 + 0.02 * client
        for m, d in (("random+bcp", 0.0), ("fcl+bcp", 0.03), ("fcl~1+bcp", -0.01)):
            rows.append({"method": m, "setting": "local", "N": 1, "client": str(client), "fold": "", "seed": 0,
                         "dice_mean": base + d})  # fmt: skip
    md = "\n".join(tables.pooled_gains(rows, ["random+bcp", "fcl+bcp", "fcl~1+bcp"], [1], "local"))
    line = next(ln for ln in md.splitlines() if ln.startswith("| FCL + BCP (extension), 2 pre-training runs pooled"))
    assert "vs Random init + BCP (extension)" in line and "| +0.010 [" in line and "5/10 pairs" in line
    assert tables.label("fcl~1+bcp") == "FCL (pre-training seed 1) + BCP (extension)"
    assert tables.pooled_gains(rows, ["random+bcp", "fcl+bcp"], [1], "local") == []  # one run: no pooled line
    one_finished = [r for r in rows if r["method"] != "fcl~1+bcp"]
    assert tables.pooled_gains(one_finished, ["random+bcp", "fcl+bcp", "fcl~1+bcp"], [1], "local") == []
    # N=2 finished for one run only: its cell stays empty instead of posing as a pooled figure
    n2 = [{**r, "N": 2} for r in one_finished]
    md = "\n".join(tables.pooled_gains(rows + n2, ["random+bcp", "fcl+bcp", "fcl~1+bcp"], [1, 2], "local"))
    assert next(ln for ln in md.splitlines() if "pooled |" in ln).endswith("5/10 pairs, not shown | - |")


def test_the_gain_on_top_of_semi_is_reported_without_the_plain_random_arm(tables, tmp_path):
    """A report asked for ``random+bcp,fcl+bcp`` alone still pairs them: FCL + BCP against BCP."""
    profile = tables.Profile(pretrain=[], finetune=[], ns=[2], methods=["random+bcp", "fcl+bcp"], settings=["local"],
                             seeds=[0])  # fmt: skip
    runner = tables.Runner(profile, tmp_path, [], [], [])
    for method, shift in (("random+bcp", 0.0), ("fcl+bcp", 0.02)):
        d = runner.finetune_dir(method, "local", 2, None, 0)
        d.mkdir(parents=True)
        finished_cell(d, [0.5 + 0.01 * c + shift for c in range(5)])
    md = tables.write_results(runner, profile.methods, "plateau", None)
    assert "Gains over random init" not in md  # no plain random arm asked
    line = next(ln for ln in md.splitlines() if ln.startswith("| FCL + BCP (extension) | paired gain |"))
    assert "| +0.020 [" in line and "5/5 pairs" in line


def fake_cli(tables, calls, encoder=1.0):
    """``cli`` without training: a pre-training writes an encoder of weights ``encoder``, a fine-tuning's
    test its figures and a one-round curve; ``calls`` gets (command, run folder)."""

    def cli(args):
        root = tables.Path(next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.default_root_dir=")))
        calls.append((args[0], root))
        (root / "logs/version_0").mkdir(parents=True, exist_ok=True)
        (root / "logs/version_0/metrics.csv").write_text("round,round/val/dice_mean\n1,0.4\n")
        if not any(a.startswith("--data.labelled_per_client=") for a in args):
            from fcl_lightning.io import atomic_save

            atomic_save({"w": torch.full((3,), encoder)}, root / "encoder.pt")
        elif args[0] == "test":
            seed = int(next(a.split("=")[1] for a in args if a.startswith("--seed_everything=")))
            (root / "summary.json").write_text('{"test/dice_mean": 0.5}')
            with open(root / "test_per_patient.csv", "w") as fh:
                fh.write("client,dice_rv,dice_myo,dice_lv,dice_mean,hd95_mean\n")
                fh.write(f"0,0.5,0.5,0.5,{0.5 + seed / 10},3.0\n")

    return cli


def test_records_carry_finished_cells_to_another_machine(tables, tmp_path, monkeypatch):
    """``--records DIR`` keeps each finished cell's figures and the pre-trainings' encoders apart
    from the run folder: an empty run folder on another machine gets them back as finished cells,
    runs only what is left, from the recorded encoder (never pre-training again), and a run folder
    whose own pre-training differs from the record is refused instead of mixing encoders."""
    rec = tmp_path / "records"
    seen = []
    monkeypatch.setattr(tables, "write_results", lambda runner, methods, *a: seen.append(runner.rows(methods)) or "")

    def machine(out, seeds, encoder=1.0, argv=("--records", str(rec))):
        calls = []
        monkeypatch.setattr(tables, "cli", fake_cli(tables, calls, encoder))
        tables.main(["--methods", "random,fcl", "--ns", "1", "--settings", "local", "--seeds", seeds,
                     "--out", str(tmp_path / out), *argv])  # fmt: skip
        return calls

    first = machine("a", "0")
    assert [c for c, _ in first] == ["fit", "test", "fit", "fit", "test"]  # random, fcl's pre-training, fcl
    cell = rec / "finetune/fcl/local_N1_fold-_seed0"
    assert sorted(str(p.relative_to(cell)) for p in cell.rglob("*") if p.is_file()) == [
        "cell.json", "logs/version_0/metrics.csv", "summary.json", "test_per_patient.csv"
    ]  # fmt: skip
    assert sorted(str(p.relative_to(rec / "pretrain/fcl")) for p in (rec / "pretrain/fcl").rglob("*.*")) == [
        "encoder.pt", "logs/version_0/metrics.csv", "record.json"
    ]  # fmt: skip
    hashes = tables.json.loads((rec / "pretrain/fcl/record.json").read_text())["sha256"]
    assert hashes == {"encoder.pt": tables.records.weights_hash(tmp_path / "a/pretrain/fcl/encoder.pt")}
    assert len(tables.provenance.read(rec)) == 1

    assert machine("b", "0") == []  # everything restored: nothing runs, the same rows
    assert seen[1] == seen[0] and len(seen[0]) == 2
    calls = machine("c", "0,1", encoder=2.0)  # seed 1 is new: fine-tuned from the recorded encoder
    s1 = "local_N1_fold-_seed1"
    assert [(c, str(p.relative_to(tmp_path))) for c, p in calls] == [
        ("fit", f"c/finetune/random/{s1}"), ("test", f"c/finetune/random/{s1}"),
        ("fit", f"c/finetune/fcl/{s1}"), ("test", f"c/finetune/fcl/{s1}"),
    ]  # fmt: skip
    assert tables.records.encoder_hashes(tmp_path / "c/pretrain/fcl") == hashes
    assert sorted(r["seed"] for r in seen[-1]) == [0, 0, 1, 1]
    assert (rec / "finetune/fcl/local_N1_fold-_seed1/summary.json").is_file()

    machine("d", "0", encoder=1.0 + 1e-7, argv=())  # a pre-training of its own, before the records were used
    with pytest.raises(SystemExit, match=r"pre-training fcl .* differ from its record .*encoder\.pt"):
        machine("d", "0,1,2")
    assert not (rec / "finetune/random/local_N1_fold-_seed2").exists()  # refused before anything ran
    assert tables.json.loads((rec / "pretrain/fcl/record.json").read_text())["sha256"] == hashes
    with pytest.raises(SystemExit, match="other fine-tuning arguments"):  # another budget: refused, nothing written
        machine("e", "0", argv=["--records", str(rec), "--finetune-arg=--federation.rounds=6"])
    assert not (tmp_path / "e").exists()
    only = machine("f", "0", argv=["--pretrain-only"])  # the encoders alone, the cells in a later call
    assert [(c, str(p.relative_to(tmp_path))) for c, p in only] == [("fit", "f/pretrain/fcl")]


def test_an_encoders_hash_is_of_its_weights_not_its_bytes(experiment, tmp_path):
    """The same weights saved twice differ byte for byte (the zip's record names follow the
    temporary file), yet hash the same; one changed value, dtype or name hashes otherwise."""
    from fcl_lightning.io import atomic_save

    records = experiment("records")
    w = {"conv.weight": torch.randn(4, 3), "conv.bias": torch.zeros(4), "steps": 7}
    a, b = atomic_save(w, tmp_path / "a.pt"), atomic_save(dict(reversed(w.items())), tmp_path / "b.pt")
    assert a.read_bytes() != b.read_bytes() and records.weights_hash(a) == records.weights_hash(b)
    for other in ({**w, "steps": 8}, {**w, "conv.bias": torch.zeros(4, dtype=torch.float64)},
                  {**w, "conv.bias": torch.full((4,), 1e-9)}, {"x" + k: v for k, v in w.items()}):  # fmt: skip
        assert records.weights_hash(atomic_save(other, tmp_path / "c.pt")) != records.weights_hash(a)
