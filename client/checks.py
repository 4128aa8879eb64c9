"""Per-case input checks, run before pyradiomics so every failure names the case and the fix.

pyradiomics either fails cryptically on these inputs (NaN voxels) or, worse, runs silently
(a mask on another grid is resampled into the image's grid), so radfed checks them itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

GEOMETRY_TOLERANCE = 1e-3  # mm for spacing/origin, unitless for direction cosines


class CaseInputError(ValueError):
    """A case's images or mask cannot be used; carries the fix for the site administrator."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


def read_image(path: Path, what: str) -> sitk.Image:
    if not path.exists():
        raise CaseInputError(f"{what} file {path} is missing", "fix the path in manifest.csv or restore the file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise CaseInputError(f"{what} file {path} cannot be read ({first})",
                             "re-export it as NIfTI (.nii.gz) or NRRD") from exc
    if image.GetDimension() != 3:
        raise CaseInputError(f"{what} is {image.GetDimension()}D", "provide a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseInputError(f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel",
                             "provide a scalar (single-channel) volume")
    return image


def check_same_grid(image: sitk.Image, reference: sitk.Image, what: str, ref_what: str) -> None:
    if image.GetSize() != reference.GetSize():
        raise CaseInputError(f"{what} size {image.GetSize()} differs from {ref_what} size {reference.GetSize()}",
                             f"resample {what} onto the {ref_what} grid (co-register the case)")
    for prop, label in ((sitk.Image.GetSpacing, "spacing"), (sitk.Image.GetOrigin, "origin"),
                        (sitk.Image.GetDirection, "direction")):
        a, b = np.asarray(prop(image)), np.asarray(prop(reference))
        if np.max(np.abs(a - b)) > GEOMETRY_TOLERANCE:
            raise CaseInputError(
                f"{what} {label} {tuple(np.round(a, 4))} differs from {ref_what} {label} {tuple(np.round(b, 4))}",
                f"resample {what} onto the {ref_what} grid (co-register the case)")


def check_finite(image: sitk.Image, what: str) -> None:
    arr = sitk.GetArrayViewFromImage(image)
    bad = int(np.count_nonzero(~np.isfinite(arr))) if np.issubdtype(arr.dtype, np.floating) else 0
    if bad:
        raise CaseInputError(f"{what} has {bad} NaN/Inf voxel(s)", f"replace the non-finite voxels in {what}")


def check_mask(mask: sitk.Image, regions: dict[str, int], min_voxels: int) -> None:
    arr = sitk.GetArrayViewFromImage(mask)
    if not np.issubdtype(arr.dtype, np.integer) and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise CaseInputError("mask holds non-integer values", "save the mask as an integer label map")
    labels, counts = np.unique(np.asarray(arr).astype(np.int64), return_counts=True)
    present = dict(zip(labels.tolist(), counts.tolist(), strict=True))
    present.pop(0, None)
    if not present:
        raise CaseInputError("mask is empty (no labelled voxel)", "segment the lesion or remove the case")
    allowed = set(regions.values())
    unknown = sorted(set(present) - allowed)
    if unknown:
        raise CaseInputError(f"mask has label(s) {unknown} outside the profile's regions {regions}",
                             "relabel the mask to the profile's numbering")
    for region, label in regions.items():
        n = present.get(label, 0)
        if n < min_voxels:
            raise CaseInputError(f"region {region} (label {label}) has {n} voxel(s), fewer than {min_voxels}",
                                 f"check the segmentation of {region}")


def load_case_volumes(images: dict[str, Path], mask_path: Path, regions: dict[str, int],
                      min_voxels: int) -> tuple[dict[str, sitk.Image], sitk.Image]:
    """Read and check every volume of one case; raises CaseInputError on the first problem."""
    mask = read_image(mask_path, "mask")
    check_mask(mask, regions, min_voxels)
    volumes: dict[str, sitk.Image] = {}
    for seq, path in images.items():
        image = read_image(path, seq)
        check_same_grid(image, mask, seq, "mask")
        check_finite(image, seq)
        volumes[seq] = sitk.Cast(image, sitk.sitkFloat32)
    return volumes, mask
