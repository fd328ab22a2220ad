"""A label is a property of the scan, a site is a folder: the sources and the datamodule's sets."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from fcl_lightning.data.acdc import ACDCSource
from fcl_lightning.data.datamodule import FederatedDataModule
from fcl_lightning.data.folders import FolderSource, NiftiFolderSource, SiteFolders, detect_layout
from fcl_lightning.data.phantom import PhantomSource
from fcl_lightning.data.volume import DataError


def labelled_files(site):
    return {p.name.replace("_gt", "") for p in site.rglob("*_gt.nii.gz")}


def test_each_site_folder_is_read_in_its_own_layout(consortium):
    assert [detect_layout(consortium / f"site{i}") for i in range(3)] == ["acdc", "acdc", "manifest"]
    records = SiteFolders(root=str(consortium)).records()
    assert len(records) == 36 and {r.site for r in records} == {0, 1, 2}
    # a patient id is its site's folder and its own: two sites may both have a patient001
    assert {r.patient for r in records if r.site == 0} == {f"site0/patient{i:03d}" for i in range(1, 7)}
    for i in range(3):
        site = consortium / f"site{i}"
        labelled = {r.image_path.name for r in records if r.site == i and r.labelled}
        assert labelled == labelled_files(site)  # exactly the scans with a label file, none other
        assert all((r.label_path is not None) == r.labelled for r in records)


def test_an_acdc_folder_without_label_files_is_read(consortium):
    src = ACDCSource(root=str(consortium / "site0"))
    records = src.records()
    assert len(records) == 12 and sum(r.labelled for r in records) == 4
    vol = src.load(next(r for r in records if not r.labelled))
    assert vol.label is None and vol.image.ndim == 3
    # a selection by number still works, and a missing image is still an error
    assert len(ACDCSource(root=str(consortium / "site0"), patients="1-2").records()) == 4
    with pytest.raises(DataError, match="patient007: patient folder missing"):
        ACDCSource(root=str(consortium / "site0"), patients="7").records()


def test_a_nifti_folder_pairs_images_with_optional_labels(tmp_path, consortium):
    for p in (consortium / "site2").glob("patient00[56]*.nii.gz"):
        shutil.copy(p, tmp_path / p.name)
    src = NiftiFolderSource(str(tmp_path))
    records = src.records()
    assert [r.key for r in records] == sorted(r.key for r in records) and len(records) == 4
    assert all(r.labelled for r in records) and all(r.patient == r.key for r in records)
    (tmp_path / "patient005_frame01_gt.nii.gz").unlink()
    records = NiftiFolderSource(str(tmp_path)).records()
    assert [r.labelled for r in records] == [False, True, True, True]
    assert FolderSource(str(tmp_path)).records() == records  # auto: no Info.cfg, no manifest
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "orphan_gt.nii.gz")
    with pytest.raises(DataError, match="label .*orphan_gt.nii.gz has no image orphan.nii.gz"):
        NiftiFolderSource(str(tmp_path)).records()


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda p: None, "holds no scans: expected patient folders with an Info.cfg"),
        (lambda p: [(p / n).write_text("image\n") for n in ("manifest.csv", "manifest.json")], "holds 2 manifests"),
    ],
)
def test_a_folder_without_scans_is_one_clear_error(tmp_path, make, needle):
    make(tmp_path)
    with pytest.raises(DataError, match=needle):
        FolderSource(str(tmp_path)).records()


def test_a_folder_of_site_folders_is_not_read_as_one_site(consortium):
    with pytest.raises(DataError, match="looks like a folder of site folders \\(site0, site1, site2"):
        FolderSource(str(consortium)).records()


def test_site_folders_refuse_a_patient_folder_tree_and_duplicate_names(tmp_path, consortium):
    with pytest.raises(DataError, match="is one site's ACDC-layout folder"):
        SiteFolders(root=str(consortium / "site0")).records()
    (tmp_path / "a" / "site0").mkdir(parents=True)
    with pytest.raises(DataError, match="two site folders are named 'site0'"):
        SiteFolders(sites=[str(consortium / "site0"), str(tmp_path / "a" / "site0")]).records()


def datamodule(consortium, **kw):
    kw = {"num_clients": 3, "split": "site", "img_size": 32, "spacing": 3.0, **kw}
    return FederatedDataModule(source=SiteFolders(root=str(consortium)), **kw)


def test_labelled_and_unlabelled_sets_are_the_scans_with_and_without_labels(consortium):
    dm = datamodule(consortium, val_fraction=0.0)
    dm.setup("fit")
    for c in range(3):
        lab, unl = dm.labelled_volumes(c), dm.unlabelled_volumes(c)
        assert {v.record.key for v in lab} == {v.record.key for v in dm.train[c] if v.record.labelled}
        assert {v.record.key for v in unl} == {v.record.key for v in dm.train[c] if not v.record.labelled}
        assert all(v.label is not None for v in lab) and all(v.label is None for v in unl)
        # the labelled patients are the last two by id, not the first two
        assert sorted({v.record.patient for v in lab}) == [f"site{c}/patient005", f"site{c}/patient006"]
    # the simulation knob picks among the labelled patients, by id, and hides the other labels
    dm.labelled_per_client = 1
    assert {v.record.patient for v in dm.labelled_volumes(1)} == {"site1/patient005"}
    hidden = [v for v in dm.unlabelled_volumes(1) if v.label is not None]
    assert {v.record.patient for v in hidden} == {"site1/patient006"}
    assert len(dm.unlabelled_volumes(1)) == 10


def test_held_out_patients_are_drawn_from_labelled_and_unlabelled_patients_apart(consortium):
    dm = datamodule(consortium, val_fraction=0.5)
    dm.setup("fit")
    for c in range(3):
        held = {v.record.patient for v in dm.val[c]}
        labelled = {v.record.patient for v in dm.val[c] if v.label is not None}
        assert len(labelled) == 1 and len(held) == 3  # 1 of 2 labelled, 2 of 4 unlabelled patients
        assert dm.validation_volumes(c) == [v for v in dm.val[c] if v.label is not None]
        # held-out patients without any label are never scored: semi-supervised training may use them
        pool = {v.record.patient for v in dm.unlabelled_volumes(c)}
        assert pool == {v.record.patient for v in dm.train[c] + dm.val[c] if v.label is None}
        assert not pool & labelled
    # cross-validation folds hold labelled patients only: 2 labelled patients cannot make 5 folds
    with pytest.raises(DataError, match="client 0 has 2 labelled patient\\(s\\), fewer than data.cv_folds=5"):
        datamodule(consortium, cv_folds=5).setup("fit")
    dm = datamodule(consortium, cv_folds=2, cv_fold=1)
    dm.setup("fit")
    assert all(len(dm.validation_volumes(c)) == 2 and len(dm.val[c]) == 2 for c in range(3))
    assert all(len(dm.train[c]) == 10 for c in range(3))  # every unlabelled patient trains


def test_on_fully_labelled_data_the_split_is_the_plain_one():
    from fcl_lightning.data.split import federated_split, kfold_split, train_val_split

    source = PhantomSource(num_subjects=12, size=64)
    clients = federated_split(source.records(), 2, "iid", 0)
    for kw, split in (
        ({"val_fraction": 0.25}, lambda ps, c: train_val_split(ps, 0.25, c)),
        ({"cv_folds": 3, "cv_fold": 1}, lambda ps, c: kfold_split(ps, 3, 1, c)),
    ):
        dm = FederatedDataModule(source=source, num_clients=2, img_size=32, **kw)
        dm.setup("fit")
        for c, patients in enumerate(clients):
            train, held = split(patients, c)
            assert dm.train_patients[c] == train
            assert [v.record.patient for v in dm.val[c]][::2] == held


def test_fine_tuning_checks_say_which_client_lacks_what(consortium, tmp_path):
    dm = datamodule(consortium, val_fraction=0.0)
    dm.setup("fit")
    lines = dm.check_finetune(unlabelled=True)
    assert (
        lines[0] == "  client 0: labelled 2 patients / 4 volumes, unlabelled 8 volumes, validation 0 labelled volumes"
    )
    with pytest.raises(
        DataError, match="client 0 has 2 labelled training patient\\(s\\) but data.labelled_per_client is 3"
    ):
        dm.check_finetune(3)
    only = tmp_path / "unlabelled"
    shutil.copytree(consortium / "site0", only / "site0")
    for p in (only / "site0").rglob("*_gt.nii.gz"):
        p.unlink()
    dm = FederatedDataModule(source=SiteFolders(root=str(only)), num_clients=1, split="site", img_size=32)
    dm.setup("fit")
    with pytest.raises(DataError, match="client 0 has no labelled training scan"):
        dm.check_finetune()
    full = FederatedDataModule(
        source=PhantomSource(num_subjects=8, size=64), num_clients=2, val_fraction=0.0, img_size=32
    )
    full.setup("fit")
    with pytest.raises(DataError, match="all 8 of its training volumes are labelled"):
        full.check_finetune(unlabelled=True)


def test_test_and_validate_load_no_training_volume(consortium):
    calls = []
    dm = datamodule(consortium, val_fraction=0.5)
    real = dm.preprocessor.__class__.__call__

    class Counting(dm.preprocessor.__class__):
        def __call__(self, source, record):
            calls.append(record.key)
            return real(self, source, record)

    dm.preprocessor.__class__ = Counting
    dm.setup("test")
    held = {v.record.key for c in range(3) for v in dm.val[c]}
    assert set(calls) == held and len(held) == 18 and all(not t for t in dm.train)
    dm.setup("fit")  # a later fit loads the training volumes after all
    assert all(len(t) == 6 for t in dm.train)


def test_a_label_map_under_another_suffix_and_a_patient_folder_without_info_cfg_are_refused(tmp_path, consortium):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(consortium / "site2/patient005_frame01.nii.gz", flat / "case1.nii.gz")
    shutil.copy(consortium / "site2/patient005_frame01_gt.nii.gz", flat / "case1_seg.nii.gz")
    with pytest.raises(DataError, match="case1_seg.nii.gz looks like the label map of case1 .*set label_suffix: _seg"):
        NiftiFolderSource(str(flat)).records()
    assert [r.labelled for r in NiftiFolderSource(str(flat), label_suffix="_seg").records()] == [True]
    tree = tmp_path / "tree"
    shutil.copytree(consortium / "site0", tree)
    (tree / "patient003/Info.cfg").unlink()
    with pytest.raises(DataError, match="patient003: Info.cfg not found"):
        FolderSource(str(tree)).records()
