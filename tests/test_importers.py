"""Importer round trips (manifest, BraTS with a label map, DICOM series) on real files, and extraction outputs."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.checks import CaseInputError, load_case_volumes
from client.extract import extract_site
from client.site import load_site
from common.profile import load_profile
from radfed import synth
from radfed.cli import main

PROFILE = load_profile("default")
SEQS = PROFILE.sequences  # t1c, flair, adc
BRATS_2023 = {3: "enhancing", 1: "necrosis", 2: "edema"}
# synth numbering (1 enhancing, 2 necrosis, 3 edema) -> BraTS 2023 (3 ET, 1 NCR, 2 ED)
TO_BRATS = {1: 3, 2: 1, 3: 2}


def _rows(site: Path) -> list[dict[str, str]]:
    with (site / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _source_site(tiny_site_root: Path) -> Path:
    return next(p for p in tiny_site_root.iterdir() if (p / "manifest.csv").exists())


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _same_volume(a: sitk.Image, b: sitk.Image) -> None:
    np.testing.assert_array_equal(_array(a), _array(b))
    for getter in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        np.testing.assert_allclose(getter(a), getter(b), atol=1e-5)


def _write_labels(site: Path, rows: list[tuple[str, str]]) -> None:
    with (site / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("case_id", "diagnosis"), *rows])


def test_manifest_round_trip_with_nifti_and_nrrd(tiny_site_root, tmp_path):
    src = _source_site(tiny_site_root)
    site = load_site(src, SEQS)
    rows = _rows(src)
    assert [c.case_id for c in site.cases] == [r["case_id"] for r in rows] and not site.problems
    assert all(c.diagnosis == r["diagnosis"] and c.images["flair"] == src / r["flair"]
               for c, r in zip(site.cases, rows, strict=True))

    # the same case as NRRD reads back identically
    case = site.cases[0]
    nrrd = {seq: tmp_path / f"{seq}.nrrd" for seq in SEQS}
    for seq in SEQS:
        sitk.WriteImage(sitk.ReadImage(str(case.images[seq])), str(nrrd[seq]))
    sitk.WriteImage(sitk.ReadImage(str(case.mask)), str(tmp_path / "mask.nrrd"))
    ref_volumes, ref_mask = load_case_volumes(case.images, case.mask, PROFILE.regions, 20)
    volumes, mask = load_case_volumes(nrrd, tmp_path / "mask.nrrd", PROFILE.regions, 20)
    _same_volume(mask, ref_mask)
    for seq in SEQS:
        _same_volume(volumes[seq], ref_volumes[seq])


def _brats_site(tiny_site_root: Path, root: Path) -> tuple[Path, list[dict[str, str]]]:
    """A BraTS 2023-style site from the tiny site's first five cases, relabelled to BraTS numbering.

    Case 0 NIfTI, case 1 NRRD, case 2 without ADC, case 3 without a labels.csv row, case 4 with a
    stray label 4 in its mask; labels.csv also lists a case that has no folder.
    """
    src = _source_site(tiny_site_root)
    rows = _rows(src)[:5]
    data = root / "brats"
    for i, row in enumerate(rows):
        folder = data / row["case_id"]
        folder.mkdir(parents=True)
        ext = ".nrrd" if i == 1 else ".nii.gz"
        for seq, suffix in (("t1c", "t1c"), ("flair", "t2f"), ("adc", "adc")):
            if not (i == 2 and seq == "adc"):
                sitk.WriteImage(sitk.ReadImage(str(src / row[seq])), str(folder / f"{row['case_id']}-{suffix}{ext}"))
        mask = sitk.ReadImage(str(src / row["mask"]))
        arr = _array(mask)
        out = np.zeros_like(arr)
        for ours, theirs in TO_BRATS.items():
            out[arr == ours] = theirs
        if i == 4:
            out[0, 0, :3] = 4
        seg = sitk.GetImageFromArray(out)
        seg.CopyInformation(mask)
        sitk.WriteImage(seg, str(folder / f"{row['case_id']}-seg{ext}"))
    site = root / "brats-site"
    site.mkdir()
    (site / "site.yaml").write_text("name: brats-hospital\nsource: brats\ndata_root: ../brats\n"
                                    "label_map: {3: enhancing, 1: necrosis, 2: edema}\n")
    _write_labels(site, [(r["case_id"], r["diagnosis"]) for i, r in enumerate(rows) if i != 3] + [("ghost", "BM")])
    return site, rows


def test_brats_import_with_label_map(tiny_site_root, tmp_path):
    site_dir, rows = _brats_site(tiny_site_root, tmp_path)
    site = load_site(site_dir, SEQS)
    assert site.name == "brats-hospital" and site.label_map == BRATS_2023
    assert [c.case_id for c in site.cases] == [rows[i]["case_id"] for i in (0, 1, 4)]
    assert site.cases[1].images["flair"].name.endswith("-t2f.nrrd")
    problems = {p.case_id: p for p in site.problems}
    assert problems[rows[2]["case_id"]].kind == "missing-sequence"
    assert f"no file for adc ({rows[2]['case_id']}-adc.nii.gz or .nrrd)" in problems[rows[2]["case_id"]].reason
    assert "sequence_names" in problems[rows[2]["case_id"]].fix
    assert problems[rows[3]["case_id"]].kind == "no-diagnosis"
    assert f"add a row '{rows[3]['case_id']},HGG' or '{rows[3]['case_id']},BM'" in problems[rows[3]["case_id"]].fix
    assert problems["ghost"].kind == "missing-file" and "is not a folder" in problems["ghost"].reason

    # the label map is applied as the mask is read: the profile's numbering comes back exactly
    src = _source_site(tiny_site_root)
    for case, row in ((site.cases[0], rows[0]), (site.cases[1], rows[1])):
        _, mask = load_case_volumes(case.images, case.mask, PROFILE.regions, 20, site.label_map)
        np.testing.assert_array_equal(_array(mask), _array(sitk.ReadImage(str(src / row["mask"]))))
    # a raw label outside the map is named as the site's own label
    with pytest.raises(CaseInputError, match=r"raw label\(s\) \[4\] outside the site's label_map "
                                             r"\{3: enhancing, 1: necrosis, 2: edema\}") as info:
        load_case_volumes(site.cases[2].images, site.cases[2].mask, PROFILE.regions, 20, site.label_map)
    assert "label_map" in info.value.fix
    # ... and mapping it to background drops it
    load_case_volumes(site.cases[2].images, site.cases[2].mask, PROFILE.regions, 20, {**BRATS_2023, 4: "background"})


def test_brats_extraction_equals_manifest_and_keeps_provenance(tiny_site_root, tmp_path, capfd):
    site_dir, rows = _brats_site(tiny_site_root, tmp_path)
    assert main(["site", "extract", "--site", str(site_dir), "--workers", "1"]) == 0
    out, err = capfd.readouterr()
    assert "2 usable case(s), 2 extracted now" in out and not err  # pyradiomics stays out of the terminal
    work = site_dir / ".radfed"
    csv_path = work / f"features-{PROFILE.short_hash}.csv"
    with csv_path.open(newline="") as fh:
        brats = list(csv.DictReader(fh))
    sidecar = json.loads(csv_path.with_suffix(".json").read_text())
    assert sidecar["profile"]["sha256"] == PROFILE.sha256 and sidecar["pyradiomics"].startswith("v3")
    assert sidecar["case_ids"] == [r["case_id"] for r in brats] == [rows[0]["case_id"], rows[1]["case_id"]]
    assert sidecar["labels"] == [int(r["label"]) for r in brats] == [int(rows[i]["diagnosis"] == "HGG") for i in (0, 1)]
    assert sidecar["label_map"] == {"3": "enhancing", "1": "necrosis", "2": "edema"} and sidecar["created"]
    assert set(sidecar["inputs_sha256"][rows[0]["case_id"]]) == {"t1c", "flair", "adc", "mask", "label_map"}
    log = (work / "extraction.log").read_text()
    assert f"case {rows[0]['case_id']}: 861 features" in log and "raw label(s) [4]" in log

    # the same two cases through the manifest importer give the same features, to the last bit
    manifest_site = tmp_path / "manifest-site"
    shutil.copytree(_source_site(tiny_site_root), manifest_site, ignore=shutil.ignore_patterns(".radfed"))
    (manifest_site / "manifest.csv").write_text(
        ",".join(synth.MANIFEST_HEADER) + "\n"
        + "".join(",".join(r[k] for k in synth.MANIFEST_HEADER) + "\n" for r in rows[:2]))
    table, _ = extract_site(load_site(manifest_site, SEQS), PROFILE)
    names = [n for n in brats[0] if n not in ("case_id", "diagnosis", "label")]
    assert names == table.names
    np.testing.assert_array_equal(np.array([[float(r[n]) for n in names] for r in brats]), table.values)


def test_pyradiomics_warnings_go_to_the_log_file_not_the_terminal(tiny_site_root, tmp_path, capfd):
    # GLCM SumAverage makes pyradiomics warn on every call (see NOTES.md): a cheap one-sequence profile
    profile = tmp_path / "sumaverage.yaml"
    profile.write_text("radfed: {name: t, version: '1', sequences: [t1c], regions: {enhancing: 1, necrosis: 2, "
                       "edema: 3}}\nsetting: {binWidth: 25}\nimageType: {Original: {}}\n"
                       "featureClass: {glcm: [SumAverage]}\n")
    site_dir = tmp_path / "site"
    shutil.copytree(_source_site(tiny_site_root), site_dir, ignore=shutil.ignore_patterns(".radfed"))
    lines = (site_dir / "manifest.csv").read_text().splitlines()[:2]
    (site_dir / "manifest.csv").write_text("\n".join(lines) + "\n")
    (site_dir / "site.yaml").write_text(f"profile: {profile}\noutput_dir: out\n")
    assert main(["site", "extract", "--site", str(site_dir), "--workers", "1"]) == 0
    out, err = capfd.readouterr()
    assert "Sum Average" not in out + err and not err
    assert "Sum Average" in (site_dir / "out" / "extraction.log").read_text()
    assert not (site_dir / ".radfed").exists()  # output_dir is honoured for everything


# --------------------------------------------------------------------------------------------------------------
# DICOM


def write_dicom_series(image: sitk.Image, folder: Path, uid: str) -> None:
    """One .dcm per slice with the tags a series reader needs (after SimpleITK's 'Dicom Series From Array')."""
    folder.mkdir(parents=True)
    image = sitk.Cast(image, sitk.sitkInt16)  # synthetic intensities are integers well inside int16
    d = image.GetDirection()
    common = {
        "0008|0060": "MR", "0008|0008": "DERIVED\\SECONDARY", "0008|0021": "20250101", "0008|0031": "120000",
        "0020|000d": uid + ".1", "0020|000e": uid, "0008|103e": folder.name,
        "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": str(image.GetSpacing()[2]),
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        piece = image[:, :, z]
        for tag, value in common.items():
            piece.SetMetaData(tag, value)
        piece.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))))
        piece.SetMetaData("0020|0013", str(z + 1))
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(piece)


