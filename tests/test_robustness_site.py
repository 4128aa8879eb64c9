"""The robustness filter at a site: perturbed copies are deterministic (profile seed + case content, no site
secret), keep the stored pixel type, are cached per case and reused, and the sums sent match common.icc."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

from client.extract import extract_site
from client.perturb import draw_seed, perturb_case
from client.robustness import perturbed_cache_file, perturbed_features
from client.site import load_site
from common.profile import PROFILE_DIR, Perturbation, profile_from_dict


def small_profile(seed: int = 7, perturbations: list[dict] | None = None):
    doc = yaml.safe_load((PROFILE_DIR / "default.yaml").read_text(encoding="utf-8"))
    doc["robustness"] = {"perturbations": perturbations or [{"kind": "noise", "sigma": 0.1},
                                                            {"kind": "mask", "erode": 1}], "repeats": 1, "seed": seed}
    return profile_from_dict(doc, source="test")


def _site(tiny_site_root: Path, tmp_path: Path):
    src = next(p for p in tiny_site_root.iterdir() if (p / "manifest.csv").exists())
    dst = tmp_path / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".radfed"))
    return dst


def test_perturbed_features_are_deterministic_cached_and_reused(tiny_site_root, tmp_path):
    profile = small_profile()
    site_dir = _site(tiny_site_root, tmp_path)
    site = load_site(site_dir, profile.sequences)
    table, _ = extract_site(site, profile)
    ids = table.case_ids[:2]
    first = perturbed_features(site, profile, ids)
    assert set(first) == set(ids) and all(len(c) == 2 for c in first.values())
    noise, eroded = first[ids[0]]
    original = dict(zip(table.names, table.values[0], strict=True))
    # every feature measured in each copy, and the copies really differ from the original
    assert set(noise) == set(original) == set(eroded)
    assert noise["t1c/enhancing/original_firstorder_Mean"] != original["t1c/enhancing/original_firstorder_Mean"]
    assert noise["shape/enhancing/original_shape_VoxelVolume"] == original["shape/enhancing/original_shape_VoxelVolume"]
    assert eroded["shape/edema/original_shape_VoxelVolume"] < original["shape/edema/original_shape_VoxelVolume"]

    # cached: an entry per case; the next call reads it (a value planted in the entry comes back)
    path = perturbed_cache_file(site, profile, ids[0])
    entry = json.loads(path.read_text(encoding="utf-8"))
    assert entry["profile_sha256"] == profile.sha256 and len(entry["copies"]) == 2
    entry["copies"][0]["t1c/enhancing/original_firstorder_Mean"] = 12345.0
    path.write_text(json.dumps(entry), encoding="utf-8")
    assert perturbed_features(site, profile, ids)[ids[0]][0]["t1c/enhancing/original_firstorder_Mean"] == 12345.0

    # deterministic: extracted again from scratch (another folder, no cache), bit for bit the same
    again_dir = _site(tiny_site_root, tmp_path / "again")
    again = perturbed_features(load_site(again_dir, profile.sequences), profile, ids)
    assert again[ids[1]] == first[ids[1]]

    # another seed is another profile (hash) and other noise; the entry made under the first is not reused
    other = small_profile(seed=8)
    assert other.sha256 != profile.sha256
    moved = perturbed_features(load_site(again_dir, other.sequences), other, ids[1:])[ids[1]]
    mean = "t1c/enhancing/original_firstorder_Mean"
    assert moved[0][mean] != first[ids[1]][0][mean]
    assert moved[1] == first[ids[1]][1]  # the erosion draws nothing at random


def test_perturbations_keep_pixel_type_and_geometry():
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(0, 800, size=(12, 24, 24)).astype(np.int16))
    image.SetSpacing((1.0, 1.0, 3.0))
    mask_arr = np.zeros((12, 24, 24), dtype=np.uint8)
    mask_arr[3:9, 6:18, 6:18] = 2
    mask_arr[5:7, 10:14, 10:14] = 1
    mask = sitk.GetImageFromArray(mask_arr)
    mask.CopyInformation(image)
    inputs = {"t1c": "a" * 64, "mask": "b" * 64}
    for kind, amount in (("noise", 0.1), ("translate", 1.0), ("rotate", 10.0), ("dilate", 1), ("erode", 1)):
        seed = draw_seed(3, inputs, 0)
        volumes, moved_mask = perturb_case({"t1c": image}, mask, [1, 2], Perturbation(kind, float(amount)), seed)
        out = volumes["t1c"]
        assert out.GetPixelID() == image.GetPixelID() and out.GetSize() == image.GetSize()
        assert out.GetSpacing() == image.GetSpacing() and moved_mask.GetSize() == mask.GetSize()
        again, again_mask = perturb_case({"t1c": image}, mask, [1, 2], Perturbation(kind, float(amount)), seed)
        assert np.array_equal(sitk.GetArrayFromImage(again["t1c"]), sitk.GetArrayFromImage(out))
        assert np.array_equal(sitk.GetArrayFromImage(again_mask), sitk.GetArrayFromImage(moved_mask))
    # erosion on 3 mm slices with 1 mm pixels: in-plane only (the slab thickness is not stripped)
    _, eroded = perturb_case({"t1c": image}, mask, [1, 2], Perturbation("erode", 1.0), 0)
    eroded_arr = sitk.GetArrayFromImage(eroded)
    assert np.any(eroded_arr[3] == 2) and not np.any(eroded_arr[3, 6, :] == 2)
    assert draw_seed(3, inputs, 0) != draw_seed(3, inputs, 1) != draw_seed(4, inputs, 1)


def test_site_extract_perturbed_fills_the_cache_a_run_reads(tiny_site_root, tmp_path):
    """`radfed site extract --perturbed`: every usable case's copies go to the cache once (a run then reads them)."""
    import contextlib
    import io

    from radfed.cli import main as radfed_main

    site_dir = _site(tiny_site_root, tmp_path)
    lines = (site_dir / "manifest.csv").read_text(encoding="utf-8").splitlines()
    (site_dir / "manifest.csv").write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")  # header + 3 cases
    doc = yaml.safe_load((PROFILE_DIR / "default.yaml").read_text(encoding="utf-8"))
    doc["robustness"] = {"perturbations": [{"kind": "mask", "dilate": 1}], "repeats": 1, "seed": 1}
    profile_path = tmp_path / "one-copy.yaml"
    profile_path.write_text(yaml.safe_dump(doc), encoding="utf-8")

    def extract() -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = radfed_main(["site", "extract", "--site", str(site_dir), "--profile", str(profile_path),
                                "--perturbed", "--json"])
        assert code == 0
        return json.loads(out.getvalue())

    first, again = extract(), extract()
    assert first["usable_cases"] == 3
    assert first["perturbed"]["extracted"] == 3 and first["perturbed"]["copies_per_case"] == 1
    assert again["perturbed"] == {**again["perturbed"], "extracted": 0, "cached": 3}
    profile = profile_from_dict(doc)
    site = load_site(site_dir, profile.sequences)
    assert all(perturbed_cache_file(site, profile, c.case_id).exists() for c in site.cases)


