"""``fcl-lightning-sweep``: run a wandb sweep file with no wandb server (air-gapped sites).

It reads the **same YAML** that ``wandb sweep`` takes, proposes trials with wandb's open-source
sweep engine (the ``sweeps`` package: grid, random, bayes), runs each trial as the sweep's own
command line (``fcl-lightning fit --config <base> --<param>=<value> ...``) in its own folder,
reads the metric from the trial's ``summary.json``, and writes ``results.csv``, ``results.md`` and
``best_config.yaml``. Trials log to wandb offline when the base config has a WandbLogger (sync
later with ``wandb sync``). Calling it again continues the sweep: finished trials are kept and
fed back to the engine.

    fcl-lightning-sweep configs/sweeps/fcl_pretrain.yaml --count 8
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from fcl_lightning import layout
from fcl_lightning.errors import UserError
from fcl_lightning.io import atomic_write, atomic_write_text

METHODS = ("grid", "random", "bayes")


class SweepError(UserError):
    """A sweep file that cannot run; raised before any trial starts."""


def sweep_engine() -> Any:
    """wandb's open-source sweep engine (the ``sweeps`` package, the ``[sweep]`` extra)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the engine's pydantic-v1 style config warns on import
        try:
            import sweeps
        except ImportError:
            raise SweepError(
                "the air-gapped sweep runner needs wandb's sweep engine: pip install 'fcl-lightning[sweep]'"
            ) from None
    return sweeps


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and validate a wandb sweep YAML with the ``sweeps`` package's own schema
    (``configs/sweeps/...`` names a shipped one when there is no such file here, as ``--config``)."""
    from fcl_lightning.cli import packaged_config

    path = Path(packaged_config(str(path)))
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(cfg, dict):
        raise SweepError(f"{path} must hold a mapping (method, metric, parameters, command)")
    problems = sweep_engine().schema_violations_from_proposed_config(cfg)
    if problems:
        raise SweepError(f"{path} is not a valid wandb sweep: " + "; ".join(problems))
    if cfg.get("method") not in METHODS:
        raise SweepError(f"{path}: method must be one of {METHODS}, got {cfg.get('method')!r}")
    if not (cfg.get("metric") or {}).get("name"):
        raise SweepError(f"{path}: metric.name is required (the summary.json key to optimise)")
    for name, spec in cfg["parameters"].items():
        if isinstance(spec, dict) and "parameters" in spec:
            raise SweepError(
                f"{path}: parameter {name!r} is nested; write it as a dotted path "
                f"(e.g. model.init_args.objective.init_args.temperature)"
            )
    return cfg


def format_value(value: Any) -> str:
    """A value as wandb's agent writes it into ``${args}`` (JSON for numbers and lists)."""
    if hasattr(value, "item"):  # numpy scalars from the engine
        value = value.item()
    return value if isinstance(value, str) else json.dumps(value)


def sample_value(spec: dict[str, Any]) -> Any:
    """One legal value of a parameter spec (to check the path parses before any trial)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][0]
    lo = spec.get("min", spec.get("mu", 0))
    if "log" in spec.get("distribution", "") and "values" not in spec.get("distribution", ""):
        return math.exp(lo)  # log_uniform / q_log_uniform take min/max as exponents
    return lo


def command_for(cfg: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The sweep's ``command`` with wandb's macros expanded, as ``wandb agent`` would run it; the
    ``fcl-lightning`` program runs through this interpreter so the trial uses this environment."""
    args = [f"--{k}={format_value(v)}" for k, v in params.items()]
    template = cfg.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    out: list[str] = []
    for tok in template:
        if tok == "${env}":
            continue
        if tok == "${interpreter}":
            out.append(sys.executable)
        elif tok == "${program}":
            out.append(str(cfg.get("program", "")))
        elif tok == "${args}":
            out.extend(args)
        elif tok == "${args_no_hyphens}":
            out.extend(a[2:] for a in args)
        else:
            out.append(str(tok))
    if out and out[0] == "fcl-lightning":
        out = [sys.executable, "-m", "fcl_lightning.cli", *out[1:]]
    return out