def test_dicom_series_round_trip(tiny_site_root, tmp_path, capfd):
    src = _source_site(tiny_site_root)
    rows = _rows(src)[:4]
    site_dir = tmp_path / "dicom-site"
    for i, row in enumerate(rows):
        case = site_dir / "cases" / row["case_id"]
        for j, seq in enumerate(SEQS):
            uid = f"1.2.826.0.1.3680043.9.7.{i}.{j}"
            write_dicom_series(sitk.ReadImage(str(src / row[seq])), case / seq.upper(), uid)
        mask = sitk.ReadImage(str(src / row["mask"]))
        if i == 1:
            write_dicom_series(mask, case / "mask", f"1.2.826.0.1.3680043.9.7.{i}.9")  # mask as a DICOM series
        else:
            sitk.WriteImage(mask, str(case / ("mask.nrrd" if i == 2 else "mask.nii.gz")))
    flair_slices = sorted((site_dir / "cases" / rows[3]["case_id"] / "FLAIR").iterdir())
    flair_slices[7].unlink()  # a series with a missing slice
    (site_dir / "site.yaml").write_text("source: dicom\ndata_root: cases\n")
    _write_labels(site_dir, [(r["case_id"], r["diagnosis"]) for r in rows])

    site = load_site(site_dir, SEQS)
    assert [c.case_id for c in site.cases] == [r["case_id"] for r in rows] and not site.problems
    assert site.cases[0].images["flair"].is_dir() and site.cases[1].mask.is_dir()
    for case, row in zip(site.cases[:3], rows, strict=False):
        volumes, mask = load_case_volumes(case.images, case.mask, PROFILE.regions, 20)
        _same_volume(mask, sitk.ReadImage(str(src / row["mask"])))
        for seq in SEQS:
            _same_volume(volumes[seq], sitk.ReadImage(str(src / row[seq])))
    with pytest.raises(CaseInputError, match="flair DICOM series .* has unevenly spaced slices") as info:
        load_case_volumes(site.cases[3].images, site.cases[3].mask, PROFILE.regions, 20)
    assert info.value.fix == "re-export the complete series"
    assert "WARNING" not in capfd.readouterr().err  # ITK's own warning is replaced by the named problem

    # a folder that holds no series is named too
    empty = site_dir / "cases" / rows[0]["case_id"] / "ADC"
    shutil.rmtree(empty)
    empty.mkdir()
    with pytest.raises(CaseInputError, match="adc folder .* holds no DICOM series"):
        load_case_volumes(site.cases[0].images, site.cases[0].mask, PROFILE.regions, 20)
