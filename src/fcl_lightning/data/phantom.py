"""Built-in synthetic cardiac short-axis phantom: the default data, so every command runs without a download.

Each subject is a stack of short-axis slices (slice axis last, base at z=0, apex at z=D-1) in physical
units (mm): an LV blood pool (label 3) inside a myocardial ring (label 2), an RV crescent (label 1) on one
side that fades out toward the apex, and background anatomy (body with a fat layer, lungs, spine, aorta,
liver near the apex). Subjects vary in heart size, position, rotation, wall thickness and slice count;
pseudo groups ``G0``..``G4`` mimic the ACDC groups (dilated LV, thick wall, infarct-like, normal, large RV).
Each subject has an ED and an ES frame (ES: smaller cavity, thicker wall at constant myocardial area).
Sites (``subject % num_sites``) differ like scanners do: in-plane resolution (in the affine, so
preprocessing resamples), gain, gamma, Rician noise and a smooth bias field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from fcl_lightning.data.volume import DataError, RawVolume, VolumeRecord, VolumeSource

#: Bump when the generator changes, so that on-disk preprocessing caches are invalidated.
PHANTOM_VERSION = 1
SITE_SPACINGS = (1.25, 1.5, 1.75, 2.0)
NUM_GROUPS = 5

# Per pseudo group: (LV radius x, wall thickness x, ES/ED cavity radius ratio, RV width x)
_GROUPS = (
    (1.30, 0.80, 0.88, 1.0),  # G0 dilated LV, poor contraction (DCM-like)
    (0.85, 1.60, 0.55, 1.0),  # G1 thick wall, strong contraction (HCM-like)
    (1.10, 0.90, 0.80, 1.0),  # G2 reduced contraction (MINF-like)
    (1.00, 1.00, 0.68, 1.0),  # G3 normal
    (0.95, 1.00, 0.70, 1.7),  # G4 large RV
)
# Tissue intensities before scanner effects.
_BODY, _FAT, _LUNG, _SPINE, _LIVER, _AORTA = 0.35, 0.75, 0.05, 0.6, 0.5, 0.9
_MYO, _RV_BLOOD, _LV_BLOOD = 0.28, 0.88, 1.0


@dataclass(frozen=True)
class _Site:
    spacing: float
    gain: float
    gamma: float
    noise: float
    bias: tuple[float, float, float, float]  # coefficients of x, y, x*y, x^2+y^2 in the log bias field


@dataclass(frozen=True)
class _Subject:
    index: int
    site: int
    group: int
    num_slices: int
    slice_spacing: float
    centre: tuple[float, float]  # heart centre, mm from image centre
    angle: float  # direction of the RV from the LV centre, radians
    lv_radius: float  # ED cavity radius at the base, mm
    wall: float  # ED wall thickness, mm
    es_ratio: float
    ellipticity: float
    rv_width: float  # RV cavity width at the base, mm
    rv_extent: float  # fraction of base->apex over which the RV fades out
    body: tuple[float, float]  # body ellipse semi-axes, mm
    tissue_jitter: tuple[float, ...]
    nb_frames: int
    es_frame: int


class PhantomSource(VolumeSource):
    """Synthetic cardiac MRI, deterministic by ``seed``; records ``phantom{NNN}_{ED|ES}`` (NNN from 001).

    Args:
        num_subjects: number of subjects (patients), two frames each.
        num_sites: number of simulated scanners; subject ``i`` (0-based) is on site ``i % num_sites``.
        seed: base seed; subject ``i`` draws from ``numpy.random.default_rng([seed, i])``.
        size: in-plane matrix (``size x size`` pixels; the field of view depends on the site spacing).
        min_slices: fewest slices of a volume.
        max_slices: most slices of a volume.
    """

    def __init__(
        self,
        num_subjects: int = 40,
        num_sites: int = 4,
        seed: int = 0,
        size: int = 144,
        min_slices: int = 8,
        max_slices: int = 12,
    ) -> None:
        if num_subjects < 1 or num_sites < 1:
            raise ValueError("num_subjects and num_sites must be >= 1")
        if size < 64:
            raise ValueError(f"phantom size must be >= 64 pixels, got {size}")
        if not 5 <= min_slices <= max_slices:
            raise ValueError(f"need 5 <= min_slices <= max_slices, got {min_slices}, {max_slices}")
        self.num_subjects, self.num_sites, self.seed = num_subjects, num_sites, seed
        self.size, self.min_slices, self.max_slices = size, min_slices, max_slices

    # -- VolumeSource ------------------------------------------------------------------------------

    def records(self) -> list[VolumeRecord]:
        return [
            VolumeRecord(
                key=f"phantom{i + 1:03d}_{frame}",
                patient=f"phantom{i + 1:03d}",
                frame=frame,
                group=f"G{i % NUM_GROUPS}",
                site=i % self.num_sites,
            )
            for i in range(self.num_subjects)
            for frame in ("ED", "ES")
        ]

    def fingerprint(self, record: VolumeRecord) -> str:
        return (
            f"phantom-v{PHANTOM_VERSION}:seed={self.seed}:size={self.size}:sites={self.num_sites}:"
            f"slices={self.min_slices}-{self.max_slices}:{record.key}"
        )

    def load(self, record: VolumeRecord) -> RawVolume:
        index, frame = self._parse_key(record.key)
        return self.generate(index, frame)

    # -- generation --------------------------------------------------------------------------------

    def _parse_key(self, key: str) -> tuple[int, str]:
        name, _, frame = key.partition("_")
        number = name.removeprefix("phantom")
        index = int(number) - 1 if name.startswith("phantom") and number.isdigit() else -1
        if frame not in ("ED", "ES") or not 0 <= index < self.num_subjects:
            raise DataError(f"{key}: not a record of this phantom ({self.num_subjects} subjects)")
        return index, frame

    def site_params(self, site: int) -> _Site:
        rng = np.random.default_rng([self.seed, 1_000_003, site])
        direction = rng.uniform(0, 2 * np.pi)
        strength = rng.uniform(0.15, 0.45)
        bias = (
            strength * np.cos(direction),
            strength * np.sin(direction),
            rng.uniform(-0.15, 0.15),
            -rng.uniform(0.05, 0.25),
        )
        return _Site(
            spacing=SITE_SPACINGS[site % len(SITE_SPACINGS)],
            gain=float(rng.uniform(200.0, 2000.0)),
            gamma=float(rng.uniform(0.65, 1.5)),
            noise=float(rng.uniform(0.015, 0.06)),
            bias=tuple(float(b) for b in bias),  # type: ignore[arg-type]
        )

    def subject_params(self, index: int) -> _Subject:
        rng = np.random.default_rng([self.seed, index])
        group = index % NUM_GROUPS
        lv_x, wall_x, es_ratio, rv_x = _GROUPS[group]
        num_slices = int(rng.integers(self.min_slices, self.max_slices + 1))
        nb_frames = int(rng.integers(20, 31))
        return _Subject(
            index=index,
            site=index % self.num_sites,
            group=group,
            num_slices=num_slices,
            slice_spacing=float(np.clip(np.round(rng.uniform(80.0, 105.0) / num_slices * 2) / 2, 5.0, 10.0)),
            centre=(float(rng.uniform(-12, 12)), float(rng.uniform(-12, 12))),
            angle=float(np.pi + rng.uniform(-0.6, 0.6)),
            lv_radius=float(rng.uniform(21.0, 27.0) * lv_x),
            wall=float(rng.uniform(7.0, 9.5) * wall_x),
            es_ratio=float(np.clip(es_ratio + rng.uniform(-0.05, 0.05), 0.4, 0.95)),
            ellipticity=float(rng.uniform(0.0, 0.08)),
            rv_width=float(rng.uniform(14.0, 22.0) * rv_x),
            rv_extent=float(rng.uniform(0.6, 0.78)),
            body=(float(rng.uniform(135, 165)), float(rng.uniform(100, 120))),
            tissue_jitter=tuple(float(v) for v in rng.uniform(-0.04, 0.04, size=9)),
            nb_frames=nb_frames,
            es_frame=int(round(nb_frames * rng.uniform(0.3, 0.42))) + 1,
        )

    def generate(self, index: int, frame: str) -> RawVolume:
        """Image (float32, arbitrary scanner units) and label (uint8) of one subject and frame."""
        subj, site = self.subject_params(index), self.site_params(index % self.num_sites)
        n, d, sp = self.size, subj.num_slices, site.spacing
        coords = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * sp
        x, y = coords[:, None, None], coords[None, :, None]  # mm; broadcast with per-slice [1, 1, D] params
        t = np.linspace(0.0, 1.0, d, dtype=np.float32)[None, None, :]  # 0 = base, 1 = apex

        # Heart geometry in a frame rotated so that u points from the LV centre toward the RV.
        cu, su = np.cos(subj.angle), np.sin(subj.angle)
        dx, dy = x - subj.centre[0], y - subj.centre[1]
        u, v = dx * cu + dy * su, -dx * su + dy * cu
        r_ed = subj.lv_radius
        r_cav = r_ed * (subj.es_ratio if frame == "ES" else 1.0)
        outer = np.sqrt(r_cav**2 + (r_ed + subj.wall) ** 2 - r_ed**2)  # myocardial area conserved ED -> ES
        taper = np.sqrt(1.0 - 0.8 * t**2)  # cavity shrinks toward the apex
        cavity_r = r_cav * taper
        outer_r = cavity_r + (outer - r_cav) * (1.0 + 0.15 * t)  # wall stays (slightly thicker at apex)
        e = subj.ellipticity
        rho = np.sqrt((u / (1 + e)) ** 2 + (v / (1 - e)) ** 2)
        lv = rho < cavity_r
        epi = rho < outer_r

        rv_scale = np.sqrt(np.clip(1.0 - (t / subj.rv_extent) ** 2, 0.0, 1.0))  # gone for t >= rv_extent
        rv_w = subj.rv_width * rv_scale * (1.0 if frame == "ED" else 0.8)
        present = rv_w > 2.0
        a_c = 0.35 * outer_r
        ra = np.maximum(outer_r + rv_w - a_c, 1e-3)
        rb = 1.2 * outer_r * (0.6 + 0.4 * rv_scale)
        rv_outer = ((u - a_c) / ra) ** 2 + (v / rb) ** 2
        rv = (rv_outer < 1.0) & ~epi & present
        rv_wall = (((u - a_c) / (ra + 2.5)) ** 2 + (v / (rb + 2.5)) ** 2 < 1.0) & ~epi & ~rv & present

        # Background anatomy (image-centred), painted first; the heart is painted over it.
        j = subj.tissue_jitter
        img = np.zeros((n, n, d), dtype=np.float32)
        ba, bb = subj.body
        body = (x / ba) ** 2 + ((y - 10) / bb) ** 2
        img[np.broadcast_to(body < 1.0, img.shape)] = _FAT + j[0]
        img[np.broadcast_to(body < 0.85, img.shape)] = _BODY + j[1]
        lung_a = 40 + 8 * (1 - t)
        for side in (-1.0, 1.0):
            lung = ((x - side * 72) / lung_a) ** 2 + ((y + 5) / 62) ** 2 < 1.0
            img[np.broadcast_to(lung, img.shape)] = _LUNG + abs(j[2])
        img[np.broadcast_to((x / 14) ** 2 + ((y - bb + 28) / 16) ** 2 < 1.0, img.shape)] = _SPINE + j[3]
        liver = (((x + 45) / 70) ** 2 + ((y + 5) / 55) ** 2 < 1.0) & (t > 0.55)
        img[liver] = _LIVER + j[4]
        aorta = ((x + 8) ** 2 + (y - bb + 55) ** 2) < (10.0 + 1.0 * np.cos(3 * t)) ** 2
        img[np.broadcast_to(aorta, img.shape)] = _AORTA + j[5]
        img[epi | rv_wall] = _MYO + j[6]
        img[rv] = _RV_BLOOD + j[7]
        img[lv] = _LV_BLOOD + j[8]

        label = np.zeros((n, n, d), dtype=np.uint8)
        label[rv] = 1
        label[epi] = 2
        label[lv] = 3

        img = self._scanner(img, x, y, site, index, frame)
        affine = np.diag([-sp, -sp, subj.slice_spacing, 1.0])
        affine[:3, 3] = [(n - 1) / 2 * sp, (n - 1) / 2 * sp, -(d - 1) / 2 * subj.slice_spacing]
        return RawVolume(image=img, affine=affine, label=label)

    def _scanner(
        self, img: np.ndarray, x: np.ndarray, y: np.ndarray, site: _Site, index: int, frame: str
    ) -> np.ndarray:
        """Partial-volume blur, gamma, bias field, Rician noise and gain of the subject's site."""
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] + 4 * p[1:-1, 1:-1]) / 8.0
        img = np.power(np.clip(img, 0.0, None), site.gamma, dtype=np.float32)
        half = (self.size - 1) / 2 * site.spacing
        xn, yn = x / half, y / half
        a, b, c, q = site.bias
        img = img * np.exp(a * xn + b * yn + c * xn * yn + q * (xn**2 + yn**2)).astype(np.float32)
        rng = np.random.default_rng([self.seed, 2_000_003, index, 0 if frame == "ED" else 1])
        noise = rng.standard_normal((2, *img.shape), dtype=np.float32) * site.noise
        img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
        return (img * site.gain).astype(np.float32)


