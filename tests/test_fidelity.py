"""radfed's features equal bare pyradiomics on the same files, for every pixel type MRI is stored in.

The reference is ``radiomics.featureextractor.RadiomicsFeatureExtractor`` with the profile's params, given the
file paths themselves. Images are real NRRD and NIfTI files written with SimpleITK in int16, uint16, uint8,
float32 and float64; profiles resample (B-spline to 2 mm) or not, and normalise or not.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from radiomics.featureextractor import RadiomicsFeatureExtractor

from client.checks import CaseInputError, load_case_volumes
from client.extract import extract_case_features, extract_site, quiet_pyradiomics
from client.site import Case, load_site
from common.profile import PROFILE_DIR, load_profile
from radfed import synth

DEFAULT = load_profile("default")
PIXEL_TYPES = {"int16": sitk.sitkInt16, "uint16": sitk.sitkUInt16, "uint8": sitk.sitkUInt8,
               "float32": sitk.sitkFloat32, "float64": sitk.sitkFloat64}
FORMATS = {"nrrd": ".nrrd", "nifti": ".nii.gz"}
RTOL = 1e-9


@pytest.fixture(scope="module")
def case_images() -> dict[str, sitk.Image]:
    """One synthetic HGG case (float32 images, uint8 mask) on a 1.6 x 1.6 x 4 mm grid."""
    return synth.generate_case(synth.tiny_sites(1, 1)[0], "HGG", np.random.default_rng(18))


def _as_stored(image: sitk.Image, pixel: str, rng: np.random.Generator) -> sitk.Image:
    """The image as a scanner or a pipeline would store it in that pixel type."""
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    if pixel in ("int16", "uint16"):
        arr = np.rint(arr * 4.0)  # 16-bit MRI: a few thousand units
    elif pixel == "uint8":
        arr = np.rint(arr * 200.0 / arr.max())  # below 256 - 2 x binWidth, where pyradiomics' uint8 bins wrap
    elif pixel == "float64":
        arr = arr + rng.uniform(-0.5, 0.5, arr.shape)  # values float32 cannot hold exactly
    out = sitk.Cast(sitk.GetImageFromArray(arr), PIXEL_TYPES[pixel])
    out.CopyInformation(image)
    return out


def _write_case(folder: Path, images: dict[str, sitk.Image], pixel: str, fmt: str,
                sequences: tuple[str, ...]) -> Case:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = {}
    for seq in sequences:
        paths[seq] = folder / f"{seq}{FORMATS[fmt]}"
        sitk.WriteImage(_as_stored(images[seq], pixel, rng), str(paths[seq]))
        assert sitk.ReadImage(str(paths[seq])).GetPixelID() == PIXEL_TYPES[pixel]
    mask = folder / f"mask{FORMATS[fmt]}"
    sitk.WriteImage(images["mask"], str(mask))
    return Case("case-1", "HGG", paths, mask)


def _variant(tmp_path: Path, name: str) -> object:
    """The default profile, or a one-sequence variant of it written as a YAML file (so it is hashed as usual)."""
    if name == "default":
        return DEFAULT
    doc = yaml.safe_load((PROFILE_DIR / f"{'extended' if name == 'extended' else 'default'}.yaml").read_text())
    doc["radfed"].update(name=f"fidelity-{name}", sequences=["t1c"], shape_from="t1c")
    setting = doc["setting"]
    if name == "no-resampling":
        del setting["resampledPixelSpacing"], setting["interpolator"]
    elif name == "no-normalisation":  # resampled as stored: e.g. quantitative ADC maps
        del setting["normalize"], setting["normalizeScale"]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_profile(path)


def _bare_pyradiomics(case: Case, profile) -> dict[str, float]:
    """What a user's own pyradiomics run gives on the same files, named as radfed names its features."""
    quiet_pyradiomics()
    extractor = RadiomicsFeatureExtractor(json.loads(json.dumps(profile.params)))
    out: dict[str, float] = {}
    for seq in profile.sequences:
        for region, label in profile.regions.items():
            for key, value in extractor.execute(str(case.images[seq]), str(case.mask), label=label).items():
                if not key.startswith("diagnostics_"):
                    out[f"{'shape' if '_shape_' in key else seq}/{region}/{key}"] = float(value)
    return out


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("pixel", list(PIXEL_TYPES))
@pytest.mark.parametrize("variant", ["default", "no-resampling", "no-normalisation"])
def test_features_equal_bare_pyradiomics_on_the_same_files(case_images, tmp_path, variant, pixel, fmt):
    profile = _variant(tmp_path, variant)
    case = _write_case(tmp_path / "case", case_images, pixel, fmt, profile.sequences)
    ours = extract_case_features(case, profile)
    theirs = _bare_pyradiomics(case, profile)
    assert sorted(ours) == sorted(theirs)
    names = sorted(theirs)
    a, b = np.array([ours[n] for n in names]), np.array([theirs[n] for n in names])
    rel = np.abs(a - b) / np.maximum(np.abs(b), np.finfo(float).tiny)
    worst = int(np.argmax(rel))
    assert rel[worst] <= RTOL, f"{names[worst]}: radfed {a[worst]!r} vs pyradiomics {b[worst]!r}"


