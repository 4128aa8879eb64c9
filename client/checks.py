"""Per-case input checks, run before pyradiomics so every failure names the case and the fix.

pyradiomics either fails cryptically on these inputs (NaN voxels) or, worse, runs silently
(a mask on another grid is resampled into the image's grid), so radfed checks them itself. Each
NIfTI/NRRD file is first checked at the byte level (``client.integrity``): SimpleITK reads NIfTI NaN as 0
and fills a file cut short with zeros, so a damaged file would otherwise pass as a usable case.
Nothing here imports pyradiomics: ``radfed site check`` runs these checks alone, in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from client.integrity import IntegrityError, check_image_file
from client.site import BACKGROUND, SiteError

if TYPE_CHECKING:  # imported by the functions that read images: a site answering from its cache never loads it
    import SimpleITK as sitk

GEOMETRY_TOLERANCE = 1e-3  # mm for spacing/origin, unitless for direction cosines
MIN_REGION_VOXELS = 20


class CaseInputError(ValueError):
    """A case's images or mask cannot be used; carries the fix for the site administrator and a kind tag."""

    def __init__(self, reason: str, fix: str, kind: str = "other") -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix
        self.kind = kind


def _itk_reason(exc: RuntimeError, path: Path) -> str:
    """ITK's last message line without its prefix and the path we already name."""
    text = str(exc).strip()
    line = text.splitlines()[-1] if text else "unknown error"
    line = line.replace("sitk::ERROR:", "").replace(f'"{path}"', "").replace(str(path), "").strip(" :")
    if line.startswith("Unable to determine ImageIO reader"):
        return "not a NIfTI/NRRD file, or damaged"
    return line or "unknown error"


def _read_dicom_series(path: Path, what: str) -> sitk.Image:
    """The one DICOM series in a folder; ITK's own warnings are silenced because we report the cause."""
    import SimpleITK as sitk
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise CaseInputError(f"{what} folder {path} holds no DICOM series",
                                 "put the sequence's DICOM files in it, or use a NIfTI/NRRD file",
                                 kind="unreadable")
        if len(series) > 1:
            raise CaseInputError(f"{what} folder {path} holds {len(series)} DICOM series",
                                 "keep one series per folder", kind="unreadable")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise CaseInputError(f"{what} DICOM series in {path} cannot be read ({_itk_reason(exc, path)})",
                                 "re-export the series from the PACS", kind="unreadable") from exc
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    # ITK reads on but sets this key when slice positions are not evenly spaced: a missing slice
    # would otherwise give a silently wrong z spacing.
    if image.HasMetaDataKey("ITK_non_uniform_sampling_deviation"):
        raise CaseInputError(f"{what} DICOM series in {path} has unevenly spaced slices (a slice is missing?)",
                             "re-export the complete series", kind="dicom-slices")
    return image


def read_image(path: Path, what: str) -> sitk.Image:
    """A 3D scalar volume from a NIfTI/NRRD file or a DICOM series folder."""
    import SimpleITK as sitk
    if not path.exists():
        raise CaseInputError(f"{what} file {path} is missing", "fix the path in the site's manifest/folder or "
                             "restore the file", kind="missing-file")
    if path.is_dir():
        image = _read_dicom_series(path, what)
    else:
        try:
            check_image_file(path, what)  # before SimpleITK, which hides NIfTI NaN and truncation
        except IntegrityError as exc:
            raise CaseInputError(exc.reason, exc.fix, kind=exc.kind) from exc
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise CaseInputError(f"{what} file {path} cannot be read ({_itk_reason(exc, path)})",
                                 "re-export it as NIfTI (.nii.gz) or NRRD", kind="unreadable") from exc
    if image.GetDimension() != 3:
        raise CaseInputError(f"{what} is {image.GetDimension()}D", "provide a 3D volume", kind="not-3d")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseInputError(f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel",
                             "provide a scalar (single-channel) volume", kind="not-scalar")
    return image


