"""The per-case feature cache of a site: where an entry lives, how it is written, and when it may be reused.

An entry (``<output_dir>/cache/<profile-hash-12>/<case>-<tag>.json``) holds a case's features or its failure.
It is reused only when the sha256 of every input file, the label map, the profile hash and the pyradiomics
version all match, and when it was made by extraction code that treats images as this code does (the stamps
below). Nothing here leaves the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from client.integrity import IntegrityError, check_image_file
from client.site import Case, CaseProblem, Site
from client.sitefiles import atomic_write
from common.profile import Profile

file_log = logging.getLogger("radfed.extraction")  # the site's extraction.log (handlers set by client.extract)

# Stamped on entries whose input files passed client.integrity. An entry without it was made before that
# check existed (a NIfTI NaN read as 0, a cut file zero-filled): its files are checked once on reuse.
INPUT_CHECKS = "integrity/1"
# Stamped on entries extracted from images in their stored pixel type. Before it, radfed cast every image to
# float32, which changes pyradiomics' resampled integer images and float64 voxels: such an entry is reused
# only when every image is stored as float32 (the cast did nothing), else the case is extracted again.
PIXEL_TYPES = "as-stored/1"


def cache_file(site: Site, profile: Profile, case_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)
    tag = hashlib.sha256(case_id.encode()).hexdigest()[:8]
    return site.files.cache_file(profile.short_hash, f"{safe}-{tag}.json")


def write_cache(path: Path, entry: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(entry))  # atomic: a killed run never leaves half an entry


def new_entry(case_id: str, inputs: dict[str, str], profile: Profile, version: str,
              features: dict[str, float] | None, problem: CaseProblem | None) -> dict[str, object]:
    """What this code writes for one case, with every stamp."""
    return {"case_id": case_id, "inputs": inputs, "profile_sha256": profile.sha256, "pyradiomics": version,
            "features": features, "problem": problem and problem.as_dict(), "input_checks": INPUT_CHECKS,
            "pixel_types": PIXEL_TYPES}


def _cache_miss(path: Path, why: str) -> None:
    file_log.warning("cache entry %s %s: extracting the case again", path, why)


def _all_numbers(values: Iterable[object]) -> bool:
    """Every value an int or float from JSON (not a bool): one pass over the types (an entry holds ~900 values,
    and a site reads every entry at a run's first message)."""
    return {type(v) for v in values} <= {int, float}


def stored_as_float32(path: Path) -> bool:
    """Whether a NIfTI/NRRD file's header says float32 voxels (read without the voxels); False for a DICOM
    folder or a file SimpleITK cannot read the header of."""
    if not path.is_file():
        return False
    import SimpleITK as sitk  # here: a site that reads only current entries never loads it

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return reader.GetPixelID() == sitk.sitkFloat32


def read_cache(path: Path, inputs: dict[str, str], profile: Profile, version: str,
               case: Case | None = None) -> dict[str, float] | CaseProblem | None:
    """The cached features or failure of a case, or None when absent, made with other inputs, or not a
    valid entry (damaged or edited by hand: logged, and the case is extracted again rather than crash).

    Entries made before a stamp existed are reused only when ``case``'s files show the old code gave the
    same result (restamped then, so the check runs once).
    """
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        return _cache_miss(path, f"cannot be read ({exc})")
    if not isinstance(entry, dict):
        return _cache_miss(path, f"holds a JSON {type(entry).__name__}, not an object")
    if entry.get("inputs") != inputs or entry.get("profile_sha256") != profile.sha256 \
            or entry.get("pyradiomics") != version:
        return None
    problem, features = entry.get("problem"), entry.get("features")
    if problem:
        fields = ("case_id", "reason", "fix", "kind")
        if not (isinstance(problem, dict) and set(problem) <= set(fields) and set(fields[:3]) <= set(problem)
                and all(isinstance(v, str) for v in problem.values())):
            return _cache_miss(path, "has a malformed 'problem'")
    elif not (isinstance(features, dict) and features and _all_numbers(features.values())):
        return _cache_miss(path, "has no valid 'features' (an object of numbers)")
    stamps = {}
    if entry.get("pixel_types") != PIXEL_TYPES:  # a failure too may depend on the pixel type pyradiomics saw
        if case is None or not all(stored_as_float32(p) for p in case.images.values()):
            return _cache_miss(path, "was extracted from images cast to float32 and this case has images of "
                                     "another pixel type (or DICOM series)")
        stamps["pixel_types"] = PIXEL_TYPES
    if not problem and entry.get("input_checks") != INPUT_CHECKS and case is not None:
        try:
            for file in (*case.images.values(), case.mask):
                if file.is_file():  # DICOM folders are checked by SimpleITK as before
                    check_image_file(file)
        except IntegrityError as exc:
            return _cache_miss(path, f"predates the file checks and {exc.reason}")
        stamps["input_checks"] = INPUT_CHECKS
    if stamps:
        write_cache(path, {**entry, **stamps})  # checked once, not on every run
    if problem:
        return CaseProblem(**problem)
    return dict(zip(features, map(float, features.values()), strict=True))  # JSON keys are str already