def write_acdc_layout(source: PhantomSource, out_dir: str, dtype: str = "float32") -> Path:
    """Write the phantom as an ACDC-style folder tree and return ``out_dir``.

    Layout: ``patientXXX/patientXXX_frameYY.nii.gz`` (ED = frame 01, ES = the subject's ES frame), the same
    with ``_gt`` for labels, and ``Info.cfg``. Images are stored as ``dtype`` (``float32``, ``int16`` scaled
    to [0, 4095], ``uint8`` scaled to [0, 255]). Headers imitate real ACDC files: the sform holds directions
    only and the voxel size lives in ``pixdim``, so the reader's handling of that quirk gets exercised.
    """
    if dtype not in ("float32", "int16", "uint8"):
        raise ValueError(f"dtype must be float32, int16 or uint8, got {dtype!r}")
    out = Path(out_dir)
    for i in range(source.num_subjects):
        subj = source.subject_params(i)
        patient = f"patient{i + 1:03d}"
        folder = out / patient
        folder.mkdir(parents=True, exist_ok=True)
        frames = {"ED": 1, "ES": subj.es_frame}
        for frame, number in frames.items():
            raw = source.generate(i, frame)
            stem = f"{patient}_frame{number:02d}"
            _save(_cast(raw.image, dtype), raw.affine, folder / f"{stem}.nii.gz")
            _save(raw.label, raw.affine, folder / f"{stem}_gt.nii.gz")
        (folder / "Info.cfg").write_text(
            f"ED: 1\nES: {subj.es_frame}\nGroup: G{subj.group}\nHeight: {160 + 3 * subj.group}.0\n"
            f"NbFrame: {subj.nb_frames}\nWeight: {60 + 5 * subj.group}.0\n"
        )
    return out