def _fmt(values: tuple[float, ...] | tuple[int, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in np.round(np.asarray(values, dtype=float), 4)) + ")"


def geometry_differences(image: sitk.Image, reference: sitk.Image,
                         tolerance: float = GEOMETRY_TOLERANCE) -> list[str]:
    """Each grid property in which two volumes differ, as 'spacing (a) vs (b)'; empty when on one grid."""
    import SimpleITK as sitk
    if image.GetSize() != reference.GetSize():
        diffs = [f"size {_fmt(image.GetSize())} vs {_fmt(reference.GetSize())}"]
    else:
        diffs = []
    for getter, label in ((sitk.Image.GetSpacing, "spacing"), (sitk.Image.GetOrigin, "origin"),
                          (sitk.Image.GetDirection, "direction")):
        a, b = np.asarray(getter(image)), np.asarray(getter(reference))
        if np.max(np.abs(a - b)) > tolerance:
            diffs.append(f"{label} {_fmt(tuple(a))} vs {_fmt(tuple(b))}")
    return diffs


def check_same_grid(image: sitk.Image, reference: sitk.Image, what: str, ref_what: str) -> None:
    """The mask (or any volume) must lie on the reference's voxel grid."""
    diffs = geometry_differences(image, reference)
    if diffs:
        raise CaseInputError(f"{what} and {ref_what} are on different grids: {what} {'; '.join(diffs)}",
                             f"resample {what} onto the {ref_what} grid (co-register the case)",
                             kind="mask-geometry" if "mask" in (what, ref_what) else "not-co-registered")


def check_co_registered(volumes: Mapping[str, sitk.Image]) -> None:
    """All sequences of a case on one grid; names the two that differ (against the first sequence)."""
    items = list(volumes.items())
    if not items:
        return
    ref_name, ref = items[0]
    for name, image in items[1:]:
        diffs = geometry_differences(image, ref)
        if diffs:
            raise CaseInputError(
                f"sequences {name} and {ref_name} are not co-registered: {name} vs {ref_name} {'; '.join(diffs)}",
                f"co-register {name} to {ref_name} (resample it onto the {ref_name} grid)", kind="not-co-registered")


def check_finite(image: sitk.Image, what: str) -> None:
    """NaN/Inf as SimpleITK read them: catches DICOM series; NIfTI/NRRD files were checked byte by byte.
    A read-only view of the image's own pixel type: integer voxels cannot be non-finite, and nothing is cast."""
    import SimpleITK as sitk
    arr = sitk.GetArrayViewFromImage(image)
    bad = int(np.count_nonzero(~np.isfinite(arr))) if np.issubdtype(arr.dtype, np.floating) else 0
    if bad:
        raise CaseInputError(f"{what} has {bad} NaN/Inf voxel(s)", f"replace the non-finite voxels in {what}",
                             kind="non-finite")


def _integer_labels(mask: sitk.Image) -> np.ndarray:
    import SimpleITK as sitk
    arr = sitk.GetArrayViewFromImage(mask)
    if not np.issubdtype(arr.dtype, np.integer) and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise CaseInputError("mask holds non-integer values", "save the mask as an integer label map",
                             kind="mask-values")
    return np.asarray(arr).astype(np.int64)


def label_lookup(label_map: Mapping[int, str] | None, regions: Mapping[str, int]) -> dict[int, int] | None:
    """A site's ``label_map`` (source label -> region name) as source label -> profile label (0 = dropped).

    Raises SiteError when a name is not a profile region: that is a site.yaml error, not a case's.
    """
    if label_map is None:
        return None
    unknown = sorted({name for name in label_map.values() if name not in regions and name != BACKGROUND})
    if unknown:
        raise SiteError(f"site.yaml 'label_map' names region(s) {unknown} that the profile does not have: "
                        f"use {sorted(regions)} or '{BACKGROUND}'")
    missing = sorted(set(regions) - set(label_map.values()))
    if missing:
        raise SiteError(f"site.yaml 'label_map' gives no source label for region(s) {missing}: "
                        f"add '<source label>: <region>' for each")
    return {int(raw): (0 if name == BACKGROUND else regions[name]) for raw, name in label_map.items()}


def relabel_mask(mask: sitk.Image, label_map: Mapping[int, str], lookup: Mapping[int, int]) -> sitk.Image:
    """The mask in the profile's numbering; a source label outside the map is an error naming the raw label."""
    import SimpleITK as sitk
    arr = _integer_labels(mask)
    present = {int(v) for v in np.unique(arr)} - {0}
    unknown = sorted(present - set(lookup))
    if unknown:
        mapping = "{" + ", ".join(f"{k}: {v}" for k, v in label_map.items()) + "}"
        raise CaseInputError(f"mask has raw label(s) {unknown} outside the site's label_map {mapping}",
                             "add them to 'label_map' in site.yaml (a region name, or 'background' to drop them) "
                             "or relabel the mask", kind="unknown-label")
    out = np.zeros(arr.shape, dtype=np.uint8)
    for raw, label in lookup.items():
        if label:
            out[arr == raw] = label
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(mask)
    return image


def check_mask(mask: sitk.Image, regions: Mapping[str, int], min_voxels: int,
               raw: Mapping[int, list[int]] | None = None) -> None:
    """Labels inside the profile's regions and every region at least ``min_voxels`` voxels.

    ``raw`` (profile label -> source labels) only makes the messages name the site's own labels.
    """
    labels, counts = np.unique(_integer_labels(mask), return_counts=True)
    present = dict(zip(labels.tolist(), counts.tolist(), strict=True))
    present.pop(0, None)
    if not present:
        raise CaseInputError("mask is empty (no labelled voxel)", "segment the lesion or remove the case",
                             kind="empty-mask")
    unknown = sorted(set(present) - set(regions.values()))
    if unknown:
        raise CaseInputError(f"mask has label(s) {unknown} outside the profile's regions {dict(regions)}",
                             "relabel the mask to the profile's numbering (or set 'label_map' in site.yaml)",
                             kind="unknown-label")
    for region, label in regions.items():
        n = present.get(label, 0)
        if n < min_voxels:
            source = f", source label {raw[label]}" if raw and raw.get(label) else ""
            raise CaseInputError(f"region {region} (label {label}{source}) has {n} voxel(s), fewer than {min_voxels}",
                                 f"check the segmentation of {region}", kind="small-region")


def load_case_volumes(images: Mapping[str, Path], mask_path: Path, regions: Mapping[str, int], min_voxels: int,
                      label_map: Mapping[int, str] | None = None) -> tuple[dict[str, sitk.Image], sitk.Image]:
    """Read and check every volume of one case; raises CaseInputError on the first problem.

    ``label_map`` (source label -> region name, from site.yaml) is applied as the mask is read, so
    the checks and pyradiomics see the profile's numbering. Returns the images in the pixel type they are
    stored in, never cast: pyradiomics resamples an integer image as an integer image and normalises in
    float64, so any cast here would make radfed's features differ from pyradiomics run on the same files.
    """
    mask = read_image(mask_path, "mask")
    lookup = label_lookup(label_map, regions)
    raw: dict[int, list[int]] | None = None
    if label_map is not None and lookup is not None:
        mask = relabel_mask(mask, label_map, lookup)
        raw = {}
        for source, label in lookup.items():
            raw.setdefault(label, []).append(source)
    check_mask(mask, regions, min_voxels, raw)
    read = {seq: read_image(path, seq) for seq, path in images.items()}
    check_co_registered(read)
    if read:
        ref_name, ref = next(iter(read.items()))
        check_same_grid(mask, ref, "mask", ref_name)
    for seq, image in read.items():
        check_finite(image, seq)
    return read, mask
