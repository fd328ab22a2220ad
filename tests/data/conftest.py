"""Shared fixtures for the data-layer tests: a small phantom and its copies written in ACDC layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fcl_lightning.data.phantom import PhantomSource, write_acdc_layout


def _small_phantom() -> PhantomSource:
    return PhantomSource(num_subjects=3, num_sites=4, seed=3, size=96, min_slices=6, max_slices=8)


@pytest.fixture
def small_phantom() -> PhantomSource:
    """The three-subject phantom that ``acdc_templates`` holds on disk."""
    return _small_phantom()


@pytest.fixture(scope="session")
def acdc_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three-patient phantoms in ACDC layout, one tree per stored image dtype (written once)."""
    base = tmp_path_factory.mktemp("acdc")
    dtypes = ("float32", "int16", "uint8")
    return {d: write_acdc_layout(_small_phantom(), str(base / d), dtype=d) for d in dtypes}


@pytest.fixture
def acdc_root(acdc_templates: dict[str, Path], tmp_path: Path) -> Path:
    """A private, modifiable copy of the float32 ACDC-layout phantom."""
    return Path(shutil.copytree(acdc_templates["float32"], tmp_path / "acdc"))
