"""Any NIfTI collection listed in a CSV or JSON manifest (one row per volume)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fcl_lightning.data.nifti import nifti_stem, read_nifti_pair
from fcl_lightning.data.volume import DataError, RawVolume, VolumeRecord, VolumeSource

COLUMNS = ("image", "label", "patient", "client", "frame", "group")


class ManifestSource(VolumeSource):
    """Volumes listed in a manifest: a CSV/TSV with a header row, or a JSON list of objects.

    Columns (keys): ``image`` (required: a NIfTI file); ``label`` (its label map; an empty cell
    or no column: the scan is unlabelled, used by pre-training and semi-supervised fine-tuning
    only); ``patient`` (default: the image's file stem; a patient's volumes are never split
    apart); ``frame`` (any text telling a patient's volumes apart; ``ED`` and ``ES`` also give
    the cardiac indices); ``client`` (a non-negative integer: the site, used by
    ``data.split: site``); ``group`` (e.g. a diagnosis, used by ``data.split: group``). Empty
    cells count as absent. Relative paths are relative to the manifest's folder. Unknown columns
    are rejected (a typo such as ``lable`` would otherwise silently drop the labels). Two rows
    with the same ``patient`` and ``frame`` are an error.

    Args:
        path: the manifest file (``.csv``, ``.tsv`` or ``.json``), one row per volume. Columns:
            ``image`` (required), ``label`` (empty: an unlabelled scan), ``patient`` (default:
            the image's stem), ``frame`` (e.g. ``ED`` / ``ES``: any text; ED and ES give cardiac
            indices), ``client`` (the site, for ``split: site``), ``group``; relative paths are
            relative to the manifest's folder.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path).expanduser()
        self._records: list[VolumeRecord] | None = None

    def records(self) -> list[VolumeRecord]:
        if self._records is None:
            self._records = self._parse()
        return list(self._records)

    def load(self, record: VolumeRecord) -> RawVolume:
        if record.image_path is None:
            raise DataError(f"{self.path}: record {record.key} has no image path")
        return read_nifti_pair(record.image_path, record.label_path, f"{self.path.name}:{record.key}")

    # -- parsing -----------------------------------------------------------------------------------

    def _rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            raise DataError(f"manifest not found: {self.path}")
        suffix = self.path.suffix.lower()
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{self.path}: cannot read manifest: {e}") from e
        if suffix == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{self.path}: invalid JSON: {e}") from e
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise DataError(f"{self.path}: a JSON manifest must be a list of objects")
            columns = {k for r in rows for k in r}
        elif suffix in (".csv", ".tsv"):
            reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
            columns = {c.strip() for c in (reader.fieldnames or []) if c is not None}
            rows = []
            for n, raw in enumerate(reader, start=1):
                if None in raw:
                    raise DataError(f"{self.path}: row {n}: more values than header columns")
                rows.append({k.strip(): v for k, v in raw.items()})
        else:
            raise DataError(f"{self.path}: manifest must be .csv, .tsv or .json")
        if "image" not in columns:
            raise DataError(f"{self.path}: manifest has no 'image' column (columns: {sorted(columns)})")
        unknown = sorted(columns - set(COLUMNS))
        if unknown:
            raise DataError(f"{self.path}: unknown column(s) {unknown}; known columns are {list(COLUMNS)}")
        if not rows:
            raise DataError(f"{self.path}: manifest lists no volumes")
        return rows

    def _parse(self) -> list[VolumeRecord]:
        base = self.path.parent
        out: list[VolumeRecord] = []
        seen: dict[str, int] = {}
        for n, row in enumerate(self._rows(), start=1):
            where = f"{self.path}: row {n}"
            values = {k: _text(row.get(k), where, k) for k in COLUMNS}
            if values["image"] is None:
                raise DataError(f"{where}: empty 'image'")
            image = _resolve(values["image"], base, where, "image")
            label = _resolve(values["label"], base, where, "label") if values["label"] else None
            patient = values["patient"] or nifti_stem(image)
            frame = values["frame"]
            key = f"{patient}_{frame}" if frame else patient
            if key in seen:
                raise DataError(
                    f"{where}: duplicate key {key!r} (same as row {seen[key]}); give each volume of a patient "
                    f"a distinct 'frame'"
                )
            seen[key] = n
            out.append(
                VolumeRecord(
                    key=key,
                    patient=patient,
                    image_path=image,
                    label_path=label,
                    frame=frame,
                    group=values["group"],
                    site=_client(row.get("client"), where),
                    labelled=label is not None,
                )
            )
        return out


def _text(value: Any, where: str, column: str) -> str | None:
    """A cell as stripped text; ``None`` for absent/empty cells."""
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise DataError(f"{where}: '{column}' must be a single value, got {value!r}")
    text = str(value).strip()
    return text or None


def _resolve(value: str, base: Path, where: str, column: str) -> Path:
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise DataError(f"{where}: {column} file not found: {path}")
    return path


def _client(value: Any, where: str) -> int | None:
    """The ``client`` cell as a non-negative int (``"3"``, ``3`` and ``3.0`` are fine; ``"a"``, ``2.5`` not)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise DataError(f"{where}: client {value!r} is not an integer")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: client {value!r} is not an integer") from None
    if not number.is_integer() or number < 0:
        raise DataError(f"{where}: client {value!r} is not a non-negative integer")
    return int(number)
