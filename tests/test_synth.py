"""Tests for radfed.synth: file layout, determinism, and that classes and sites differ as designed."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from radfed import phantom, synth

HEADER = ["case_id", "diagnosis", "t1c", "flair", "adc", "mask"]


def read_manifest(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def load(folder: Path, row: dict[str, str]) -> dict[str, np.ndarray]:
    return {key: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / row[key]))) for key in HEADER[2:]}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[synth.SiteSpec], list[Path]]:
    specs = synth.tiny_sites(2, 6)
    return specs, synth.make_demo(tmp_path_factory.mktemp("tiny"), specs, seed=0)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, float | str]]:
    """Simple numpy features for 3 tiny sites x 12 cases per class (written to disk and read back)."""
    folders = synth.make_demo(tmp_path_factory.mktemp("study"), synth.tiny_sites(3, 12), seed=1)
    return [case_features(folder, row) for folder in folders for row in read_manifest(folder)]


def surface_area(mask: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Area (mm^2) of exposed voxel faces; arrays are (z, y, x), spacing is (x, y, z)."""
    sx, sy, sz = spacing
    area = 0.0
    for axis, face in ((0, sx * sy), (1, sx * sz), (2, sy * sz)):
        padded = np.pad(mask.astype(np.int8), [(1, 1) if a == axis else (0, 0) for a in range(3)])
        area += np.count_nonzero(np.diff(padded, axis=axis)) * face
    return area


def case_features(folder: Path, row: dict[str, str]) -> dict[str, float | str]:
    spacing = sitk.ReadImage(str(folder / row["mask"])).GetSpacing()
    vol = load(folder, row)
    mask, t1c, flair, adc = vol["mask"], vol["t1c"], vol["flair"], vol["adc"]
    rim, core, edema = mask == 1, (mask == 1) | (mask == 2), mask == 3
    # Normal-appearing brain: unlabelled voxels clearly above the (near-zero) background.
    brain = (mask == 0) & (flair > 0.5 * np.median(flair[edema]))
    volume = core.sum() * float(np.prod(spacing))
    return {
        "site": folder.name,
        "diagnosis": row["diagnosis"],
        "edema_ratio": edema.sum() / core.sum(),
        "sphericity": np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / surface_area(core, spacing),
        "rim_cv": t1c[rim].std() / t1c[rim].mean(),
        "edema_flair_cv": flair[edema].std() / flair[edema].mean(),
        "edema_adc_rel": adc[edema].mean() / np.median(adc[brain]),
        "t1c_p75": np.percentile(t1c, 75),
        "flair_p75": np.percentile(flair, 75),
        "adc_p75": np.percentile(adc, 75),
        "background_sd": t1c[:, :3, :3].std(),
    }


# --------------------------------------------------------------------------------------------------------------
# Site specifications


def test_default_sites_are_heterogeneous() -> None:
    sites = synth.default_sites()
    assert len(sites) == 4
    assert [s.n_hgg + s.n_bm for s in sites] == [52, 38, 46, 34]
    assert len({round(s.n_hgg / (s.n_hgg + s.n_bm), 2) for s in sites}) == 4
    for s in sites:
        sx, sy, sz = s.spacing
        assert 64 <= s.size[0] <= 96 and 64 <= s.size[1] <= 96 and 24 <= s.size[2] <= 40
        assert 1.2 <= sx <= 1.6 and sx == sy and 2.5 <= sz <= 5.0
    assert len({(s.gain, s.noise, s.bias, s.spacing) for s in sites}) == 4

    small = synth.default_sites(scale=0.1)
    assert all(s.n_hgg == 6 and s.n_bm == 6 for s in small)
    assert all(a.size[0] > b.size[0] and a.spacing == b.spacing for a, b in zip(sites, small, strict=True))


def test_tiny_sites() -> None:
    sites = synth.tiny_sites(5, 3)
    assert len({s.name for s in sites}) == 5
    assert len({(s.gain, s.noise, s.spacing) for s in sites}) == 5
    assert all(s.size == (40, 40, 16) and s.n_hgg == s.n_bm == 3 for s in sites)


