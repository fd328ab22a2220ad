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

from fcl_lightning.data.augment import AugmentConfig, BatchAugment, finetune_augment, pretrain_augment
from fcl_lightning.data.datasets import (
    EpochKeySampler,
    LabelledSliceDataset,
    PartitionDataset,
    SemiSupervisedSliceDataset,
    collate_partitions,
)
from fcl_lightning.data.phantom import PhantomSource
from fcl_lightning.data.preprocess import Preprocessor, load_volumes
from fcl_lightning.data.split import federated_split, kfold_split, train_val_split
from fcl_lightning.data.volume import DataError, Volume, VolumeSource

log = logging.getLogger(__name__)


class FederatedDataModule(pl.LightningDataModule):
    """Volumes of ``source`` split over ``num_clients`` clients, preprocessed once and cached.

    Args:
        source: where volumes come from (``PhantomSource`` by default; ``ACDCSource``,
            ``ManifestSource`` or your own ``VolumeSource`` subclass via ``class_path``).
        num_clients: number of clients C.
        split: ``iid`` (random), ``group`` (non-IID by diagnostic group) or ``site`` (the
            source's own site/client ids, e.g. a manifest's ``client`` column).
        val_fraction: share of each client's patients held out for validation.
        cv_folds: if set, k-fold cross-validation inside each client (the paper's protocol): fold
            ``cv_fold`` of each client's patients is held out and scored, the rest is training data.
        cv_fold: which fold is held out.
        test_source: a separate held-out test set (another root or id range); ``None``: none.
        root: shortcut that sets ``root`` of ``source`` and ``test_source`` when they have one
            (so ``--data.root PATH`` points an ACDC config at your copy of the data).
        num_partitions: S, partitions per volume along the slice axis.
        volumes_per_batch: V, volumes per pre-training batch (a batch holds V * S slices).
        batch_size: slices per fine-tuning batch.
        labelled_per_client: N labelled patients per client for fine-tuning (``None``: all).
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
        self._ready = False

    # ------------------------------------------------------------------ setup
    @property
    def ready(self) -> bool:
        """Whether :meth:`setup` has loaded the volumes."""
        return self._ready

    def setup(self, stage: str | None = None) -> None:
        """Split patients over clients and preprocess every volume (once; later calls are no-ops)."""
        if self._ready:
            return
        records = self.source.records()
        clients = federated_split(records, self.num_clients, self.split, self.seed)
        by_patient: dict[str, list] = {}
        for r in records:
            by_patient.setdefault(r.patient, []).append(r)
        self.train: list[list[Volume]] = []
        self.val: list[list[Volume]] = []
        self.train_patients: list[list[str]] = []
        self.volume_ids: list[list[int]] = []
        next_id = 0
        for c, patients in enumerate(clients):
            if self.cv_folds:
                tr, va = kfold_split(patients, self.cv_folds, self.cv_fold, self.seed + c)
            else:
                tr, va = train_val_split(patients, self.val_fraction, self.seed + c)
            self.train_patients.append(tr)
            tr_vols = load_volumes(self.source, [r for p in tr for r in by_patient[p]], self.preprocessor)
            va_vols = load_volumes(self.source, [r for p in va for r in by_patient[p]], self.preprocessor)
            for v in tr_vols:
                if v.num_slices < self.num_partitions:
                    raise DataError(
                        f"{v.record.key}: {v.num_slices} slices, fewer than num_partitions={self.num_partitions}"
                    )
            self.train.append(tr_vols)
            self.val.append(va_vols)
            self.volume_ids.append(list(range(next_id, next_id + len(tr_vols))))
            next_id += len(tr_vols)
        self.test: list[Volume] = []
        if self.test_source is not None:
            self.test = load_volumes(self.test_source, self.test_source.records(), self.preprocessor)
        self._ready = True
        log.info(
            "data: %d clients, train volumes per client %s, %d test volumes",
            self.num_clients,
            [len(t) for t in self.train],
            len(self.test),
        )

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
        """Both frames of the first ``n`` (default ``labelled_per_client``) training patients of a client."""
        n = self.labelled_per_client if n is None else n
        if n is None:
            return self.train[client]
        keep = set(self.train_patients[client][:n])
        return [v for v in self.train[client] if v.record.patient in keep]

    def unlabelled_volumes(self, client: int, n: int | None = None) -> list[Volume]:
        """The client's own training volumes that are not labelled for fine-tuning (of patients
        after its first ``n``): what semi-supervised fine-tuning trains on without labels."""
        labelled = {id(v) for v in self.labelled_volumes(client, n)}
        return [v for v in self.train[client] if id(v) not in labelled]

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

    def eval_volumes(self, client: int) -> list[Volume]:
        """What a client's model is scored on: its held-out cross-validation fold when ``cv_folds``
        is set, else the held-out test set if there is one, else the client's own validation
        patients (never its training patients)."""
        if self.cv_folds or not self.test:
            return self.val[client]
        return self.test

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
                    f"client {client}: semi-supervised fine-tuning needs unlabelled training volumes, but all "
                    f"{len(self.train_patients[client])} of its training patients are labelled "
                    "(lower data.labelled_per_client)"
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
