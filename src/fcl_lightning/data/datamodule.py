"""The federated data module: one source split into clients, a loader per client.

The federated loop asks it for each client's loaders; which loader (partition-sampled
pre-training batches or labelled slices) is the LightningModule's choice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from jsonargparse import lazy_instance
from torch.utils.data import DataLoader

from fcl_lightning.console import log_console
from fcl_lightning.data.augment import AugmentConfig, BatchAugment, finetune_augment, pretrain_augment
from fcl_lightning.data.datasets import (
    EpochKeySampler,
    LabelledSliceDataset,
    PartitionDataset,
    SemiSupervisedSliceDataset,
    collate_partitions,
)
from fcl_lightning.data.folders import FolderSource, SiteFolders  # noqa: F401 (--help lists the sources)
from fcl_lightning.data.phantom import PhantomSource
from fcl_lightning.data.preprocess import Preprocessor, load_volumes
from fcl_lightning.data.split import federated_split, kfold_split, train_val_split
from fcl_lightning.data.volume import DataError, Volume, VolumeRecord, VolumeSource

log = logging.getLogger(__name__)


class FederatedDataModule(pl.LightningDataModule):
    """Volumes of ``source`` split over ``num_clients`` clients, preprocessed once and cached.

    Args:
        source: where volumes come from: ``PhantomSource`` (the default), ``FolderSource`` (one
            site's folder in any layout), ``SiteFolders`` (a folder per site), ``ACDCSource``,
            ``ManifestSource``, ``NiftiFolderSource`` or your own ``VolumeSource`` subclass
            (``class_path``). Scans without a label file are unlabelled.
        num_clients: number of clients C.
        split: ``iid`` (random), ``group`` (non-IID by diagnostic group) or ``site`` (the
            source's own site/client ids, e.g. a manifest's ``client`` column).
        val_fraction: share of each client's patients held out for validation (drawn from its
            labelled and its unlabelled patients separately; only labelled volumes are scored).
        cv_folds: if set, k-fold cross-validation inside each client (the paper's protocol): fold
            ``cv_fold`` of each client's labelled patients is held out and scored, the rest
            (and every unlabelled patient) is training data.
        cv_fold: which fold is held out.
        test_source: a separate held-out test set (another root or id range); ``None``: none.
        root: shortcut that sets ``root`` of ``source`` and ``test_source`` when they have one
            (so ``--data.root PATH`` points an ACDC config at your copy of the data).
        num_partitions: S, partitions per volume along the slice axis.
        volumes_per_batch: V, volumes per pre-training batch (a batch holds V * S slices).
        batch_size: slices per fine-tuning batch.
        labelled_per_client: a simulation knob for fully labelled data: fine-tune with the
            labels of the first N (by id) labelled training patients of each client and treat the
            rest as unlabelled. ``None``: every scan that has a label is labelled, every other one
            unlabelled (real, partially labelled data).
        spacing: in-plane target spacing in mm.
        img_size: in-plane crop/pad size (128 default, 192 for the paper's scale).
        cache_dir: optional on-disk cache of preprocessed volumes.
        augment: augmentation strengths; ``augment_pretrain`` / ``augment_finetune`` switch them.
        augment_on: ``loader``: MONAI's per-sample pipelines in the DataLoader (what the measured
            figures used); ``device``: the same kinds of augmentation on whole batches on the
            training device after transfer (``BatchAugment``; no CPU worker limits a GPU, and on
            a CPU the demo's fine-tuning takes about half as long).
        volumes_on: ``cpu``: preprocessed volumes stay in CPU memory and every batch is copied
            to the training device; ``device``: the federation moves them to the training device
            once (:meth:`place`; all 200 ACDC volumes at 128 px are ~150 MB), so partitions are
            sampled and batches assembled there (needs ``num_workers: 0``; with ``augment_on:
            device`` no CPU touches a batch). A no-op when training on the CPU.
        two_views: augment query and key views independently (MoCo); else the key sees the query's input.
        num_workers: DataLoader workers.
        seed: seed of the split (training randomness is seeded by the loop).
        first_client: the federation-wide id of this datamodule's first client: a Flower node
            whose ``data-root`` holds one site's data is client ``partition-id``, and its
            validation split is seeded as the in-process run seeds that client's.
    """

    def __init__(
        self,
        source: VolumeSource = lazy_instance(PhantomSource),
        num_clients: int = 4,
        split: Literal["iid", "group", "site"] = "iid",
        val_fraction: float = 0.2,
        cv_folds: int | None = None,
        cv_fold: int = 0,
        test_source: VolumeSource | None = None,
        root: str | None = None,
        num_partitions: int = 4,
        volumes_per_batch: int = 3,
        batch_size: int = 16,
        labelled_per_client: int | None = None,
        spacing: float = 1.367,
        img_size: int = 128,
        cache_dir: str | None = None,
        augment: AugmentConfig = AugmentConfig(),
        augment_pretrain: bool = True,
        augment_finetune: bool = True,
        augment_on: Literal["loader", "device"] = "loader",
        volumes_on: Literal["cpu", "device"] = "cpu",
        two_views: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        first_client: int = 0,
    ) -> None:
        super().__init__()
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if num_partitions < 1 or volumes_per_batch < 1:
            raise ValueError("num_partitions and volumes_per_batch must be >= 1")
        if batch_size < 1 or (labelled_per_client is not None and labelled_per_client < 1):
            raise ValueError(
                f"data.batch_size and data.labelled_per_client must be >= 1 (got {batch_size}, {labelled_per_client})"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if cv_folds is not None and not (cv_folds >= 2 and 0 <= cv_fold < cv_folds):
            raise ValueError(f"data.cv_folds must be >= 2 and data.cv_fold in [0, cv_folds), got {cv_folds}, {cv_fold}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if spacing <= 0 or img_size < 1:
            raise ValueError(f"data.spacing must be > 0 and data.img_size >= 1 (got {spacing}, {img_size})")
        self.img_size = int(img_size)
        self.source, self.test_source = source, test_source
        if root:
            for src in (source, test_source):
                if src is not None and hasattr(src, "root"):
                    src.root = Path(root).expanduser()
                    if hasattr(src, "_records"):
                        src._records = None
        self.num_clients, self.split, self.val_fraction = num_clients, split, val_fraction
        self.num_partitions, self.volumes_per_batch, self.batch_size = num_partitions, volumes_per_batch, batch_size
        self.labelled_per_client = labelled_per_client
        self.cv_folds, self.cv_fold = cv_folds, cv_fold
        self.preprocessor = Preprocessor(spacing=spacing, size=img_size, cache_dir=cache_dir)
        self.augment_cfg, self.augment_pretrain, self.augment_finetune = augment, augment_pretrain, augment_finetune
        self.two_views, self.num_workers, self.seed = two_views, num_workers, seed
        if augment_on not in ("loader", "device"):
            raise ValueError(f"data.augment_on must be 'loader' or 'device', got {augment_on!r}")
        self.augment_on = augment_on
        if volumes_on not in ("cpu", "device"):
            raise ValueError(f"data.volumes_on must be 'cpu' or 'device', got {volumes_on!r}")
        if volumes_on == "device" and num_workers:
            raise ValueError(
                f"data.volumes_on=device needs data.num_workers=0 (got {num_workers}): batches are "
                "assembled from volumes on the training device, in the training process"
            )
        self.volumes_on = volumes_on
        if first_client < 0:
            raise ValueError(f"data.first_client must be >= 0, got {first_client}")
        self.first_client = first_client
        self._ready = self._eval_ready = self._val_loaded = False

    # ------------------------------------------------------------------ setup
    @property
    def ready(self) -> bool:
        """Whether :meth:`setup` has loaded the volumes."""
        return self._ready

    def setup(self, stage: str | None = None) -> None:
        """Split patients over clients and preprocess the volumes the stage needs (once; later calls
        are no-ops). ``test`` / ``validate`` load only what they score, not the training volumes."""
        eval_only = stage in ("test", "validate", "val")
        if self._ready or (eval_only and self._eval_ready and (stage == "test" or self._val_loaded)):
            return
        records = self.source.records()
        clients = federated_split(records, self.num_clients, self.split, self.seed)
        by_patient: dict[str, list[VolumeRecord]] = {}
        for r in records:
            by_patient.setdefault(r.patient, []).append(r)
        self.splits = [self.client_split(c, patients, by_patient) for c, patients in enumerate(clients)]
        self.train_patients = [tr for tr, _ in self.splits]
        load = lambda patients: load_volumes(  # noqa: E731
            self.source, [r for p in patients for r in by_patient[p]], self.preprocessor
        )
        # scoring needs the held-out volumes only: test the test set, validate and cross-validation the
        # held-out patients
        val_needed = stage != "test" or self.cv_folds or self.test_source is None
        self.val = [load(va) if val_needed else [] for _, va in self.splits]
        self.train = [[] if eval_only else load(tr) for tr, _ in self.splits]
        self.volume_ids = []
        next_id = 0
        for vols in self.train:
            for v in vols:
                if v.num_slices < self.num_partitions:
                    raise DataError(
                        f"{v.record.key}: {v.num_slices} slices, fewer than num_partitions={self.num_partitions}"
                    )
            self.volume_ids.append(list(range(next_id, next_id + len(vols))))
            next_id += len(vols)
        self.test = []
        if self.test_source is not None:
            self.test = load_volumes(self.test_source, self.test_source.records(), self.preprocessor)
        self._eval_ready, self._val_loaded = True, bool(val_needed)
        self._ready = not eval_only
        text = self.describe(training=not eval_only, validation=bool(val_needed))
        log_console().print(text, soft_wrap=True, markup=False, highlight=False)

    def client_split(
        self, client: int, patients: list[str], by_patient: dict[str, list[VolumeRecord]]
    ) -> tuple[list[str], list[str]]:
        """``(training, held-out)`` patients of a client. Only labelled patients (one labelled
        volume or more) can be scored, so validation and cross-validation folds are drawn from
        them; unlabelled patients are split by ``val_fraction`` on their own (the label-free
        monitors use them) and never into a cross-validation fold. On fully labelled data this is
        the plain split of all patients."""
        seed = self.seed + self.first_client + client
        labelled = [p for p in patients if any(r.labelled for r in by_patient[p])]
        unlabelled = [p for p in patients if p not in set(labelled)]
        if self.cv_folds:
            if len(labelled) < self.cv_folds:
                raise DataError(
                    f"client {client} has {len(labelled)} labelled patient(s), fewer than data.cv_folds="
                    f"{self.cv_folds} (cross-validation folds hold labelled patients): lower data.cv_folds "
                    "or use data.val_fraction"
                )
            tr, va = kfold_split(labelled, self.cv_folds, self.cv_fold, seed)
            return sorted(tr + unlabelled, key=patients.index), va
        tr, va = train_val_split(labelled, self.val_fraction, seed) if labelled else ([], [])
        if unlabelled:
            tr_u, va_u = train_val_split(unlabelled, self.val_fraction, seed)
            tr, va = sorted(tr + tr_u, key=patients.index), sorted(va + va_u, key=patients.index)
        return tr, va

    def describe(self, training: bool = True, validation: bool = True) -> str:
        """The ``data:`` lines: per client its training, validation and test patients and volumes,
        each as labelled + unlabelled."""

        def count(vols: list[Volume]) -> str:
            def pv(vs: list[Volume]) -> str:
                return f"{len({v.record.patient for v in vs})} / {len(vs)}"

            lab = [v for v in vols if v.label is not None]
            unl = [v for v in vols if v.label is None]
            return f"{pv(vols)} (labelled {pv(lab)}, unlabelled {pv(unl)})"

        lines = [
            f"data: {self.num_clients} client(s), split {self.split}, {type(self.source).__name__}; "
            "patients / volumes (a patient is labelled if one of its volumes is)"
        ]
        for c in range(self.num_clients):
            parts = [f"train {count(self.train[c])}"] if training else []
            parts += [f"validation {count(self.val[c])}"] if validation else []
            if parts:
                lines.append(f"  client {c + self.first_client}: " + ", ".join(parts))
        if self.test_source is not None:
            lines.append(f"  test (every client): {count(self.test)}")
        return "\n".join(lines)

    def place(self, device: torch.device | str | None) -> None:
        """``volumes_on: device``: move every preprocessed volume (training, validation, test) to
        ``device`` once, so loaders slice and stack batches there; otherwise nothing."""
        if self.volumes_on != "device" or device is None:
            return
        for v in {id(v): v for vols in (*self.train, *self.val, self.test) for v in vols}.values():
            v.image = v.image.to(device)
            if v.label is not None:
                v.label = v.label.to(device)

    # ------------------------------------------------------------ per client
    def num_train_samples(self, client: int) -> int:
        """Training volumes of a client (the FedAvg weight)."""
        return len(self.train[client])

    def labelled_volumes(self, client: int, n: int | None = None) -> list[Volume]:
        """The client's labelled training volumes: all of them, or (``n``, default
        ``labelled_per_client``) those of its first ``n`` labelled training patients by id, a
        simulation that hides the other labels of fully labelled data."""
        n = self.labelled_per_client if n is None else n
        labelled = [v for v in self.train[client] if v.label is not None]
        if n is None:
            return labelled
        have = {v.record.patient for v in labelled}
        keep = set([p for p in self.train_patients[client] if p in have][:n])
        return [v for v in labelled if v.record.patient in keep]

    def unlabelled_volumes(self, client: int, n: int | None = None) -> list[Volume]:
        """The client's scans that fine-tuning does not use labelled: its unlabelled training
        scans, under ``labelled_per_client`` those whose labels it hides, and the scans of its
        held-out patients that have no label at all (validation never scores them; the
        label-free monitors of pre-training do). What semi-supervised fine-tuning trains on;
        their labels are never read."""
        labelled = {id(v) for v in self.labelled_volumes(client, n)}
        scored = {v.record.patient for v in self.validation_volumes(client)}
        held = [v for v in self.val[client] if v.record.patient not in scored]  # never scored: no leak
        return [v for v in self.train[client] if id(v) not in labelled] + held

    def validation_volumes(self, client: int) -> list[Volume]:
        """The client's labelled held-out volumes: what validation scores."""
        return [v for v in self.val[client] if v.label is not None]

    def check_finetune(self, n: int | None = None, unlabelled: bool = False) -> list[str]:
        """Check every client can fine-tune (labelled training volumes; ``n`` labelled patients
        under ``labelled_per_client``; ``unlabelled``: unlabelled volumes for a semi-supervised
        plug-in) and return its ``fine-tuning:`` lines; a client that cannot is one DataError."""
        n = self.labelled_per_client if n is None else n
        lines = []
        for c in range(self.num_clients):
            name = f"client {c + self.first_client}"
            have = sorted({v.record.patient for v in self.train[c] if v.label is not None})
            if not have:
                raise DataError(
                    f"{name} has no labelled training scan ({len(self.train[c])} training volumes, none with a "
                    "label; validation holds the labelled ones when data.val_fraction or data.cv_folds takes them): "
                    "fine-tuning needs labels"
                )
            if n is not None and len(have) < n:
                raise DataError(
                    f"{name} has {len(have)} labelled training patient(s) but data.labelled_per_client is {n} "
                    "(it picks N of the labelled patients; leave it unset to use every labelled scan)"
                )
            lab, unl = self.labelled_volumes(c, n), self.unlabelled_volumes(c, n)
            if unlabelled and not unl:
                raise DataError(
                    f"{name}: semi-supervised fine-tuning needs unlabelled training scans, and all "
                    f"{len(self.train[c])} of its training volumes are labelled and used as such "
                    "(set data.labelled_per_client to hide labels, or add unlabelled scans)"
                )
            hidden = sum(1 for v in unl if v.label is not None)
            line = f"  {name}: labelled {len({v.record.patient for v in lab})} patients / {len(lab)} volumes"
            if unlabelled:
                line += f", unlabelled {len(unl)} volumes" + (f" ({hidden} with labels hidden)" if hidden else "")
            line += f", validation {len(self.validation_volumes(c))} labelled volumes"
            lines.append(line)
        return lines

    def pretrain_loader(self, client: int, seed: int) -> DataLoader:
        """Partition-sampled batches of ``V`` volumes x ``S`` slices for one client."""
        ds = PartitionDataset(
            self.train[client],
            self.volume_ids[client],
            client,
            self.num_partitions,
            pretrain_augment(self.augment_cfg) if self.augment_pretrain and self.augment_on == "loader" else None,
            self.two_views,
            seed,
            emit_seeds=self.augment_pretrain and self.augment_on == "device",
        )
        return DataLoader(
            ds,
            batch_size=self.volumes_per_batch,
            sampler=EpochKeySampler(len(ds), seed),
            collate_fn=collate_partitions,
            num_workers=self.num_workers,
            drop_last=len(ds) > self.volumes_per_batch,
            persistent_workers=False,
        )

    def batch_augment(self, stage: Literal["pretrain", "finetune", "unlabelled"]) -> BatchAugment | None:
        """The on-device augmentation of ``stage``'s training batches (``augment_on: device``);
        ``unlabelled``: the weak view of fine-tuning's unlabelled slices (pre-training's kinds:
        affine and intensity, no elastic), switched with ``augment_finetune``."""
        on = self.augment_pretrain if stage == "pretrain" else self.augment_finetune
        if not on or self.augment_on != "device":
            return None
        return BatchAugment(self.augment_cfg, with_label=stage == "finetune")

    @property
    def scores_test_set(self) -> bool:
        """Whether :meth:`eval_volumes` are the shared test set (else each client's held-out patients)."""
        return bool(self.test) and not self.cv_folds

    def eval_volumes(self, client: int) -> list[Volume]:
        """What a client's model is scored on (labelled volumes only): its held-out
        cross-validation fold when ``cv_folds`` is set, else the held-out test set if there is
        one, else the client's own validation patients (never its training patients)."""
        if not self.scores_test_set:
            return self.validation_volumes(client)
        return [v for v in self.test if v.label is not None]

    def finetune_loader(self, client: int, seed: int, n: int | None = None, unlabelled_ratio: int = 0) -> DataLoader:
        """Labelled 2D slices of the client's first ``n`` labelled patients; with
        ``unlabelled_ratio`` > 0 each also carries that many slices of the client's own
        unlabelled volumes (:meth:`unlabelled_volumes`, weakly augmented, without labels)."""
        in_loader = self.augment_finetune and self.augment_on == "loader"
        augment = finetune_augment(self.augment_cfg) if in_loader else None
        emit = self.augment_finetune and self.augment_on == "device"
        if unlabelled_ratio > 0:
            unlabelled = self.unlabelled_volumes(client, n)
            if not unlabelled:
                raise DataError(
                    f"client {client}: semi-supervised fine-tuning needs unlabelled training scans, and all "
                    f"{len(self.train[client])} of its training volumes are labelled and used as such"
                )
            ds = SemiSupervisedSliceDataset(
                self.labelled_volumes(client, n),
                unlabelled,
                unlabelled_ratio,
                augment,
                pretrain_augment(self.augment_cfg) if in_loader else None,
                seed,
                emit_seeds=emit,
            )
        else:
            ds = LabelledSliceDataset(self.labelled_volumes(client, n), augment, seed, emit_seeds=emit)
        return DataLoader(
            ds, batch_size=self.batch_size, sampler=EpochKeySampler(len(ds), seed), num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        """Client 0's pre-training loader (for plain ``Trainer.fit`` use outside the federation)."""
        self.setup()
        return self.pretrain_loader(0, self.seed)