def test_site_reply_is_the_icc_sums_of_its_training_cases_and_names_unmeasured_features(tiny_site_root, tmp_path):
    from client.robustness import robustness_reply
    from client.steps import load_site_data
    from common import icc
    from radfed.launch import app_run_config

    site_dir = _site(tiny_site_root, tmp_path)
    doc = yaml.safe_load((PROFILE_DIR / "default.yaml").read_text(encoding="utf-8"))
    doc["robustness"] = {"perturbations": [{"kind": "noise", "sigma": 0.1}], "repeats": 2, "seed": 3}
    profile_path = tmp_path / "noise.yaml"
    profile_path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    data = load_site_data(site_dir, app_run_config({"profile": str(profile_path), "min-cases-per-class": 5}))
    names = data.table.names[:40]
    train = [c for c, held in zip(data.table.case_ids, data.held_out, strict=True) if not held]
    copies = perturbed_features(data.site, data.profile, train)
    # one copy of one training case lacks a feature (as when pyradiomics cannot extract a region in a copy)
    path = perturbed_cache_file(data.site, data.profile, train[0])
    entry = json.loads(path.read_text(encoding="utf-8"))
    del entry["copies"][1][names[3]]
    path.write_text(json.dumps(entry), encoding="utf-8")

    arrays, n = robustness_reply(data, names)
    assert n == len(train) and set(arrays) == {"ssb", "ssw", "unmeasured"}
    assert arrays["unmeasured"].tolist() == [1.0 if i == 3 else 0.0 for i in range(len(names))]
    assert arrays["ssb"][3] == arrays["ssw"][3] == 0.0
    x = np.array([[data.table.values[data.table.case_ids.index(c)][[data.table.names.index(n) for n in names]],
                   *[[copy[n] for n in names] for copy in copies[c]]] for c in train])
    expected = icc.site_icc_sums(x)
    keep = np.arange(len(names)) != 3
    np.testing.assert_allclose(arrays["ssb"][keep], expected.ssb[keep], rtol=1e-12)
    np.testing.assert_allclose(arrays["ssw"][keep], expected.ssw[keep], rtol=1e-12)
