"""Deterministic synthetic multi-hospital MRI for the HGG-vs-brain-metastasis demo.

Each case is an ellipsoidal "brain" (white/grey-matter-like smooth texture, background ~0) holding one lesion:
a necrotic core (label 2) inside an enhancing rim (label 1), surrounded by peritumoral edema (label 3), imaged
as T1c, FLAIR and ADC. Lesion parameters come from overlapping class distributions that follow the imaging
literature: metastases are rounder and sharper, with relatively more (and purely vasogenic, high-ADC) edema and
homogeneous enhancement; high-grade gliomas are lobulated, with thick heterogeneous rims, infiltrative margins
and textured, lower-ADC edema. Every site then applies its own scanner model (gain, offset, Rician noise, smooth
bias field, slice thickness), so sites are distinguishable from intensities alone, as in real multi-centre data.

This module holds the hospitals (their case counts and scanners) and writes their folders; the image model
(tissue, class-conditional lesions, scanner effects) is ``radfed.phantom``.
"""

import csv
import gzip
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from client.ledger import Ledger
from client.sitefiles import SiteFiles
from common.protocol import DEFAULT_K
from radfed.phantom import SEQUENCES, SiteSpec, generate_case

# age and sex: biological covariates a federation may give ComBat (combat-covariates); they do not shape the images
MANIFEST_HEADER = ("case_id", "diagnosis", "t1c", "flair", "adc", "mask", "age", "sex")
STAMP_NAME = "demo.json"
# Bump when the generator changes, so stale demo folders are regenerated instead of reused.
_GENERATOR_VERSION = 2  # 2: age and sex columns


# name, n_hgg, n_bm, spacing, size, gain, offset, noise, bias. Field of view is 104-116 mm on every site so the
# phantom brain (and therefore lesion size in mm) is the same everywhere; only the scanner differs.
_DEFAULT_SITES = (
    ("hospital-a", 30, 22, (1.45, 1.45, 3.5), (80, 80, 32), 1.00, 0.00, 0.04, 0.10),
    ("hospital-b", 15, 23, (1.6, 1.6, 5.0), (72, 72, 24), 1.35, 0.04, 0.08, 0.25),
    ("hospital-c", 28, 18, (1.25, 1.25, 2.6), (92, 92, 40), 0.80, 0.02, 0.03, 0.05),
    ("hospital-d", 14, 20, (1.6, 1.6, 4.0), (68, 68, 28), 1.15, 0.01, 0.06, 0.18),
)

# spacing, gain, offset, noise, bias for tiny test sites (all 40x40x16 voxels).
_TINY_SCANNERS = (
    ((1.6, 1.6, 4.0), 1.00, 0.00, 0.04, 0.10),
    ((1.5, 1.5, 5.0), 1.40, 0.04, 0.09, 0.25),
    ((1.7, 1.7, 3.0), 0.75, 0.02, 0.03, 0.05),
    ((1.6, 1.6, 4.5), 1.15, 0.01, 0.06, 0.18),
)


def default_sites(scale: float = 1.0) -> list[SiteSpec]:
    """Four heterogeneous hospitals (52, 38, 46, 34 cases with different HGG/BM ratios).

    ``scale`` multiplies the case counts (at least 6 per class); below 1 it also shrinks the grid (at most by
    half, keeping the spacing) so tests stay fast.
    """
    if scale <= 0:
        raise ValueError("scale must be positive")
    grid = min(1.0, max(0.5, scale))
    sites = []
    for name, n_hgg, n_bm, spacing, size, gain, offset, noise, bias in _DEFAULT_SITES:
        nx, ny, nz = size
        sites.append(
            SiteSpec(
                name=name,
                n_hgg=max(6, round(n_hgg * scale)),
                n_bm=max(6, round(n_bm * scale)),
                spacing=spacing,
                size=(max(32, round(nx * grid)), max(32, round(ny * grid)), max(12, round(nz * grid))),
                gain=gain,
                offset=offset,
                noise=noise,
                bias=bias,
            )
        )
    return sites


def tiny_sites(n_sites: int = 2, n_per_class: int = 6) -> list[SiteSpec]:
    """Small fast sites for tests: 40x40x16 voxels, ``n_per_class`` cases of each class, distinct scanners."""
    if n_sites < 1 or n_per_class < 1:
        raise ValueError("n_sites and n_per_class must be positive")
    sites = []
    for i in range(n_sites):
        spacing, gain, offset, noise, bias = _TINY_SCANNERS[i % len(_TINY_SCANNERS)]
        cycle = i // len(_TINY_SCANNERS)  # beyond four sites, keep scanners distinct by shifting the gain
        name = f"tiny-{chr(ord('a') + i)}" if i < 26 else f"tiny-{i}"
        sites.append(
            SiteSpec(
                name, n_per_class, n_per_class, spacing, (40, 40, 16), gain * (1 + 0.12 * cycle), offset, noise, bias
            )
        )
    return sites