@pytest.mark.parametrize("pixel, fmt", [("int16", "nrrd"), ("float64", "nifti")])
def test_filtered_image_features_equal_bare_pyradiomics(case_images, tmp_path, pixel, fmt):
    """The extended profile (LoG at three sigmas, wavelets) on a one-sequence case: filters see the stored type."""
    profile = _variant(tmp_path, "extended")
    case = _write_case(tmp_path / "case", case_images, pixel, fmt, profile.sequences)
    ours, theirs = extract_case_features(case, profile), _bare_pyradiomics(case, profile)
    assert sorted(ours) == sorted(theirs)
    assert any("wavelet-HHH" in n for n in ours) and any("log-sigma-4" in n for n in ours)
    for name, value in theirs.items():
        assert abs(ours[name] - value) <= RTOL * abs(value), (name, ours[name], value)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("pixel", list(PIXEL_TYPES))
def test_checks_hold_for_every_pixel_type(case_images, tmp_path, pixel, fmt):
    """A cut file is refused whatever its pixel type; NaN is refused in float files, in NIfTI too (where
    SimpleITK reads it as 0); what pyradiomics gets is the image as stored, not a float copy."""
    case = _write_case(tmp_path / "case", case_images, pixel, fmt, DEFAULT.sequences)
    volumes, _ = load_case_volumes(case.images, case.mask, DEFAULT.regions, 20)
    assert {v.GetPixelID() for v in volumes.values()} == {PIXEL_TYPES[pixel]}

    data = case.images["flair"].read_bytes()
    case.images["flair"].write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CaseInputError) as cut:
        load_case_volumes(case.images, case.mask, DEFAULT.regions, 20)
    assert cut.value.kind == "corrupt-file" and "flair" in cut.value.reason

    if pixel.startswith("float"):
        image = _as_stored(case_images["adc"], pixel, np.random.default_rng(1))
        arr = sitk.GetArrayFromImage(image)
        arr[tuple(np.argwhere(sitk.GetArrayFromImage(case_images["mask"]) == 1)[0])] = np.nan
        bad = sitk.GetImageFromArray(arr)
        bad.CopyInformation(image)
        sitk.WriteImage(bad, str(case.images["adc"]))
        sitk.WriteImage(case_images["flair"], str(case.images["flair"]))
        with pytest.raises(CaseInputError) as nan:
            load_case_volumes(case.images, case.mask, DEFAULT.regions, 20)
        assert nan.value.kind == "non-finite" and "adc" in nan.value.reason


def _site(folder: Path, case_images: dict[str, sitk.Image], pixels: dict[str, str]) -> Path:
    """A manifest site with one case per pixel type (same images), NRRD files."""
    rows = []
    for case_id, pixel in pixels.items():
        case = _write_case(folder / case_id, case_images, pixel, "nrrd", DEFAULT.sequences)
        rows.append({"case_id": case_id, "diagnosis": "HGG", "mask": str(case.mask.relative_to(folder)),
                     **{seq: str(p.relative_to(folder)) for seq, p in case.images.items()}})
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case_id", "diagnosis", *DEFAULT.sequences, "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_features_cached_from_float32_casts_are_not_reused_for_integer_images(case_images, tmp_path):
    """Entries written before radfed stopped casting (no pixel-type stamp) serve only float32-stored cases."""
    folder = _site(tmp_path / "site", case_images, {"int": "int16", "float": "float32"})
    first, summary = extract_site(load_site(folder, DEFAULT.sequences), DEFAULT)
    assert summary.extracted == 2 and first.case_ids == ["int", "float"]
    # make every entry look like the old code's: no stamps, and features the old code would not give now
    entries = sorted((folder / ".radfed" / "cache").rglob("*.json"))
    assert len(entries) == 2
    for path in entries:
        entry = json.loads(path.read_text())
        old = {k: v for k, v in entry.items() if k not in ("pixel_types", "input_checks")}
        old["features"] = {k: v * 1.01 for k, v in entry["features"].items()}
        path.write_text(json.dumps(old))

    again, summary = extract_site(load_site(folder, DEFAULT.sequences), DEFAULT)
    assert (summary.extracted, summary.cached) == (1, 1)
    np.testing.assert_array_equal(again.values[0], first.values[0])  # int16: extracted again
    np.testing.assert_array_equal(again.values[1], first.values[1] * 1.01)  # float32: the old cast did nothing
    log = (folder / ".radfed" / "extraction.log").read_text()
    assert "cast to float32" in log
    _, summary = extract_site(load_site(folder, DEFAULT.sequences), DEFAULT)
    assert (summary.extracted, summary.cached) == (0, 2)  # both stamped now
