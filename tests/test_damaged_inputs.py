"""Damaged input is an attack on the result: every damaged file, manifest or cache entry is named (case, file,
fix) or healed, and the rest of the site survives. Real files (SimpleITK and byte patching), real extraction."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from client.extract import _input_hashes, _write_cache, cache_file, extract_site, pyradiomics_version
from client.importers import read_diagnoses
from client.site import SiteError, load_site
from client.sitecheck import check_site
from common.profile import load_profile

PROFILE = load_profile("default")
ROOT = Path(__file__).resolve().parent.parent
FIX = "re-export the image from the PACS / replace the file"


def _copy_site(tiny_site_root: Path, tmp_path: Path, n_cases: int | None = None) -> Path:
    src = next(p for p in tiny_site_root.iterdir() if (p / "manifest.csv").exists())
    dst = tmp_path / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".radfed"))
    if n_cases is not None:
        header, rows = _manifest(dst)
        _write_manifest(dst, header, rows[:n_cases])
    return dst


def _manifest(site: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (site / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _write_manifest(site: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    with (site / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------------------------
# Damaged images


def _rewrite(path: Path, out: Path, change) -> None:
    """Rewrite a volume with SimpleITK (float32), its voxels changed; a NIfTI file keeps NaN in its bytes."""
    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(image)
    change(arr)
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(image)
    sitk.WriteImage(new, str(out), useCompression=out.suffix == ".nrrd")


def _mask_voxel(site: Path, row: dict[str, str], inside: bool) -> tuple[int, int, int]:
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(site / row["mask"])))
    return tuple(int(i) for i in np.argwhere(mask > 0 if inside else mask == 0)[0])


def _patch_voxels(path: Path, values: dict[int, float]) -> None:
    """Overwrite float32 voxels (flat index -> value) in the bytes of a .nii.gz, through its own header."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    assert struct.unpack("<h", raw[70:72])[0] == 16  # float32
    offset = int(struct.unpack("<f", raw[108:112])[0])
    for index, value in values.items():
        raw[offset + 4 * index:offset + 4 * index + 4] = struct.pack("<f", value)
    path.write_bytes(gzip.compress(bytes(raw)))


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _damage(site: Path, row: dict[str, str], how: str) -> Path:
    """Damage one case's file; returns the damaged file (the manifest row may now point to a new file)."""
    if how == "nan-inside-mask":
        z, y, x = _mask_voxel(site, row, inside=True)
        path = site / row["t1c"]

        def change(a: np.ndarray) -> None:
            a[z, y, x] = np.nan
        _rewrite(path, path, change)
    elif how == "nan-outside-mask":
        z, y, x = _mask_voxel(site, row, inside=False)
        path = site / row["flair"]

        def change(a: np.ndarray) -> None:
            a[z, y, x] = np.nan
        _rewrite(path, path, change)
    elif how == "inf-voxels":  # byte patching: +Inf and -Inf straight into the stored data
        path = site / row["adc"]
        _patch_voxels(path, {0: np.inf, 1234: -np.inf})
    elif how == "truncated-nii-gz":
        path = site / row["t1c"]
        _cut_in_half(path)
    elif how == "truncated-raw-nii":
        row["flair"] = row["flair"].replace(".nii.gz", ".nii")
        path = site / row["flair"]
        sitk.WriteImage(sitk.ReadImage(str(site / row["flair"]) + ".gz"), str(path), useCompression=False)
        _cut_in_half(path)
    elif how == "nrrd-nan":
        row["adc"] = row["adc"].replace(".nii.gz", ".nrrd")
        path = site / row["adc"]

        def change(a: np.ndarray) -> None:
            a[a.shape[0] // 2, 3, 3] = np.nan
        _rewrite(site / row["adc"].replace(".nrrd", ".nii.gz"), path, change)
    else:
        raise AssertionError(how)
    return path


# how -> (kind, words the reason must hold)
DAMAGE = {
    "nan-inside-mask": ("non-finite", "t1c has 1 NaN/Inf voxel(s) stored in"),
    "nan-outside-mask": ("non-finite", "flair has 1 NaN/Inf voxel(s) stored in"),
    "inf-voxels": ("non-finite", "adc has 2 NaN/Inf voxel(s) stored in"),
    "truncated-nii-gz": ("corrupt-file", "gzip data ends before its end-of-stream marker"),
    "truncated-raw-nii": ("corrupt-file", "is truncated: its NIfTI-1 header promises"),
    "nrrd-nan": ("non-finite", "adc has 1 NaN/Inf voxel(s) stored in"),
}


def test_damaged_images_are_named_per_case_and_the_rest_survive(tiny_site_root, tmp_path):
    n_cases = len(DAMAGE) + 2
    site_dir = _copy_site(tiny_site_root, tmp_path, n_cases)
    header, rows = _manifest(site_dir)
    damaged = {how: (row["case_id"], _damage(site_dir, row, how)) for row, how in zip(rows, DAMAGE, strict=False)}
    _write_manifest(site_dir, header, rows)

    table, summary = extract_site(load_site(site_dir, PROFILE.sequences), PROFILE)
    check = check_site(site_dir, min_cases_per_class=1)  # `radfed site check` runs the same checks
    for problems in (table.problems, check.problems):
        by_case = {p.case_id: p for p in problems}
        for how, (case_id, path) in damaged.items():
            kind, words = DAMAGE[how]
            problem = by_case.get(case_id)
            assert problem is not None, f"{how}: {case_id} was reported usable"
            assert problem.kind == kind, (how, problem)
            assert words in problem.reason and str(path) in problem.reason, (how, problem.reason)
            assert FIX in problem.fix, (how, problem.fix)
    assert table.case_ids == [r["case_id"] for r in rows[len(DAMAGE):]]  # every other case survived
    assert [c.case_id for c in check.usable] == table.case_ids
    assert np.isfinite(table.values).all() and summary.failed == len(DAMAGE)
    report = json.loads((site_dir / ".radfed" / "errors.json").read_text())
    assert {p["case_id"]: p["kind"] for p in report["problems"]} == {
        case_id: DAMAGE[how][0] for how, (case_id, _) in damaged.items()}


def test_features_cached_before_the_file_checks_are_not_reused_for_a_damaged_file(tiny_site_root, tmp_path):
    """A cache entry made by the old code for a NaN NIfTI (read as 0) must not keep serving its features."""
    site_dir = _copy_site(tiny_site_root, tmp_path, 2)
    header, rows = _manifest(site_dir)
    site = load_site(site_dir, PROFILE.sequences)
    good, _ = extract_site(site, PROFILE)
    assert good.case_ids == [r["case_id"] for r in rows]
    path = _damage(site_dir, rows[0], "nan-inside-mask")
    # the entry the old code wrote for the damaged file: its hashes, features, no file-check stamp
    case = load_site(site_dir, PROFILE.sequences).cases[0]
    _write_cache(cache_file(site, PROFILE, case.case_id), {
        "case_id": case.case_id, "inputs": _input_hashes(case), "profile_sha256": PROFILE.sha256,
        "pyradiomics": pyradiomics_version(), "features": dict(zip(good.names, good.values[0].tolist(), strict=True)),
        "problem": None})

    table, summary = extract_site(load_site(site_dir, PROFILE.sequences), PROFILE)
    assert table.case_ids == [rows[1]["case_id"]] and summary.cached == 1
    (problem,) = table.problems
    assert problem.case_id == case.case_id and problem.kind == "non-finite" and str(path) in problem.reason
    log = (site_dir / ".radfed" / "extraction.log").read_text()
    assert "predates the file checks" in log
    # a clean old entry is checked once, stamped, and reused
    entry = json.loads(cache_file(site, PROFILE, rows[1]["case_id"]).read_text())
    assert entry["input_checks"]


# --------------------------------------------------------------------------------------------------------------
# Manifest encodings


def _reencode(site: Path, encoding: str, bom: bytes = b"") -> None:
    text = (site / "manifest.csv").read_text(encoding="utf-8")
    (site / "manifest.csv").write_bytes(bom + text.encode(encoding))


@pytest.mark.parametrize("encoding,bom", [("utf-8", b"\xef\xbb\xbf"), ("utf-16", b""), ("utf-16-be", b"\xfe\xff")])
def test_manifest_with_bom_or_utf16_is_read(tiny_site_root, tmp_path, encoding, bom):
    site_dir = _copy_site(tiny_site_root, tmp_path, 4)
    _, rows = _manifest(site_dir)
    _reencode(site_dir, encoding, bom)
    site = load_site(site_dir, PROFILE.sequences)
    assert [c.case_id for c in site.cases] == [r["case_id"] for r in rows] and not site.problems
    assert site.cases[0].covariates == {k: v for k, v in rows[0].items() if k not in (
        "case_id", "diagnosis", *PROFILE.sequences, "mask")}
    # labels.csv (BraTS and DICOM layouts) is read the same way
    labels = tmp_path / "labels.csv"
    labels.write_bytes(bom + "case_id,diagnosis,age\nx-1,HGG,63\n".encode(encoding))
    assert read_diagnoses(labels) == ({"x-1": {"diagnosis": "HGG", "age": "63"}}, [])


def test_latin1_manifest_is_refused_naming_the_file_the_line_and_the_fix(tiny_site_root, tmp_path, capsys):
    site_dir = _copy_site(tiny_site_root, tmp_path, 4)
    header, rows = _manifest(site_dir)
    rows[2]["case_id"] = "José-3"
    _write_manifest(site_dir, header, rows)
    _reencode(site_dir, "latin-1")
    manifest = site_dir / "manifest.csv"
    offset = manifest.read_bytes().index(b"\xe9")
    with pytest.raises(SiteError) as info:
        load_site(site_dir, PROFILE.sequences)
    message = str(info.value)
    assert str(manifest) in message and f"byte 0xe9 at offset {offset} (line 4)" in message
    assert "save it as UTF-8" in message

    from radfed.cli import main

    assert main(["site", "check", "--site", str(site_dir)]) == 2  # the whole site cannot be read: said once
    err = capsys.readouterr().err
    assert str(manifest) in err and "save it as UTF-8" in err

    labels = tmp_path / "labels.csv"
    labels.write_bytes("case_id,diagnosis\nJosé,HGG\n".encode("latin-1"))
    with pytest.raises(SiteError, match=r"labels\.csv is not UTF-8 text: byte 0xe9 at offset 21 \(line 2\)"):
        read_diagnoses(labels)


# --------------------------------------------------------------------------------------------------------------
# The feature cache


def _entry_variants(entry: dict) -> dict[str, bytes]:
    """Valid JSON of the wrong shape, broken JSON, and right-looking entries with wrong inner types."""
    texts = {
        "list": "[]",
        "null": "null",
        "string": '"features"',
        "broken-json": json.dumps(entry)[:-5],
        "features-a-list": json.dumps({**entry, "features": []}),
        "features-not-numbers": json.dumps({**entry, "features": {"t1c/x": "high"}}),
        "problem-a-string": json.dumps({**entry, "problem": "bad"}),
        "problem-wrong-keys": json.dumps({**entry, "problem": {"why": "bad"}}),
    }
    return {**{k: v.encode() for k, v in texts.items()}, "not-utf8": b"\xff\xfe{"}


def test_cache_entries_of_the_wrong_shape_are_re_extracted_not_a_traceback(tiny_site_root, tmp_path):
    site_dir = _copy_site(tiny_site_root, tmp_path, 1)
    site = load_site(site_dir, PROFILE.sequences)
    first, _ = extract_site(site, PROFILE)
    cache = cache_file(site, PROFILE, site.cases[0].case_id)
    entry = json.loads(cache.read_text())
    for name, data in _entry_variants(entry).items():
        cache.write_bytes(data)
        table, summary = extract_site(load_site(site_dir, PROFILE.sequences), PROFILE)
        assert (summary.extracted, summary.cached) == (1, 0), name
        np.testing.assert_array_equal(table.values, first.values)
        assert json.loads(cache.read_text())["features"], name  # healed: a valid entry again
    log = (site_dir / ".radfed" / "extraction.log").read_text()
    assert log.count(f"cache entry {cache}") == len(_entry_variants(entry)) and "extracting the case again" in log


def _write_many(path: str, writer: int, times: int) -> list[str]:
    errors = []
    for i in range(times):
        try:
            _write_cache(Path(path), {"writer": writer, "i": i, "pad": "x" * 4096})
        except OSError as exc:
            errors.append(repr(exc))
    return errors


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_concurrent_writers_of_one_cache_file_never_fail(tmp_path, how):
    path = tmp_path / "cache" / "case.json"
    n, times = 8, 200
    if how == "threads":
        results: list[list[str]] = [[] for _ in range(n)]

        def run(k: int) -> None:
            results[k] = _write_many(str(path), k, times)
        threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        with ProcessPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(_write_many, [str(path)] * n, range(n), [times] * n))
    errors = [e for r in results for e in r]
    assert not errors, f"{len(errors)} of {n * times} writes failed, e.g. {errors[0]}"
    assert json.loads(path.read_text())["pad"] == "x" * 4096  # one whole entry, never a mix
    assert [p.name for p in path.parent.iterdir()] == ["case.json"]  # no temporary file left behind
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------------------------
# Stopping `radfed site extract`


