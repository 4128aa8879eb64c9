"""`radfed site check` and site.yaml: every bad input named with case id and fix, the rest survive (no pyradiomics)."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.site import SiteError, load_site, load_site_config, site_settings
from client.sitecheck import check_site
from common.profile import load_profile
from radfed import synth
from radfed.cli import main

PROFILE = load_profile("default")
ROOT = Path(__file__).resolve().parent.parent


def _copy_site(tiny_site_root: Path, tmp_path: Path) -> Path:
    src = next(p for p in tiny_site_root.iterdir() if (p / "manifest.csv").exists())
    dst = tmp_path / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".radfed"))
    return dst


def _rows(site: Path) -> list[dict[str, str]]:
    with (site / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(site: Path, rows: list[dict[str, str]]) -> None:
    with (site / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(synth.MANIFEST_HEADER))
        writer.writeheader()
        writer.writerows(rows)


def _edit(path: Path, change_array=None, change_image=None, out: Path | None = None) -> None:
    """Rewrite a volume with its voxels and/or geometry changed."""
    image = sitk.ReadImage(str(path))
    if change_array is not None:
        arr = sitk.GetArrayFromImage(image)
        arr = change_array(arr)
        new = sitk.GetImageFromArray(arr)
        new.CopyInformation(image)
        image = new
    if change_image is not None:
        image = change_image(image)
    sitk.WriteImage(image, str(out or path))


def _shift(image: sitk.Image, delta: float) -> sitk.Image:
    image.SetOrigin(tuple(o + delta for o in image.GetOrigin()))
    return image


def _respace(image: sitk.Image) -> sitk.Image:
    image.SetSpacing(tuple(s * 1.25 for s in image.GetSpacing()))
    return _shift(image, 2.0)


def _keep_5_necrosis_voxels(arr: np.ndarray) -> np.ndarray:
    idx = np.argwhere(arr == 2)[5:]
    arr[tuple(idx.T)] = 1
    return arr


def _set_label(arr: np.ndarray, old: int, new: int) -> np.ndarray:
    arr[arr == old] = new
    return arr


def _nan_voxel(arr: np.ndarray) -> np.ndarray:
    arr[arr.shape[0] // 2, 3, 3] = np.nan
    return arr


# how to break one case -> (substring of the reason, substring of the fix, kind)
BAD = {
    "missing-file": ("flair file", "restore the file", "missing-file"),
    "unreadable": ("cannot be read", "re-export", "unreadable"),
    "2d-image": ("adc is 2D", "3D volume", "not-3d"),
    "vector-image": ("3 components per voxel", "scalar", "not-scalar"),
    "nan-voxels": ("adc has 1 NaN/Inf voxel", "replace the non-finite voxels", "non-finite"),
    "shifted-mask": ("mask and t1c are on different grids: mask origin", "co-register", "mask-geometry"),
    "flair-respaced": ("sequences flair and t1c are not co-registered", "co-register flair to t1c",
                       "not-co-registered"),
    "adc-one-slice-less": ("sequences adc and t1c are not co-registered: adc vs t1c size (40, 40, 15) vs "
                           "(40, 40, 16)", "co-register adc to t1c", "not-co-registered"),
    "empty-mask": ("mask is empty", "segment the lesion", "empty-mask"),
    "wrong-label": ("label(s) [7] outside the profile's regions", "relabel the mask", "unknown-label"),
    "small-region": ("region necrosis (label 2) has 5 voxel(s), fewer than 20", "segmentation of necrosis",
                     "small-region"),
}


def _break(site: Path, row: dict[str, str], how: str) -> None:
    path = {k: site / row[k] for k in ("t1c", "flair", "adc", "mask")}
    if how == "missing-file":
        path["flair"].unlink()
    elif how == "unreadable":
        path["t1c"].write_bytes(b"this is not a NIfTI file")
    elif how == "2d-image":
        sitk.WriteImage(sitk.ReadImage(str(path["adc"]))[:, :, 5], str(path["adc"]))
    elif how == "vector-image":
        t1c = sitk.ReadImage(str(path["t1c"]))
        sitk.WriteImage(sitk.Compose(t1c, t1c, t1c), str(path["t1c"]))
    elif how == "nan-voxels":  # NRRD: SimpleITK's NIfTI writer does not keep NaN
        row["adc"] = row["adc"].replace(".nii.gz", ".nrrd")
        _edit(path["adc"], change_array=_nan_voxel, out=site / row["adc"])
    elif how == "shifted-mask":
        _edit(path["mask"], change_image=lambda im: _shift(im, 4.0))
    elif how == "flair-respaced":
        _edit(path["flair"], change_image=_respace)
    elif how == "adc-one-slice-less":
        sitk.WriteImage(sitk.ReadImage(str(path["adc"]))[:, :, 1:], str(path["adc"]))
    elif how == "empty-mask":
        _edit(path["mask"], change_array=lambda a: a * 0)
    elif how == "wrong-label":
        _edit(path["mask"], change_array=lambda a: _set_label(a, 2, 7))
    elif how == "small-region":
        _edit(path["mask"], change_array=_keep_5_necrosis_voxels)
    else:
        raise AssertionError(how)


def test_every_bad_input_is_named_with_its_fix_and_the_rest_survive(tiny_site_root, tmp_path):
    site_dir = _copy_site(tiny_site_root, tmp_path)
    rows = _rows(site_dir)
    for row, how in zip(rows, BAD, strict=False):
        _break(site_dir, row, how)
    # within tolerance: a 1e-5 mm origin difference between sequences is not a co-registration error
    _edit(site_dir / rows[len(BAD)]["flair"], change_image=lambda im: _shift(im, 1e-5))
    rows.append(dict(rows[-1]))  # duplicate id
    rows.append({**rows[-2], "case_id": "x-999", "diagnosis": "meningioma"})
    rows.append({**rows[-3], "case_id": ""})
    _write_rows(site_dir, rows)

    check = check_site(site_dir, min_cases_per_class=1)
    problems = {p.case_id: p for p in check.problems}
    for row, (how, (reason, fix, kind)) in zip(rows, BAD.items(), strict=False):
        problem = problems[row["case_id"]]
        assert reason in problem.reason, (how, problem.reason)
        assert fix in problem.fix, (how, problem.fix)
        assert problem.kind == kind, how
    respaced = problems[rows[list(BAD).index("flair-respaced")]["case_id"]].reason
    assert "spacing (2, 2, 5) vs (1.6, 1.6, 4)" in respaced and "origin" in respaced  # what differs, both named
    repeated = problems[f"{rows[-3]['case_id']} (again)"]  # its own row: the first row of that id stays usable
    assert repeated.kind == "duplicate-id" and "listed again" in repeated.reason
    assert "first row is used" in repeated.reason
    assert "unknown diagnosis 'meningioma'" in problems["x-999"].reason and "HGG" in problems["x-999"].fix
    assert problems["<line 28>"].kind == "empty-id"
    # every other case survived, the nearly-aligned one included
    assert [c.case_id for c in check.usable] == [r["case_id"] for r in rows[len(BAD):24]]
    # 13 usable cases cannot fill two release blocks of 5 in each class (the blocks keep the site's own k, 5,
    # whatever min_cases_per_class the check is asked for)
    assert check.status == "cannot-take-part" and "two release blocks" in str(check.eligibility)
    assert check.problems_by_kind["not-co-registered"] == 2
    # 24 cases + the repeated row + the unknown-diagnosis row + the row without id: usable + problem rows add up
    assert check.n_cases == 27 == len(check.usable) + len({p.case_id for p in check.problems})


def test_cli_warns_with_counts_and_writes_the_json_report(tiny_site_root, tmp_path, capsys):
    site_dir = _copy_site(tiny_site_root, tmp_path)
    rows = _rows(site_dir)
    _break(site_dir, rows[0], "missing-file")
    _break(site_dir, rows[1], "shifted-mask")
    assert main(["site", "check", "--site", str(site_dir)]) == 0
    out = capsys.readouterr().out
    assert rows[0]["case_id"] in out and rows[1]["case_id"] in out and "can take part with 22" in out

    report = json.loads((site_dir / ".radfed" / "check.json").read_text())
    assert report["status"] == "warnings" and report["exit_code"] == 0
    hgg = sum(r["diagnosis"] == "HGG" for r in rows[2:])
    assert report["counts"] == {"cases": 24, "usable": 22, "by_class": {"HGG": hgg, "BM": 22 - hgg},
                                "problem_cases": 2, "problems_by_kind": {"mask-geometry": 1, "missing-file": 1}}
    assert {p["case_id"]: p["kind"] for p in report["problems"]} == {rows[0]["case_id"]: "missing-file",
                                                                     rows[1]["case_id"]: "mask-geometry"}
    assert all(p["fix"] for p in report["problems"])
    assert report["profile"]["sha256"] == PROFILE.sha256 and len(report["usable_cases"]) == 22


def test_cli_fails_when_nothing_is_usable(tiny_site_root, tmp_path, capsys):
    site_dir = _copy_site(tiny_site_root, tmp_path)
    rows = _rows(site_dir)[:3]
    for row in rows:
        (site_dir / row["mask"]).unlink()
    _write_rows(site_dir, rows)
    out_json = tmp_path / "elsewhere" / "report.json"
    assert main(["site", "check", "--site", str(site_dir), "--output", str(out_json)]) == 1
    assert "has no usable case (3 with problems): it cannot take part" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert report["status"] == "nothing-usable" and report["counts"]["usable"] == 0
    assert report["counts"]["problems_by_kind"] == {"missing-file": 3}


def test_too_few_cases_per_class_refuses_and_says_why(tiny_site_root, tmp_path, capsys):
    site_dir = _copy_site(tiny_site_root, tmp_path)
    rows = _rows(site_dir)
    hgg = [r for r in rows if r["diagnosis"] == "HGG"]
    _write_rows(site_dir, [r for r in rows if r["diagnosis"] == "BM"] + hgg[:4])
    assert main(["site", "check", "--site", str(site_dir)]) == 3
    out = capsys.readouterr().out
    assert "cannot take part: 4 HGG and 12 BM cases; each class needs at least 10 (two release blocks" \
        in out.replace("\n", " ")
    assert json.loads((site_dir / ".radfed" / "check.json").read_text())["status"] == "cannot-take-part"

    # the site's own site.yaml can raise k (never lower it): 12 + 12 cases are then too few
    _write_rows(site_dir, rows)
    (site_dir / "site.yaml").write_text("name: strict-hospital\nmin_cases_per_class: 10\n")
    check = check_site(site_dir)
    assert check.k == 10 and check.exit_code == 3
    assert check.verdict.startswith(
        "site strict-hospital cannot take part: 12 HGG and 12 BM cases; each class needs at least 20")
    (site_dir / "site.yaml").write_text("min_cases_per_class: 2\n")
    assert check_site(site_dir).k == 5


def test_site_check_does_not_run_pyradiomics(tiny_site_root, tmp_path):
    site_dir = _copy_site(tiny_site_root, tmp_path)
    code = ("import sys; from radfed.cli import main; rc = main(['site', 'check', '--site', sys.argv[1]]); "
            "assert 'radiomics' not in sys.modules, 'pyradiomics was imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, str(site_dir)], cwd=ROOT, capture_output=True,
                            encoding="utf-8", errors="replace", timeout=60)
    assert result.returncode == 0, result.stderr
    assert not (site_dir / ".radfed" / "cache").exists()


# --------------------------------------------------------------------------------------------------------------
# site.yaml


def _yaml_error(tmp_path: Path, text: str) -> str:
    (tmp_path / "site.yaml").write_text(text)
    with pytest.raises(SiteError) as info:
        load_site_config(tmp_path)
    return str(info.value)


def test_site_config_errors_name_the_field_and_the_fix(tmp_path):
    message = _yaml_error(tmp_path, "nmae: hospital-a\n")
    assert "unknown key 'nmae': did you mean 'name'?" in message and "remove it or fix its spelling" in message
    message = _yaml_error(tmp_path, "min_cases_per_class: five\n")
    assert "'min_cases_per_class' must be a whole number (got 'five'): write it like 'min_cases_per_class: 5'" \
        in message
    message = _yaml_error(tmp_path, "source: pacs\n")
    assert "'source' is 'pacs', which is not one of manifest, brats, ucsf-bmsr, dicom" in message
    message = _yaml_error(tmp_path, "label_map: {three: enhancing, 1: 2}\n")
    assert "'label_map.three' is a source label that is not a whole number" in message
    assert "'label_map.1' must be text (got 2)" in message
    # several errors: one sentence per field, in one message
    message = _yaml_error(tmp_path, "source: pacs\nmin_cases_per_class: 0\nlabelmap: {}\n")
    assert message.count("'source'") == 1 and "'min_cases_per_class' must be at least 1 (got 0)" \
        in message and "did you mean 'label_map'?" in message
    assert "must be a mapping" in _yaml_error(tmp_path, "- just\n- a list\n")
    assert "not valid YAML" in _yaml_error(tmp_path, "name: [unclosed\n")


def test_site_config_defaults_and_the_old_minimal_keys(tiny_site_root, tmp_path):
    site_dir = _copy_site(tiny_site_root, tmp_path)
    config = load_site_config(site_dir)  # no site.yaml: a manifest site named after its folder
    assert config.source == "manifest" and config.label_map is None
    site = load_site(site_dir, PROFILE.sequences)
    assert site.name == site_dir.name and site.work_dir == site_dir.resolve() / ".radfed" and len(site.cases) == 24

    (site_dir / "site.yaml").write_text("name: hospital-a\nprofile: default\nmin_cases_per_class: 6\n")
    settings = site_settings(site_dir)
    assert settings["name"] == "hospital-a" and settings["profile"] == "default"
    assert settings["min_cases_per_class"] == 6 and settings["source"] == "manifest"

    # data_root and output_dir (relative to the site folder): images elsewhere, outputs elsewhere
    data = tmp_path / "pacs-export"
    data.mkdir()
    shutil.move(site_dir / "images", data / "images")
    shutil.move(site_dir / "masks", data / "masks")
    (site_dir / "site.yaml").write_text("name: hospital-a\ndata_root: ../pacs-export\noutput_dir: ../radfed-out\n")
    check = check_site(site_dir)
    assert len(check.usable) == 24 and check.exit_code == 0
    assert check.site.work_dir == (tmp_path / "radfed-out").resolve()
    assert check.site.cases[0].images["t1c"].is_relative_to(data.resolve())


def test_label_map_names_unknown_regions_as_a_site_error(tiny_site_root, tmp_path):
    site_dir = _copy_site(tiny_site_root, tmp_path)
    (site_dir / "site.yaml").write_text("label_map: {1: enhancing, 2: necrotic, 3: edema}\n")
    with pytest.raises(SiteError, match=r"names region\(s\) \['necrotic'\] that the profile does not have"):
        check_site(site_dir)
    (site_dir / "site.yaml").write_text("label_map: {1: enhancing, 3: edema}\n")
    with pytest.raises(SiteError, match=r"no source label for region\(s\) \['necrosis'\]"):
        check_site(site_dir)