# --------------------------------------------------------------------------------------------------------------
# Writing


def _write_nifti_gz(image: sitk.Image, path: Path) -> None:
    """Write compressed NIfTI: SimpleITK writes plain .nii, we gzip at level 1 with mtime 0.

    ITK ignores the compression level for NIfTI and its default level made writing most of the demo's run
    time; level 1 is ~4x faster for ~25 % more disk, and a fixed mtime keeps the files byte-reproducible.
    """
    tmp = path.with_name(path.name.removesuffix(".gz") + ".tmp.nii")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=False)
        path.write_bytes(gzip.compress(tmp.read_bytes(), compresslevel=1, mtime=0))
    finally:
        tmp.unlink(missing_ok=True)


def _case_prefix(name: str) -> str:
    tail = name.rsplit("-", 1)[-1]
    return tail if tail.isalnum() else name


def write_site(root: Path, spec: SiteSpec, seed: int) -> Path:
    """Write root/<site>/{images,masks}/*.nii.gz and manifest.csv for one site; returns the site folder.

    Case i depends only on (seed, i), and the manifest is written last (atomically), so an existing manifest
    means the site is complete.
    """
    folder = Path(root) / spec.name
    images_dir, masks_dir = folder / "images", folder / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.csv"
    manifest.unlink(missing_ok=True)
    for stale in [*images_dir.glob("*.nii.gz"), *masks_dir.glob("*.nii.gz")]:  # leftovers of another spec
        stale.unlink()

    seeds = np.random.SeedSequence(seed).spawn(1 + spec.n_hgg + spec.n_bm)
    site_rng = np.random.default_rng(seeds[0])
    order = site_rng.permutation(np.array(["HGG"] * spec.n_hgg + ["BM"] * spec.n_bm))
    ages = np.clip(np.rint(site_rng.normal(60.0, 12.0, len(order))), 18, 90).astype(int)
    sexes = site_rng.choice(np.array(["F", "M"]), len(order))
    prefix = _case_prefix(spec.name)
    rows = []
    for i, diagnosis in enumerate(order, start=1):
        case_id = f"{prefix}-{i:03d}"
        case = generate_case(spec, str(diagnosis), np.random.default_rng(seeds[i]))
        rel = {seq: f"images/{case_id}_{seq}.nii.gz" for seq in SEQUENCES}
        rel["mask"] = f"masks/{case_id}_mask.nii.gz"
        for key, path in rel.items():
            _write_nifti_gz(case[key], folder / path)
        rows.append([case_id, str(diagnosis), rel["t1c"], rel["flair"], rel["adc"], rel["mask"], str(ages[i - 1]),
                     str(sexes[i - 1])])

    # a synthetic site's release secret follows from the seed, so the demo and the tests split reproducibly
    Ledger(SiteFiles(folder / ".radfed").release, DEFAULT_K).seed_secret(
        hashlib.sha256(f"radfed synthetic site {spec.name} {seed}".encode()).digest())
    tmp = manifest.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_HEADER)
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return folder


def _site_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_demo(root: Path, sites: list[SiteSpec] | None = None, seed: int = 0) -> list[Path]:
    """Write every site (default: default_sites()) under root and return the site folders in order.

    Deterministic in ``seed`` (non-negative). Sites whose manifest exists are reused when root/demo.json records
    the same seed, specs and generator version; the stamp is (re)written at the end.
    """
    root = Path(root)
    sites = default_sites() if sites is None else list(sites)
    if len({s.name for s in sites}) != len(sites):
        raise ValueError("site names must be unique")
    root.mkdir(parents=True, exist_ok=True)
    stamp_path = root / STAMP_NAME
    # JSON round trip so tuples compare equal to the lists read back from disk.
    stamp = json.loads(json.dumps({"version": _GENERATOR_VERSION, "seed": seed, "sites": [asdict(s) for s in sites]}))
    try:
        reuse = json.loads(stamp_path.read_text()) == stamp
    except (OSError, ValueError):
        reuse = False
    if not reuse:
        # Drop the old stamp first: if this run dies midway it must not vouch for half-rewritten sites.
        stamp_path.unlink(missing_ok=True)

    folders = []
    for index, spec in enumerate(sites):
        folder = root / spec.name
        if reuse and (folder / "manifest.csv").is_file():
            folders.append(folder)
        else:
            folders.append(write_site(root, spec, _site_seed(seed, index)))
    stamp_path.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return folders