def _proc_stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of a process from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), fields[19]


def _descendants(pid: int) -> dict[int, str]:
    """Every live descendant of pid, found by walking /proc: pid -> start time (to rule out pid reuse)."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) and stat[0] not in "ZX":
            parents.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child, start in parents.get(todo.pop(), []):
            found[child] = start
            todo.append(child)
    return found


def _alive(pid: int, start: str) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[2] == start and stat[0] not in "ZX"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="walks /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_extract_leaves_no_worker_alive(tiny_site_root, tmp_path, sig):
    site_dir = _copy_site(tiny_site_root, tmp_path)
    out = (tmp_path / "out.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "radfed.cli", "site", "extract", "--site", str(site_dir),
                             "--workers", "2"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    workers: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = _descendants(proc.pid)
        assert len(workers) >= 2, f"no workers started: {(tmp_path / 'out.txt').read_text()}"
        time.sleep(1.0)  # the workers are busy with cases now
        cache = site_dir / ".radfed" / "cache"
        cached_before = len(list(cache.rglob("*.json"))) if cache.exists() else 0
        assert cached_before < len(_manifest(site_dir)[1]), "extraction ended before the signal: test says nothing"
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        deadline = time.monotonic() + 15
        while any(_alive(pid, start) for pid, start in workers.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid, start in workers.items() if _alive(pid, start)]
        assert not left, f"worker(s) {left} outlived `radfed site extract` after {sig.name}"
        if sig == signal.SIGTERM:  # a clean exit through SystemExit: status 128 + 15, no traceback
            assert code == 128 + signal.SIGTERM and "Traceback" not in (tmp_path / "out.txt").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, start in workers.items():  # only the processes this test started, by pid
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)
        out.close()
