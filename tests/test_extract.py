"""Real pyradiomics extraction at a site: features, cache, and bad inputs named per case."""

import csv
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from client.extract import extract_site
from client.site import SiteError, load_site
from common.profile import load_profile
from radfed import synth

PROFILE = load_profile("default")


def _copy_site(tiny_site_root, tmp_path, n_cases=None):
    src = next(p for p in tiny_site_root.iterdir() if (p / "manifest.csv").exists())
    dst = tmp_path / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".radfed"))
    if n_cases is not None:
        rows = _rows(dst)[:n_cases]
        _write_rows(dst, rows)
    return dst


def _rows(site):
    with (site / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(site, rows):
    with (site / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(synth.MANIFEST_HEADER))
        writer.writeheader()
        writer.writerows(rows)


def test_features_per_sequence_and_region_and_cache(tiny_site_root, tmp_path):
    site_dir = _copy_site(tiny_site_root, tmp_path, n_cases=3)
    site = load_site(site_dir, PROFILE.sequences)
    table, summary = extract_site(site, PROFILE)
    assert summary.extracted == 3 and summary.cached == 0 and not table.problems
    # 3 sequences x 3 regions x 91 intensity/texture features (firstorder 18, glcm 22, glrlm 16, glszm 16,
    # gldm 14, ngtdm 5) + 3 regions x 14 shape features
    assert table.values.shape == (3, 3 * 3 * 91 + 3 * 14)
    assert np.isfinite(table.values).all()
    assert "t1c/enhancing/original_glcm_Contrast" in table.names
    assert "shape/edema/original_shape_Sphericity" in table.names
    assert not any(n.startswith("adc/") and "_shape_" in n for n in table.names)
    # texture really comes from each sequence: the same feature differs between sequences
    assert not np.allclose(table.columns(["t1c/edema/original_firstorder_Mean"]),
                           table.columns(["flair/edema/original_firstorder_Mean"]))

    again, summary2 = extract_site(load_site(site_dir, PROFILE.sequences), PROFILE)
    assert summary2.extracted == 0 and summary2.cached == 3
    np.testing.assert_array_equal(again.values, table.values)

    # change one mask: only that case is extracted again
    mask_path = site_dir / _rows(site_dir)[1]["mask"]
    mask = sitk.ReadImage(str(mask_path))
    arr = sitk.GetArrayFromImage(mask)
    edema = np.argwhere(arr == 3)[:10]
    arr[tuple(edema.T)] = 0  # trim ten edema voxels
    edited = sitk.GetImageFromArray(arr)
    edited.CopyInformation(mask)
    sitk.WriteImage(edited, str(mask_path))
    _, summary3 = extract_site(load_site(site_dir, PROFILE.sequences), PROFILE)
    assert (summary3.extracted, summary3.cached) == (1, 2)


def _break(site_dir, rows, index, how):
    row = rows[index]
    if how == "missing-file":
        (site_dir / row["flair"]).unlink()
    elif how == "nan-voxels":
        # NRRD, because SimpleITK's NIfTI writer does not keep NaN (it reads back as 0)
        img = sitk.ReadImage(str(site_dir / row["adc"]))
        arr = sitk.GetArrayFromImage(img)
        arr[arr.shape[0] // 2, 3, 3] = np.nan
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        row["adc"] = row["adc"].replace(".nii.gz", ".nrrd")
        sitk.WriteImage(out, str(site_dir / row["adc"]))
    elif how == "shifted-mask":
        mask = sitk.ReadImage(str(site_dir / row["mask"]))
        mask.SetOrigin(tuple(o + 4.0 for o in mask.GetOrigin()))
        sitk.WriteImage(mask, str(site_dir / row["mask"]))
    elif how in ("empty-mask", "wrong-label"):
        mask = sitk.ReadImage(str(site_dir / row["mask"]))
        arr = sitk.GetArrayFromImage(mask)
        if how == "empty-mask":
            arr[:] = 0
        else:
            arr[arr == 2] = 7
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(mask)
        sitk.WriteImage(out, str(site_dir / row["mask"]))
    elif how == "not-an-image":
        (site_dir / row["t1c"]).write_bytes(b"this is not a NIfTI file")


BAD = {
    "missing-file": ("is missing", "restore the file"),
    "nan-voxels": ("adc has 1 NaN/Inf voxel", "replace the non-finite voxels"),
    "shifted-mask": ("origin", "co-register"),
    "empty-mask": ("mask is empty", "segment the lesion"),
    "wrong-label": ("label(s) [7]", "relabel the mask"),
    "not-an-image": ("cannot be read", "re-export"),
}


def test_each_bad_input_is_named_and_the_rest_survive(tiny_site_root, tmp_path):
    site_dir = _copy_site(tiny_site_root, tmp_path)
    rows = _rows(site_dir)
    for index, how in enumerate(BAD):
        _break(site_dir, rows, index, how)
    # manifest-level problems: a duplicate id and an unknown diagnosis
    rows.append(dict(rows[-1]))
    rows.append({**rows[-2], "case_id": "x-999", "diagnosis": "meningioma"})
    _write_rows(site_dir, rows)

    table, summary = extract_site(load_site(site_dir, PROFILE.sequences), PROFILE)
    problems = {p.case_id: p for p in table.problems}
    for index, (how, (reason, fix)) in enumerate(BAD.items()):
        problem = problems[rows[index]["case_id"]]
        assert reason in problem.reason, how
        assert fix in problem.fix, how
    repeated = problems[f"{rows[-2]['case_id']} (again)"]  # the repeated row, named apart from the usable one
    assert repeated.kind == "duplicate-id" and "listed again" in repeated.reason
    assert "unknown diagnosis 'meningioma'" in problems["x-999"].reason
    assert len(table.case_ids) == 24 - len(BAD)  # every other case survived
    assert summary.failed == len(BAD) + 2
    report = (site_dir / ".radfed" / "errors.json").read_text()
    assert rows[0]["case_id"] in report and "is missing" in report

    # failures are cached like features: a re-run retries nothing and reports the same problems
    again, summary2 = extract_site(load_site(site_dir, PROFILE.sequences), PROFILE)
    assert summary2.extracted == 0 and summary2.cached == 24  # 18 usable + 6 failed, all from the cache
    assert {p.case_id: p.reason for p in again.problems} == {p.case_id: p.reason for p in table.problems}
    # restoring the missing file makes that case extract again, and only that case
    shutil.copy(site_dir / rows[1]["flair"], site_dir / rows[0]["flair"])
    third, summary3 = extract_site(load_site(site_dir, PROFILE.sequences), PROFILE)
    assert summary3.extracted == 1 and rows[0]["case_id"] in third.case_ids


def test_site_level_errors_name_the_fix(tmp_path):
    with pytest.raises(SiteError, match="does not exist"):
        load_site(tmp_path / "nowhere", PROFILE.sequences)
    (tmp_path / "manifest.csv").write_text("case_id,diagnosis,t1c\n")
    with pytest.raises(SiteError, match=r"lacks column\(s\) \['flair', 'adc', 'mask'\]"):
        load_site(tmp_path, PROFILE.sequences)
    (tmp_path / "site.yaml").write_text("nmae: typo\n")
    with pytest.raises(SiteError, match="unknown key"):
        load_site(tmp_path, PROFILE.sequences)
