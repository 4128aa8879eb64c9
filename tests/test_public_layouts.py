"""Sites laid out exactly as the public datasets are published pass ``radfed site check`` with their profile.

BraTS 2023 (GLI and METS): ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1c.nii.gz``, suffixes t1n, t1c, t2w, t2f,
seg, labels 1 NCR / 2 SNFH / 3 ET. UCSF-BMSR: ``UCSF_BrainMetastases_TRAIN/100101A/100101A_T1post.nii.gz``, suffixes
T1pre, T1post, FLAIR, subtraction, seg (binary), beside a ``_BraTS-seg`` mask that is not the site's mask. The
images are synthetic (radfed.synth), stored as int16 as scanners do.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from federation_helpers import run_federation_in

from client.checks import load_case_volumes
from client.site import SiteError, load_site
from common.profile import load_profile
from radfed import synth
from radfed.cli import main

PER_CLASS = 10  # two release blocks of k = 5: the least a site takes part with
# radfed.synth numbering (1 enhancing, 2 necrosis, 3 edema) -> BraTS 2023 (3 ET, 1 NCR, 2 SNFH)
TO_BRATS = {1: 3, 2: 1, 3: 2}


@pytest.fixture(scope="module")
def cases() -> list[tuple[str, dict[str, sitk.Image]]]:
    """PER_CLASS HGG and PER_CLASS BM synthetic cases (+1 spare HGG) on one tiny scanner."""
    spec = synth.tiny_sites(1, 1)[0]
    rng = np.random.default_rng(2023)
    return [(d, synth.generate_case(spec, d, rng)) for d in ["HGG"] * (PER_CLASS + 1) + ["BM"] * PER_CLASS]


def _int16(image: sitk.Image, scale: float = 1.0) -> sitk.Image:
    return sitk.Cast(sitk.RescaleIntensity(image, 0, 3000 * scale), sitk.sitkInt16)


def _relabel(mask: sitk.Image, lookup: dict[int, int]) -> sitk.Image:
    arr = sitk.GetArrayFromImage(mask)
    out = np.zeros_like(arr)
    for ours, theirs in lookup.items():
        out[arr == ours] = theirs
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(mask)
    return image


def _labels_csv(site: Path, rows: list[tuple[str, str]]) -> None:
    with (site / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("case_id", "diagnosis"), *rows])


def _brats_site(root: Path, cases, name: str = "brats-site") -> tuple[Path, list[str]]:
    """GLI folders for HGG, METS folders for BM (in ``root/BraTS2023-<name>``); the spare HGG case lacks its t2w."""
    data = root / f"BraTS2023-{name}"
    rows = []
    for i, (diagnosis, images) in enumerate(cases):
        case_id = f"BraTS-GLI-{i:05d}-000" if diagnosis == "HGG" else f"BraTS-MET-{i:05d}-000"
        folder = data / case_id
        folder.mkdir(parents=True)
        volumes = {"t1n": _int16(images["t1c"], 0.8), "t1c": _int16(images["t1c"]), "t2w": _int16(images["flair"], 1.2),
                   "t2f": _int16(images["flair"]), "seg": _relabel(images["mask"], TO_BRATS)}
        if i == PER_CLASS:
            del volumes["t2w"]
        for suffix, image in volumes.items():
            sitk.WriteImage(image, str(folder / f"{case_id}-{suffix}.nii.gz"))
        rows.append((case_id, diagnosis))
    site = root / name
    site.mkdir()
    (site / "site.yaml").write_text(f"name: {name}\nsource: brats\ndata_root: ../{data.name}\nprofile: brats2023\n")
    _labels_csv(site, rows)
    return site, [r[0] for r in rows]


def _ucsf_site(root: Path, cases) -> tuple[Path, list[str]]:
    """One folder per MRI (<patient><A|B>); every other folder also holds a multi-label _BraTS-seg."""
    data = root / "UCSF-BMSR" / "UCSF_BrainMetastases_TRAIN"
    rows = []
    for i, (diagnosis, images) in enumerate(cases[1:]):  # the spare case is not needed here
        case_id = f"{100101 + i // 2}{'AB'[i % 2]}"
        folder = data / case_id
        folder.mkdir(parents=True)
        t1pre, t1post = _int16(images["t1c"], 0.8), _int16(images["t1c"])
        subtraction = sitk.Cast(t1post, sitk.sitkFloat32) - sitk.Cast(t1pre, sitk.sitkFloat32)
        volumes = {"T1pre": t1pre, "T1post": t1post, "FLAIR": _int16(images["flair"]), "subtraction": subtraction,
                   "seg": _relabel(images["mask"], {1: 1})}
        if i % 2:
            volumes["BraTS-seg"] = _relabel(images["mask"], TO_BRATS)
        for suffix, image in volumes.items():
            sitk.WriteImage(image, str(folder / f"{case_id}_{suffix}.nii.gz"))
        rows.append((case_id, diagnosis))
    site = root / "ucsf-site"
    site.mkdir()
    (site / "site.yaml").write_text("name: ucsf-hospital\nsource: ucsf-bmsr\n"
                                    "data_root: ../UCSF-BMSR/UCSF_BrainMetastases_TRAIN\nprofile: ucsf-bmsr\n")
    _labels_csv(site, rows)
    return site, [r[0] for r in rows]


def _check(capsys, site: Path, *extra: str) -> tuple[int, dict, str]:
    """Exit code, the JSON report (empty when the site cannot be read) and stderr of ``radfed site check``."""
    code = main(["site", "check", "--site", str(site), "--json", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else {}, err


def test_a_brats_2023_site_passes_site_check_with_the_brats_profile(cases, tmp_path, capsys):
    site, ids = _brats_site(tmp_path, cases)
    code, report, _ = _check(capsys, site)
    assert code == 0 and report["status"] == "warnings", report["verdict"]
    assert report["profile"]["name"] == "brats2023-hgg-vs-bm"
    assert report["counts"]["by_class"] == {"HGG": PER_CLASS, "BM": PER_CLASS}
    (problem,) = report["problems"]  # the case without t2w is named, with the file it lacks
    assert problem["case_id"] == ids[PER_CLASS] and problem["kind"] == "missing-sequence"
    assert f"t2w ({ids[PER_CLASS]}-t2w.nii.gz" in problem["reason"]

    # BraTS numbering is the profile's: no label_map, and each region is the lesion part it names
    profile = load_profile("brats2023")
    case = load_site(site, profile.sequences).cases[0]
    volumes, mask = load_case_volumes(case.images, case.mask, profile.regions, 20)
    ours = sitk.GetArrayFromImage(cases[0][1]["mask"])
    theirs = sitk.GetArrayFromImage(mask)
    for region, label in profile.regions.items():
        assert np.array_equal(theirs == label, ours == {"enhancing": 1, "necrosis": 2, "edema": 3}[region])
    assert {v.GetPixelID() for v in volumes.values()} == {sitk.sitkInt16}


def test_a_ucsf_bmsr_site_passes_site_check_and_its_brats_seg_is_not_read(cases, tmp_path, capsys):
    site, ids = _ucsf_site(tmp_path, cases)
    code, report, _ = _check(capsys, site)
    assert code == 0 and report["status"] == "ok", report["verdict"]
    assert report["profile"]["name"] == "ucsf-bmsr-hgg-vs-bm" and report["usable_cases"] == ids
    profile = load_profile("ucsf-bmsr")
    case = load_site(site, profile.sequences).cases[1]
    assert case.mask.name == f"{ids[1]}_seg.nii.gz" and (case.mask.parent / f"{ids[1]}_BraTS-seg.nii.gz").exists()
    assert {seq: p.name for seq, p in case.images.items()} == {
        "t1pre": f"{ids[1]}_T1pre.nii.gz", "t1post": f"{ids[1]}_T1post.nii.gz", "flair": f"{ids[1]}_FLAIR.nii.gz",
        "subtraction": f"{ids[1]}_subtraction.nii.gz"}


def test_a_sequence_no_case_has_is_a_named_refusal_of_the_site(cases, tmp_path, capsys):
    site, _ = _brats_site(tmp_path, cases[:3])
    # the default profile asks for flair (BraTS t2f: found) and adc, which BraTS does not publish
    code, report, err = _check(capsys, site, "--profile", "default")
    assert not report
    assert code == 2 and "adc (<case>-adc.nii.gz or .nrrd)" in err and "radfed profile list" in err
    assert "t1c" in err and "flair" in err  # the profile's sequences, so the administrator sees what is asked
    with pytest.raises(SiteError, match=r"holds t1pre \(<case>-t1pre.*, subtraction"):
        load_site(site, load_profile("ucsf-bmsr").sequences)


def test_two_brats_2023_hospitals_run_a_federation_under_the_brats_profile(cases, tmp_path):
    """Both hospitals keep the BraTS files as published; the run agrees on the brats2023 profile's features."""
    other = synth.tiny_sites(2, 1)[1]  # another scanner
    rng = np.random.default_rng(2024)
    more = [(d, synth.generate_case(other, d, rng)) for d in ["HGG"] * (PER_CLASS + 1) + ["BM"] * PER_CLASS]
    data = tmp_path / "data"
    data.mkdir()
    _brats_site(data, cases, "hospital-a")
    _brats_site(data, more, "hospital-b")
    folder = run_federation_in(tmp_path, data, 2, profile="brats2023", **{"external-validation": "none",
                                                                          "local-only": "none"})
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc.get("error")
    assert doc["profile"]["sha256"] == load_profile("brats2023").sha256
    assert sorted(doc["final"]["sites"]) == ["hospital-a", "hospital-b"]
    for name in ("hospital-a", "hospital-b"):
        assert doc["sites"][name]["split"]["n-failed"] == 1  # the case without t2w, named at its site only
    assert all(f.split("/")[0] in ("t1n", "t1c", "t2w", "t2f", "shape") for f in doc["features"]["selected"])