def _cast(image: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return image.astype(np.float32)
    top = 4095.0 if dtype == "int16" else 255.0
    scaled = image / max(float(image.max()), 1e-6) * top
    return np.round(scaled).astype(dtype)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Save with an ACDC-like header: direction-only sform (code 2), voxel size in pixdim, no qform."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine.copy()
    direction[:3, :3] = affine[:3, :3] / zooms
    img = nib.Nifti1Image(data, direction)
    img.header.set_zooms(tuple(float(z) for z in zooms))
    img.set_qform(None, code=0)
    img.set_sform(direction, code=2)
    nib.save(img, str(path))


#: the layouts :func:`write_consortium` gives its sites, in turn
CONSORTIUM_LAYOUTS = ("acdc", "acdc-reoriented", "manifest")


def write_consortium(
    out_dir: str | Path,
    num_sites: int = 3,
    patients_per_site: int = 6,
    labelled_per_site: int = 2,
    seed: int = 0,
    size: int = 96,
) -> Path:
    """Write a partially labelled phantom consortium: one folder per site (``site0`` ...), each
    site a different scanner (spacing, contrast, noise) and, in turn, a different layout:

    - ``acdc``: ACDC layout (``patientNNN/`` with ``Info.cfg``);
    - ``acdc-reoriented``: the same layout with every file stored in another axis order
      (x and y swapped in the array and the affine: the same anatomy in world space);
    - ``manifest``: NIfTI files listed in ``manifest.csv`` with empty ``label`` cells.

    Only ``labelled_per_site`` patients of a site keep their label files, and not the first ones
    by id (the last ones, counted back), as on real data. Returns ``out_dir``.
    """
    if num_sites < 1 or patients_per_site < 1 or not 0 <= labelled_per_site <= patients_per_site:
        raise ValueError("need num_sites >= 1, patients_per_site >= 1 and 0 <= labelled_per_site <= patients_per_site")
    out = Path(out_dir)
    source = PhantomSource(num_subjects=num_sites * patients_per_site, num_sites=num_sites, seed=seed, size=size)
    for site in range(num_sites):
        layout = CONSORTIUM_LAYOUTS[site % len(CONSORTIUM_LAYOUTS)]
        folder = out / f"site{site}"
        folder.mkdir(parents=True, exist_ok=True)
        subjects = [i for i in range(source.num_subjects) if i % num_sites == site]
        labelled = set(subjects[len(subjects) - labelled_per_site :])
        rows = ["image,label,patient,frame"]
        for n, i in enumerate(subjects, start=1):
            subj = source.subject_params(i)
            patient = f"patient{n:03d}"
            for frame, number in (("ED", 1), ("ES", subj.es_frame)):
                raw = source.generate(i, frame)
                image, label, affine = raw.image, raw.label, raw.affine
                if layout == "acdc-reoriented":
                    image, label = image.transpose(1, 0, 2), label.transpose(1, 0, 2)
                    affine = affine[:, [1, 0, 2, 3]]
                stem = f"{patient}_frame{number:02d}"
                if layout == "manifest":
                    _save(image.astype(np.float32), affine, folder / f"{stem}.nii.gz")
                    cell = ""
                    if i in labelled:
                        _save(label, affine, folder / f"{stem}_gt.nii.gz")
                        cell = f"{stem}_gt.nii.gz"
                    rows.append(f"{stem}.nii.gz,{cell},{patient},{frame}")
                    continue
                (folder / patient).mkdir(exist_ok=True)
                _save(image.astype(np.float32), affine, folder / patient / f"{stem}.nii.gz")
                if i in labelled:
                    _save(label, affine, folder / patient / f"{stem}_gt.nii.gz")
            if layout != "manifest":
                (folder / patient / "Info.cfg").write_text(
                    f"ED: 1\nES: {subj.es_frame}\nGroup: G{subj.group}\nNbFrame: {subj.nb_frames}\n"
                )
        if layout == "manifest":
            (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m fcl_lightning.data.phantom OUT``: write a partially labelled phantom consortium
    (:func:`write_consortium`), a stand-in for a consortium's own site folders."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fcl_lightning.data.phantom", description=main.__doc__)
    p.add_argument("out", help="folder to write site0/, site1/, ... into")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--patients", type=int, default=6, help="patients per site (two frames each)")
    p.add_argument("--labelled", type=int, default=2, help="patients per site that keep their label files")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.sites < 1 or a.patients < 1 or not 0 <= a.labelled <= a.patients:
        p.error("need --sites >= 1, --patients >= 1 and 0 <= --labelled <= --patients")
    out = write_consortium(a.out, a.sites, a.patients, a.labelled, a.seed)
    layouts = ", ".join(f"site{i} ({CONSORTIUM_LAYOUTS[i % len(CONSORTIUM_LAYOUTS)]})" for i in range(a.sites))
    print(f"wrote {a.sites} sites x {a.patients} patients ({a.labelled} labelled each) to {out}: {layouts}")


if __name__ == "__main__":  # pragma: no cover
    main()