def check_parameters(cfg: dict[str, Any], cwd: Path) -> None:
    """Parse the trial command once with a sample value of every parameter (``--print_config``):
    an unknown parameter path or an ill-typed value fails here, before any trial runs."""
    params = {k: sample_value(v) for k, v in cfg["parameters"].items()}
    cmd = command_for(cfg, params) + ["--print_config"]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if res.returncode != 0:
        err = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        raise SweepError(
            "the sweep's command does not accept its parameters:\n  "
            + " ".join(cmd[:6])
            + " ...\n"
            + "\n".join(err[-6:])
        )


def metric_from_summary(summary: dict[str, Any], name: str) -> float | None:
    """``name`` from a trial's ``summary.json``: a top-level key (``downstream/fcl/dice_mean``,
    ``test/dice_mean``) or a last-round key of the stage (``round/val/dice_mean``)."""
    if name in summary:
        return float(summary[name])
    for stage in ("pretrain", "finetune"):
        final = (summary.get(stage) or {}).get("final") or {}
        short = name.removeprefix("round/")
        if short in final:
            return float(final[short])
    return None


class LocalSweep:
    """Propose, run and record trials of one sweep file in ``out``."""

    def __init__(
        self,
        sweep_file: str | Path,
        out: str | Path,
        cwd: str | Path = ".",
        console: Console | None = None,
        wandb_mode: str = "offline",
    ) -> None:
        self.file = Path(sweep_file)
        self.cfg = load_sweep(self.file)
        self.out, self.cwd = Path(out), Path(cwd)
        self.console = console or Console(stderr=True)
        self.wandb_mode = wandb_mode
        self.metric = self.cfg["metric"]["name"]
        self.goal = self.cfg["metric"].get("goal", "minimize")

    @property
    def trials_file(self) -> Path:
        return self.out / "trials.jsonl"

    def finished(self) -> list[dict[str, Any]]:
        if not self.trials_file.is_file():
            return []
        return [json.loads(ln) for ln in self.trials_file.read_text().splitlines() if ln.strip()]

    def propose(self, done: list[dict[str, Any]]) -> dict[str, Any] | None:
        sweeps = sweep_engine()
        runs = [
            sweeps.SweepRun(
                name=t["trial"],
                config={k: {"value": v} for k, v in t["params"].items()},
                state=sweeps.RunState.finished if t["status"] == "finished" else sweeps.RunState.failed,
                summary_metrics={self.metric: t["metric"]} if t["metric"] is not None else {},
            )
            for t in done
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = sweeps.next_run(self.cfg, runs, validate=True)
        if run is None:
            return None
        return {k: (v["value"].item() if hasattr(v["value"], "item") else v["value"]) for k, v in run.config.items()}

    def run_trial(self, index: int, params: dict[str, Any]) -> dict[str, Any]:
        name = f"trial-{index:03d}"
        tdir = (self.out / name).resolve()
        if tdir.exists():  # a trial cut off mid-run: start it again from scratch
            shutil.rmtree(tdir)
        tdir.mkdir(parents=True)
        cmd = command_for(self.cfg, params) + [f"--trainer.default_root_dir={tdir}"]
        env = {**os.environ, "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", self.file.stem)}
        env.setdefault("WANDB_MODE", self.wandb_mode)
        t0 = time.perf_counter()
        with open(tdir / "log.txt", "w") as log:
            rc = subprocess.run(cmd, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        metric = None
        if rc == 0 and (tdir / layout.SUMMARY).is_file():
            metric = metric_from_summary(json.loads((tdir / layout.SUMMARY).read_text()), self.metric)
        ok = rc == 0 and metric is not None and not math.isnan(metric)
        return {
            "trial": name,
            "params": params,
            "metric": metric,
            "status": "finished" if ok else "failed",
            "returncode": rc,
            "wall_s": round(time.perf_counter() - t0, 1),
            "dir": str(tdir),
        }

    def run(self, count: int | None) -> list[dict[str, Any]]:
        """Run trials until ``count`` exist (``None``: until a grid is exhausted)."""
        if count is None and self.cfg["method"] != "grid":
            raise SweepError(f"--count is required for method {self.cfg['method']!r}")
        check_parameters(self.cfg, self.cwd)
        self.out.mkdir(parents=True, exist_ok=True)
        done = self.finished()
        if done:
            self.console.print(f"continuing {self.out}: {len(done)} trial(s) already finished")
        t_start = time.perf_counter()
        ran = 0
        while count is None or len(done) < count:
            params = self.propose(done)
            if params is None:
                self.console.print("grid exhausted")
                break
            total = "?" if count is None else str(count)
            eta = ""
            if ran:
                per = (time.perf_counter() - t_start) / ran
                eta = f", ETA {per * (count - len(done)) / 60:.1f} min" if count is not None else ""
            self.console.print(
                f"[bold]trial {len(done) + 1}/{total}[/]{eta}: "
                + " ".join(f"{k}={format_value(v)}" for k, v in params.items())
            )
            rec = self.run_trial(len(done), params)
            ran += 1
            done.append(rec)
            with open(self.trials_file, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            shown = "failed (see " + rec["dir"] + "/log.txt)" if rec["status"] != "finished" else f"{rec['metric']:.4f}"
            self.console.print(f"  {self.metric} = {shown} ({rec['wall_s']:.0f} s)")
        self.write_results(done)
        return done

    def best(self, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
        ok = [t for t in trials if t["status"] == "finished"]
        if not ok:
            return None
        return (max if self.goal == "maximize" else min)(ok, key=lambda t: t["metric"])

    def write_results(self, trials: list[dict[str, Any]]) -> None:
        keys = list(self.cfg["parameters"])

        def write_csv(tmp: Path) -> None:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["trial", *keys, self.metric, "status", "wall_s"])
                for t in trials:
                    w.writerow([t["trial"], *[t["params"].get(k) for k in keys], t["metric"], t["status"], t["wall_s"]])

        atomic_write(self.out / "results.csv", write_csv)
        best = self.best(trials)
        lines = [
            f"# Sweep `{self.file}` ({self.cfg['method']}, {self.goal} `{self.metric}`)",
            "",
            "| trial | " + " | ".join(f"`{k}`" for k in keys) + f" | {self.metric} |",
            "|---|" + "---|" * len(keys) + "---|",
        ]
        for t in trials:
            m = f"{t['metric']:.4f}" if t["status"] == "finished" else "failed"
            if best is not None and t is best:
                m = f"**{m}**"
            lines.append(
                f"| {t['trial']} | " + " | ".join(format_value(t["params"].get(k)) for k in keys) + f" | {m} |"
            )
        atomic_write_text("\n".join(lines) + "\n", self.out / "results.md")
        self.console.print("\n".join(lines[2:]))
        if best is not None:
            src = Path(best["dir"]) / layout.CONFIG
            if src.is_file():
                atomic_write_text(src.read_text(), self.out / "best_config.yaml")
            atomic_write_text(json.dumps(best, indent=2) + "\n", self.out / "best.json")
            self.console.print(
                f"best: {best['trial']} {self.metric} = {best['metric']:.4f}; config in {self.out / 'best_config.yaml'}"
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="fcl-lightning-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("sweep_file", help="a wandb sweep YAML (e.g. configs/sweeps/fcl_pretrain.yaml)")
    ap.add_argument("--count", type=int, default=None, help="number of trials in all (default: the whole grid)")
    ap.add_argument("--out", default=None, help="sweep folder (default: runs/sweeps/<file name>)")
    ap.add_argument(
        "--wandb-mode",
        default="offline",
        choices=["offline", "online", "disabled"],
        help="WANDB_MODE of the trials when the environment does not set it (default offline)",
    )
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    try:
        sweep = LocalSweep(
            args.sweep_file,
            args.out or Path("runs/sweeps") / Path(args.sweep_file).stem,
            console=console,
            wandb_mode=args.wandb_mode,
        )
        trials = sweep.run(args.count)
    except SweepError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise SystemExit(2) from None
    if not any(t["status"] == "finished" for t in trials):
        raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