def test_generate_case_contract() -> None:
    spec = synth.tiny_sites(1)[0]
    case = synth.generate_case(spec, "BM", np.random.default_rng(5))
    assert set(case) == {"t1c", "flair", "adc", "mask"}
    for key, image in case.items():
        expected = sitk.sitkUInt8 if key == "mask" else sitk.sitkFloat32
        assert image.GetPixelID() == expected
        assert image.GetSize() == spec.size
        assert image.GetSpacing() == pytest.approx(spec.spacing)
        assert image.GetOrigin() == case["mask"].GetOrigin()
        assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        synth.generate_case(spec, "LGG", np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------------------
# Files on disk


def test_manifest_and_files(tiny_demo: tuple[list[synth.SiteSpec], list[Path]]) -> None:
    specs, folders = tiny_demo
    assert [f.name for f in folders] == [s.name for s in specs]
    for spec, folder in zip(specs, folders, strict=True):
        lines = (folder / "manifest.csv").read_text().splitlines()
        assert lines[0] == ",".join([*HEADER, "age", "sex"])
        rows = read_manifest(folder)
        ids = [r["case_id"] for r in rows]
        assert len(set(ids)) == len(ids) == spec.n_hgg + spec.n_bm
        assert all(i.startswith(spec.name.rsplit("-", 1)[-1] + "-") for i in ids)
        diagnoses = [r["diagnosis"] for r in rows]
        assert diagnoses.count("HGG") == spec.n_hgg and diagnoses.count("BM") == spec.n_bm
        assert diagnoses != sorted(diagnoses)  # interleaved, not grouped by class
        # ComBat covariates: plausible ages and both sexes over the demo's sites
        assert all(18 <= int(r["age"]) <= 90 and r["sex"] in ("F", "M") for r in rows)
        for row in rows:
            assert row["mask"].startswith("masks/") and row["t1c"].startswith("images/")
            images = {key: sitk.ReadImage(str(folder / row[key])) for key in HEADER[2:]}
            for image in images.values():
                assert image.GetSize() == spec.size
                assert image.GetSpacing() == pytest.approx(spec.spacing, abs=1e-4)
                assert image.GetOrigin() == pytest.approx(images["mask"].GetOrigin(), abs=1e-4)
                assert image.GetDirection() == pytest.approx(images["mask"].GetDirection())
            assert images["t1c"].GetPixelID() == sitk.sitkFloat32
            mask = sitk.GetArrayFromImage(images["mask"])
            labels, counts = np.unique(mask, return_counts=True)
            assert labels.tolist() == [0, 1, 2, 3]
            assert counts[1:].min() >= phantom.MIN_LABEL_VOXELS
    stamp = json.loads((folders[0].parent / "demo.json").read_text())
    assert stamp["seed"] == 0 and [s["name"] for s in stamp["sites"]] == [s.name for s in specs]


def test_intensities_are_plausible(tiny_demo: tuple[list[synth.SiteSpec], list[Path]]) -> None:
    _, folders = tiny_demo
    row = read_manifest(folders[0])[0]
    vol = load(folders[0], row)
    mask, t1c, flair, adc = vol["mask"], vol["t1c"], vol["flair"], vol["adc"]
    brain = (mask == 0) & (flair > 0.5 * np.median(flair[mask == 3]))
    background = t1c[:, :3, :3]
    assert background.mean() < 0.15 * np.median(t1c[brain])  # background ~0
    med = {lab: {k: np.median(v[mask == lab]) for k, v in vol.items() if k != "mask"} for lab in (1, 2, 3)}
    assert med[1]["t1c"] > np.median(t1c[brain]) > med[2]["t1c"]  # enhancing rim bright, necrosis dark
    assert med[3]["t1c"] < np.median(t1c[brain])  # edema hypointense on T1c
    assert med[3]["flair"] > med[2]["flair"] > np.median(flair[brain])  # edema brightest on FLAIR
    assert med[3]["adc"] > med[1]["adc"] and med[2]["adc"] > med[1]["adc"]
    assert 500 < np.median(adc[brain]) < 1200 and med[2]["adc"] < 3000


def test_make_demo_is_deterministic(tmp_path: Path) -> None:
    specs = synth.tiny_sites(2, 6)
    first = synth.make_demo(tmp_path / "one", specs, seed=7)
    second = synth.make_demo(tmp_path / "two", specs, seed=7)
    other = synth.make_demo(tmp_path / "three", specs, seed=8)
    for f1, f2, f3 in zip(first, second, other, strict=True):
        assert (f1 / "manifest.csv").read_bytes() == (f2 / "manifest.csv").read_bytes()
        rows = read_manifest(f1)
        for row in rows[:2]:
            a, b = load(f1, row), load(f2, row)
            for key in HEADER[2:]:
                np.testing.assert_array_equal(a[key], b[key])
        c = load(f3, read_manifest(f3)[0])
        assert not np.array_equal(load(f1, rows[0])["t1c"], c["t1c"])
    # Sites get different seeds: their first cases must not be copies of each other.
    assert not np.array_equal(
        load(first[0], read_manifest(first[0])[0])["mask"], load(first[1], read_manifest(first[1])[0])["mask"]
    )


def test_make_demo_reuses_matching_stamp(tmp_path: Path) -> None:
    specs = synth.tiny_sites(1, 6)
    (folder,) = synth.make_demo(tmp_path, specs, seed=3)
    manifest = folder / "manifest.csv"
    before = manifest.stat().st_mtime_ns
    assert synth.make_demo(tmp_path, specs, seed=3) == [folder]
    assert manifest.stat().st_mtime_ns == before  # reused, not rewritten
    content = manifest.read_bytes()
    synth.make_demo(tmp_path, specs, seed=4)  # different seed: regenerated
    assert manifest.read_bytes() != content
    assert json.loads((tmp_path / "demo.json").read_text())["seed"] == 4


# --------------------------------------------------------------------------------------------------------------
# The data carry the intended signal


def group(study: list[dict[str, float | str]], key: str) -> tuple[np.ndarray, np.ndarray]:
    hgg = np.array([c[key] for c in study if c["diagnosis"] == "HGG"], dtype=float)
    bm = np.array([c[key] for c in study if c["diagnosis"] == "BM"], dtype=float)
    return hgg, bm


@pytest.mark.parametrize(
    ("feature", "hgg_higher"),
    [
        ("edema_ratio", False),  # metastases: more edema relative to tumour
        ("sphericity", False),  # metastases: rounder
        ("rim_cv", True),  # glioma: heterogeneous enhancement
        ("edema_flair_cv", True),  # glioma: textured, infiltrated edema
        ("edema_adc_rel", False),  # metastases: pure vasogenic edema, higher ADC
    ],
)
def test_classes_differ_but_overlap(study: list[dict[str, float | str]], feature: str, hgg_higher: bool) -> None:
    hgg, bm = group(study, feature)
    assert (hgg.mean() > bm.mean()) == hgg_higher, (feature, hgg.mean(), bm.mean())
    # Overlapping distributions, not a trivially separable toy.
    assert max(hgg.min(), bm.min()) < min(hgg.max(), bm.max())
    wins = (hgg[:, None] > bm[None, :]).mean()  # AUC of "HGG higher"
    auc = wins if hgg_higher else 1.0 - wins
    assert 0.55 < auc < 0.95, (feature, auc)


def test_sites_are_distinguishable(study: list[dict[str, float | str]]) -> None:
    keys = ["t1c_p75", "flair_p75", "adc_p75", "background_sd"]
    x = np.array([[c[k] for k in keys] for c in study], dtype=float)
    sites = np.array([c["site"] for c in study])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    accuracy = cross_val_score(model, x, sites, cv=StratifiedKFold(4, shuffle=True, random_state=0)).mean()
    assert accuracy > 0.85  # chance is 1/3
