"""Federated and train/val splits: patient-level, deterministic, group/site modes, empty clients."""

from __future__ import annotations

import pytest

from fcl_lightning.data.split import federated_split, train_val_split
from fcl_lightning.data.volume import DataError, VolumeRecord

GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")


def acdc_like(n: int = 100, sites: int | None = None) -> list[VolumeRecord]:
    """Two frames per patient, groups in blocks of n/5 like ACDC."""
    return [
        VolumeRecord(
            key=f"patient{i:03d}_{f}",
            patient=f"patient{i:03d}",
            frame=f,
            group=GROUPS[(i - 1) * 5 // n],
            site=None if sites is None else (i - 1) % sites,
        )
        for i in range(1, n + 1)
        for f in ("ED", "ES")
    ]


@pytest.mark.parametrize("mode", ["iid", "group"])
def test_partition_properties(mode: str) -> None:
    recs = acdc_like()
    clients = federated_split(recs, 10, mode=mode, seed=0)
    flat = [p for c in clients for p in c]
    assert len(flat) == len(set(flat)) == 100  # every patient exactly once, frames never separated
    assert sorted(flat) == sorted({r.patient for r in recs})
    assert [len(c) for c in clients] == [10] * 10
    assert all(c == sorted(c) for c in clients)
    assert federated_split(recs, 10, mode=mode, seed=0) == clients
    assert federated_split(recs, 10, mode=mode, seed=1) != clients


def test_iid_mixes_groups() -> None:
    group = {r.patient: r.group for r in acdc_like()}
    clients = federated_split(acdc_like(), 10, mode="iid", seed=0)
    assert sum(len({group[p] for p in c}) > 1 for c in clients) >= 8


def test_group_mode_homogeneous() -> None:
    recs = acdc_like()
    group = {r.patient: r.group for r in recs}
    clients = federated_split(recs, 10, mode="group", seed=0)
    groups = [{group[p] for p in c} for c in clients]
    assert all(len(g) == 1 for g in groups)
    per_group = [sum(g == {name} for g in groups) for name in GROUPS]
    assert per_group == [2] * 5
    # fewer clients than groups: each client holds few groups
    assert all(len({group[p] for p in c}) <= 3 for c in federated_split(recs, 3, mode="group"))


def test_site_mode() -> None:
    recs = acdc_like(20, sites=4)
    clients = federated_split(recs, 4, mode="site")
    assert clients[1] == ["patient002", "patient006", "patient010", "patient014", "patient018"]
    with pytest.raises(
        DataError,
        match="the data holds 5 site\\(s\\) \\(ids 0, 1, 2, 3, 4\\) but data.num_clients is 4.*--data.num_clients=5",
    ):
        federated_split(acdc_like(20, sites=5), 4, mode="site")
    with pytest.raises(DataError, match="patient001 has no site"):
        federated_split(acdc_like(20), 4, mode="site")
    with pytest.raises(
        DataError, match="the data holds 3 site\\(s\\) .* but data.num_clients is 4.*--data.num_clients=3"
    ):
        federated_split(acdc_like(20, sites=3), 4, mode="site")


def test_errors() -> None:
    with pytest.raises(DataError, match="client 3 gets no patients"):
        federated_split(acdc_like(3 * 5)[:6], 5)  # 3 patients over 5 clients
    no_group = [VolumeRecord(key="a", patient="a"), VolumeRecord(key="b", patient="b")]
    with pytest.raises(DataError, match="patient a has no group"):
        federated_split(no_group, 2, mode="group")
    with pytest.raises(ValueError, match="unknown split mode"):
        federated_split(acdc_like(), 2, mode="dirichlet")
    with pytest.raises(DataError, match="num_clients"):
        federated_split(acdc_like(), 0)
    mixed = [VolumeRecord(key="a_ED", patient="a", site=0), VolumeRecord(key="a_ES", patient="a", site=1)]
    with pytest.raises(DataError, match="patient a: .*disagree on site"):
        federated_split(mixed, 2, mode="site")


def test_train_val_split() -> None:
    patients = [f"p{i}" for i in range(10)]
    train, val = train_val_split(patients, 0.2, seed=0)
    assert len(val) == 2 and len(train) == 8 and set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(patients)
    assert train == [p for p in patients if p in train]  # input order kept
    assert train_val_split(patients, 0.2, seed=0) == (train, val)
    assert train_val_split(patients, 0.2, seed=5) != (train, val)
    assert train_val_split(patients, 0.0, seed=0) == (patients, [])
    assert train_val_split(["a"], 0.5, seed=0) == (["a"], [])  # at least one training patient
    assert len(train_val_split(["a", "b"], 0.9, seed=0)[0]) == 1
    assert len(train_val_split(patients, 0.01, seed=0)[1]) == 1  # a positive fraction gives >= 1
    with pytest.raises(ValueError):
        train_val_split(patients, 1.0, seed=0)
    with pytest.raises(DataError):
        train_val_split([], 0.2, seed=0)
