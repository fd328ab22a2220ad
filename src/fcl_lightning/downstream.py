"""Downstream evaluation: fine-tune briefly from an encoder and from random init on a few
labelled patients per client, score on held-out volumes. It is the figure sweeps optimise
(``downstream/fcl/dice_mean``) and what the demo prints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fcl_lightning.console import log_console
from fcl_lightning.errors import ConfigError
from fcl_lightning.evaluation import (
    STRUCTURES,
    evaluate_volumes,
    over_clients,
    paired_gain,
    predict_volume,
    summarize,
)
from fcl_lightning.fcl.partition import volume_slices
from fcl_lightning.layout import INIT_ENCODER
from fcl_lightning.lit.segment import SegmentationModule, encoder_state_from_file, load_encoder
from fcl_lightning.runtime import DEVICE_KEYS, quiet_lightning, quiet_trainer, seed_all
from fcl_lightning.semi.objectives import SemiSupervised

#: the ``trainer`` settings a fine-tuning Trainer takes over from the template (where it runs)


class DownstreamEvaluation:
    """Local fine-tuning (each client alone) from the pre-trained encoder vs random init.

    Args:
        labelled_per_client: N labelled patients (both frames) per client.
        steps: optimiser steps of each fine-tuning run.
        lr: Adam learning rate of the fine-tuning.
        every_n_rounds: also run after every this many pre-training rounds (``None``: only at the end).
        compare_random: also fine-tune from random init (the baseline column).
        clients: which clients fine-tune (``None``: all).
        figure: write ``downstream.png`` (examples) and ``embedding.png`` (PCA of features by partition).
        accelerator: Lightning accelerator of the fine-tuning Trainers (``None``: the ``trainer``
            section's, like the device settings ``devices`` and ``precision``).
        encoder_lr_scale: the encoder's learning rate as a multiple of ``lr``, for both inits
            (``SegmentationModule.encoder_lr_scale``).
        random_init: what the random-init column starts from. ``fresh``: a new draw for every
            fine-tuning run (its seed); ``start``: the weights this pre-training started from
            (``encoder_init.pt``), so both columns share the random draw and differ only by what
            pre-training changed (a paired comparison: the init's luck cancels).
        semi_supervised: also fine-tune from the pre-trained encoder with this plug-in on each
            client's own unlabelled slices (a third row, ``fcl_semi``; e.g. ``UniMatch``).
        space: where the held-out volumes are scored: ``preprocessed`` (the training grid; the
            default, since this runs during pre-training) or ``native`` (each scan's own grid, as
            ``test`` scores by default).
        seeds: fine-tuning seeds per client and row. The gain of the pre-trained encoder over
            random init is reported as a paired difference with its bootstrap 95% interval over
            the (client, seed) pairs (``downstream/gain/*``): one seed's difference is mostly
            the fine-tuning's own noise.
    """

    def __init__(
        self,
        labelled_per_client: int = 1,
        steps: int = 100,
        lr: float = 1e-3,
        every_n_rounds: int | None = None,
        compare_random: bool = True,
        clients: list[int] | None = None,
        figure: bool = True,
        accelerator: str | None = None,
        encoder_lr_scale: float = 1.0,
        random_init: Literal["fresh", "start"] = "fresh",
        semi_supervised: SemiSupervised | None = None,
        space: Literal["preprocessed", "native"] = "preprocessed",
        seeds: int = 1,
    ) -> None:
        if seeds < 1:
            raise ConfigError(f"downstream.seeds must be >= 1, got {seeds}")
        self.seeds = seeds
        if labelled_per_client < 1 or steps < 1 or not lr > 0:
            raise ConfigError(
                f"downstream: labelled_per_client and steps must be >= 1 and lr > 0, got {labelled_per_client}, {steps}, {lr}"
            )
        if every_n_rounds is not None and every_n_rounds < 0:
            raise ConfigError(
                f"downstream.every_n_rounds must be >= 0 (0: after the last round only), got {every_n_rounds}"
            )
        if space not in ("preprocessed", "native"):
            raise ConfigError(f"downstream.space must be 'preprocessed' or 'native', got {space!r}")
        self.space = space
        if random_init not in ("fresh", "start"):
            raise ConfigError(f"downstream.random_init must be 'fresh' or 'start', got {random_init!r}")
        self.random_init = random_init
        self.labelled_per_client, self.steps, self.lr = labelled_per_client, steps, lr
        self.every_n_rounds, self.compare_random, self.clients = every_n_rounds, compare_random, clients
        self.figure, self.accelerator, self.encoder_lr_scale = figure, accelerator, encoder_lr_scale
        self.semi = semi_supervised

    def trainer_settings(self, trainer_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """The device settings of the ``trainer`` template that a fine-tuning Trainer takes over."""
        kw = {k: v for k, v in (trainer_kwargs or {}).items() if k in DEVICE_KEYS and v is not None}
        if self.accelerator is not None:
            kw["accelerator"] = self.accelerator
        return kw

    def finetune(
        self,
        encoder: dict[str, torch.Tensor] | None,
        features: list[int],
        norm: str,
        datamodule: Any,
        client: int,
        seed: int,
        trainer_kwargs: dict[str, Any] | None = None,
        semi: SemiSupervised | None = None,
    ) -> SegmentationModule:
        """One client's fine-tuning run from ``encoder`` (``None``: random init), on the device
        the ``trainer`` template (``trainer_kwargs``) names; ``semi``: semi-supervised."""
        seed_all(seed)
        module = SegmentationModule(
            features=features,
            norm=norm,
            encoder_lr_scale=self.encoder_lr_scale,
            optimizer=lambda p: torch.optim.Adam(p, lr=self.lr),
            semi_supervised=semi,
        )
        if encoder is not None:
            load_encoder(module.net, encoder, "pre-trained encoder")
            module.init_client_state()  # a teacher starts from the loaded student
        ratio = module.semi.ratio if module.semi is not None else 0
        loader = datamodule.finetune_loader(client, seed, self.labelled_per_client, unlabelled_ratio=ratio)
        module.attach_augment(datamodule)
        settings = self.trainer_settings(trainer_kwargs)
        with quiet_lightning():  # scored on the training device, no round trip to the CPU
            trainer = quiet_trainer(settings, max_steps=self.steps, max_epochs=-1)
            trainer.fit(module, train_dataloaders=loader)
        return module.to(trainer.strategy.root_device).eval()  # a no-op when the Trainer kept it there

    def run(
        self,
        pretrain_module: Any,
        datamodule: Any,
        root: str | Path,
        seed: int,
        console: Console | None = None,
        final: bool = True,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """Fine-tune and score every client from the module's encoder (and from random init);
        the fine-tuning Trainers take the device settings of ``trainer_kwargs`` (the ``trainer``
        section)."""
        features, norm = list(pretrain_module.encoder.features), pretrain_module.hparams.get("norm", "instance")
        encoder = pretrain_module.encoder_state()
        clients = self.clients if self.clients is not None else list(range(datamodule.num_clients))
        inits = {"fcl": encoder, **({"random": self.random_weights(root)} if self.compare_random else {})}
        if self.semi is not None:
            inits["fcl_semi"] = encoder
        per_client: dict[str, list[dict[str, float]]] = {k: [] for k in inits}
        per_pair: dict[str, dict[tuple[int, int], float]] = {k: {} for k in inits}  # (client, seed) -> Dice
        example_nets: dict[str, torch.nn.Module] = {}
        for i, c in enumerate(clients):
            vols = datamodule.eval_volumes(c)
            if not vols:
                raise ValueError(
                    f"client {c} has no held-out volumes to score (set data.test_source or val_fraction > 0)"
                )
            for name, enc in inits.items():
                runs = []
                for k in range(self.seeds):
                    t0 = time.perf_counter()
                    module = self.finetune(
                        enc,
                        features,
                        norm,
                        datamodule,
                        c,
                        seed * 31 + c + 1000 * k,  # seed 0 is the single-seed run's
                        trainer_kwargs,
                        self.semi if name == "fcl_semi" else None,
                    )
                    runs.append(self.score(module, datamodule, vols))
                    per_pair[name][(c, k)] = runs[-1]["dice_mean"]
                    if console is not None:  # progress (stderr): fine-tuning is most of the demo's time
                        of_seeds = f", seed {k + 1}/{self.seeds}" if self.seeds > 1 else ""
                        log_console().print(
                            f"downstream: client {i + 1}/{len(clients)} (#{c}) from "
                            f"{self.label(name)}{of_seeds}: "
                            f"{self.steps} steps, Dice {runs[-1]['dice_mean']:.3f} on "
                            f"{len(vols)} held-out volumes ({time.perf_counter() - t0:.1f} s)"
                        )
                    if c == clients[0] and k == 0:
                        example_nets[name] = module.net
                    else:
                        module.cpu()
                per_client[name].append({key: float(np.mean([r[key] for r in runs])) for key in runs[0]})
        metrics = self.metrics(per_client, clients)
        gains = self.gains(per_pair, metrics)
        if console is not None:
            self.report(console, metrics, gains, list(inits), len(clients))
        if self.figure and final:
            self.save_figures(Path(root), pretrain_module, datamodule, example_nets, clients[0])
        return metrics

    def score(self, module: Any, datamodule: Any, vols: list) -> dict[str, float]:
        """A fine-tuned client's summary over its held-out volumes (native space: the original scans)."""
        if self.space == "native":
            from fcl_lightning.predict import score_native

            source = datamodule.test_source if datamodule.scores_test_set else datamodule.source
            rows = score_native(module.net, datamodule.preprocessor, source, vols, module.eval_batch_size)
        else:
            rows = evaluate_volumes(module.net, vols)
        return summarize(rows)

    @staticmethod
    def metrics(per_client: dict[str, list[dict[str, float]]], clients: list[int]) -> dict[str, float]:
        """``downstream/<init>/...``: mean and spread over clients, and each client's mean Dice."""
        metrics: dict[str, float] = {}
        for name, rows in per_client.items():
            metrics.update(
                over_clients(rows, [f"dice_{s}" for s in STRUCTURES] + ["dice_mean", "hd95_mean"], f"downstream/{name}")
            )
            for c, r in zip(clients, rows):
                metrics[f"downstream/{name}/client{c}/dice_mean"] = r["dice_mean"]
        return metrics

    @staticmethod
    def gains(per_pair: dict[str, dict[tuple[int, int], float]], metrics: dict[str, float]) -> dict:
        """Each pre-trained init against random init, paired over (client, seed), into ``metrics``
        as ``downstream/gain/<init>_vs_random/{mean,low,high,pairs}``."""
        gains = {
            other: paired_gain(per_pair[other], per_pair["random"])
            for other in ("fcl", "fcl_semi")
            if other in per_pair and "random" in per_pair
        }
        for other, g in gains.items():
            if g is not None:
                metrics.update(
                    {
                        f"downstream/gain/{other}_vs_random/{k}": float(v)
                        for k, v in (("mean", g.mean), ("low", g.low), ("high", g.high), ("pairs", g.pairs))
                    }
                )
        return gains

    def report(self, console: Console, metrics: dict[str, float], gains: dict, inits: list[str], n: int) -> None:
        """The table, then each paired gain against random init with its interval."""
        console.print(self.table(metrics, inits, n))
        for other, g in gains.items():
            if g is None:
                continue
            what = {"fcl": "FCL encoder", "fcl_semi": f"FCL encoder + {type(self.semi).__name__}"}[other]
            note = ("" if g.shown else " (the interval holds 0: this budget does not tell them apart)") + (
                " - one fine-tuning seed: set downstream.seeds >= 3 to tell" if self.seeds == 1 else ""
            )
            console.print(
                f"{what} - {self.random_label}, paired over (client, seed): {g.mean:+.3f} "
                f"[{g.low:+.3f}, {g.high:+.3f}] (95% bootstrap), {g.wins}/{g.pairs} pairs ahead{note}",
                soft_wrap=True,
            )

    def label(self, name: str) -> str:
        """A row's name in the progress lines and the table."""
        if name == "fcl_semi":
            return f"the pre-trained encoder + {type(self.semi).__name__} (unlabelled slices)"
        return "the pre-trained encoder" if name == "fcl" else self.random_label

    @property
    def random_label(self) -> str:
        return "random init" if self.random_init == "fresh" else "random init (pre-training's start)"

    def random_weights(self, root: str | Path) -> dict[str, torch.Tensor] | None:
        """The random-init column's starting weights (``None``: a fresh draw per run)."""
        if self.random_init == "fresh":
            return None
        return encoder_state_from_file(self.check_start(root))

    def check_start(self, root: str | Path) -> Path:
        """``encoder_init.pt`` of the run in ``root``, or the error naming it (read nothing)."""
        path = Path(root) / INIT_ENCODER
        if self.random_init == "start" and not path.is_file():
            raise ConfigError(
                f"downstream.random_init: start needs {path}, the weights the pre-training started from "
                "(written when a pre-training starts; a run resumed from an older checkpoint has none: "
                "use random_init: fresh)"
            )
        return path

    def table(self, metrics: dict[str, float], inits: list[str], n_clients: int) -> Table:
        t = Table(
            title=f"Downstream Dice, local fine-tuning with N={self.labelled_per_client} labelled "
            f"patient(s) per client, mean ± std over {n_clients} clients"
            + (f" (each the mean of {self.seeds} seeds)" if self.seeds > 1 else "")
        )
        t.add_column("init")
        for s in (*STRUCTURES, "mean"):
            t.add_column(f"Dice {s.upper() if s != 'mean' else s}", justify="right")
        t.add_column("HD95 mean (mm)", justify="right")
        for name in inits:
            cells = [
                f"{metrics[f'downstream/{name}/dice_{s}']:.3f} ± {metrics[f'downstream/{name}/dice_{s}_std']:.3f}"
                for s in (*STRUCTURES, "mean")
            ]
            t.add_row(
                {"fcl": "FCL encoder", "fcl_semi": f"FCL encoder + {type(self.semi).__name__}"}.get(
                    name, self.random_label
                ),
                *cells,
                f"{metrics[f'downstream/{name}/hd95_mean']:.1f}",
            )
        return t

    def save_figures(
        self, root: Path, pretrain_module: Any, datamodule: Any, nets: dict[str, torch.nn.Module], client: int
    ) -> None:
        from fcl_lightning.figures import save_embedding_figure, save_example_figure

        vol = datamodule.eval_volumes(client)[0]
        d = vol.num_slices
        zs = sorted({d // 5, d // 2, (4 * d) // 5})
        preds = {name: predict_volume(net, vol.image) for name, net in nets.items()}
        columns = {"ground truth": [vol.label[0, :, :, z].cpu().numpy() for z in zs]}  # volumes_on: device
        for name, pred in preds.items():
            title = {"fcl": "FCL init", "fcl_semi": "FCL + semi"}.get(name, "random init")
            columns[title] = [pred[0, :, :, z].cpu().numpy() for z in zs]
        save_example_figure(
            root / "downstream.png",
            [vol.image[0, :, :, z].cpu().numpy() for z in zs],
            columns,
            title=f"{vol.record.key}: N={self.labelled_per_client} labelled patient(s), {self.steps} steps",
            row_labels=[f"slice {z}/{d}" for z in zs],
        )
        feats, parts = [], []
        pretrain_module.eval()
        with torch.no_grad():
            for v in datamodule.eval_volumes(client)[:20]:
                x, p = volume_slices([v.image], datamodule.num_partitions)
                feats.append(pretrain_module.embed(x.to(pretrain_module.device)).cpu().numpy())
                parts.append(p.numpy())
        save_embedding_figure(
            root / "embedding.png",
            np.concatenate(feats),
            np.concatenate(parts),
            title="pre-trained features of held-out slices (PCA), by partition",
        )
        pretrain_module.cpu()
