"""Importers: a site's files as ``Case`` objects, and what cannot be imported as ``CaseProblem``s.

Three layouts (``source`` in site.yaml):

- ``manifest``: ``manifest.csv`` with case_id, diagnosis, one column per profile sequence and mask;
  paths relative to ``data_root``.
- ``brats``: one folder per case under ``data_root``, files ``<case>-<suffix>.nii.gz`` (BraTS 2023 suffixes:
  t1c, t2f = FLAIR, t1n, t2w, seg; ``adc`` if present); diagnoses from ``labels.csv``.
- ``ucsf-bmsr``: the UCSF-BMSR release, one folder per MRI, files ``<id>/<id>_<suffix>.nii.gz`` with the
  published suffixes T1pre, T1post, FLAIR, subtraction and seg (exact names: ``<id>_BraTS-seg`` is not the
  mask); diagnoses from ``labels.csv``.
- ``dicom``: one folder per case, one sub-folder per sequence holding a DICOM series (or a NIfTI/NRRD file
  of that name), the mask as ``mask.nii.gz``/``mask.nrrd`` or a ``mask/`` DICOM series; diagnoses from
  ``labels.csv``.

A sequence (or the mask) that no case folder of a site holds is refused for the whole site, naming it: the
profile asks for something the site does not have, which no case can fix. Cases lacking it one by one are
named per case.

NIfTI (.nii, .nii.gz) and NRRD (.nrrd, .nhdr) are accepted everywhere. Importers only look at names: no
image is opened here (``client.checks`` reads and checks them), so importing a site is instant.

``manifest.csv`` and ``labels.csv`` may be UTF-8 (with or without the BOM Excel writes) or UTF-16/32 with a
BOM; anything else is refused with the file, the byte and line, and the fix (see ``read_csv``).
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from client.cases import DIAGNOSES, Case, CaseProblem, SiteError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")
# profile sequence -> BraTS 2023 file suffix (BraTS calls FLAIR "t2f"; it has no ADC, sites add their own)
BRATS_NAMES = {"t1c": "t1c", "flair": "t2f", "t1": "t1n", "t2": "t2w", "adc": "adc"}
# profile sequence -> UCSF-BMSR file suffix (its T1post is a post-contrast T1, so it serves a profile's t1c)
UCSF_BMSR_NAMES = {"t1pre": "T1pre", "t1post": "T1post", "t1c": "T1post", "flair": "FLAIR",
                   "subtraction": "subtraction"}
ImportItem = Case | CaseProblem


# BOMs longest first: UTF-32-LE's starts with UTF-16-LE's; Python's utf-16/32 codecs read the BOM themselves
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
SAVE_AS_UTF8 = "save it as UTF-8 (e.g. Excel's 'CSV UTF-8', or iconv -f WINDOWS-1252 -t UTF-8) and run again"


def _csv_text(path: Path) -> str:
    """A CSV file's text: UTF-8 with or without BOM, or UTF-16/32 with BOM.

    Other encodings are refused rather than guessed: Latin-1, Windows-1252 and Mac Roman all decode any
    bytes, so a wrong guess would silently change case ids and image paths (an accented path would then be
    reported as a missing file, far from the cause).
    """
    data = path.read_bytes()
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), None)
    if encoding is not None:
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as exc:  # a BOM promised UTF-16/32 but the bytes do not follow it
            raise SiteError(f"{path} starts with a {encoding.upper()} byte-order mark but cannot be decoded "
                            f"as {encoding.upper()} ({exc.reason}; the file is damaged or cut short); "
                            f"{SAVE_AS_UTF8}") from exc
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    if b"\x00" in data:
        raise SiteError(f"{path} holds NUL bytes: it looks like UTF-16 without a byte-order mark; {SAVE_AS_UTF8}")
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data[:offset].count(b"\n") + 1
        raise SiteError(f"{path} is not UTF-8 text: byte 0x{data[offset]:02x} at offset {offset} (line {line}) "
                        "is not valid UTF-8 (a Latin-1/Windows-1252 export does this, e.g. with an accented name); "
                        f"{SAVE_AS_UTF8}") from exc


def read_csv(path: Path) -> tuple[list[str], list[dict[str | None, Any]]]:
    """A CSV file's header (each name stripped of a BOM and spaces) and its rows as dicts."""
    reader = csv.DictReader(io.StringIO(_csv_text(path), newline=""))
    reader.fieldnames = [name.replace("\ufeff", "").strip() for name in reader.fieldnames or []]
    return list(reader.fieldnames), list(reader)


def _diagnosis_problem(case_id: str, raw: str, where: str) -> CaseProblem | None:
    if raw.strip().upper() in DIAGNOSES:
        return None
    return CaseProblem(case_id, f"unknown diagnosis {raw!r} in {where}", f"use one of {sorted(DIAGNOSES)}",
                       kind="unknown-diagnosis")


def import_manifest(data_root: Path, manifest: Path, sequences: tuple[str, ...]) -> Iterator[ImportItem]:
    """Cases of a ``manifest.csv`` (what radfed always read); paths are relative to ``data_root``."""
    if not manifest.exists():
        raise SiteError(f"{manifest} is missing: write a manifest with columns case_id,diagnosis,"
                        f"{','.join(sequences)},mask (or set 'source' in site.yaml)")
    header, rows = read_csv(manifest)
    needed = ["case_id", "diagnosis", *sequences, "mask"]
    missing = [c for c in needed if c not in header]
    if missing:
        raise SiteError(f"{manifest} lacks column(s) {missing}: the header must hold {','.join(needed)}")

    for line, row in enumerate(rows, start=2):
        fields = [v for k, v in row.items() if k is not None and v is not None] + list(row.get(None) or [])
        if None in row or any(row.get(c) is None for c in header):  # too many or too few fields for the header
            text = ",".join(str(v) for v in fields)
            yield CaseProblem(f"<line {line}>", f"line {line} of {manifest.name} is not a manifest row: {len(fields)} "
                              f"field(s) where the header has {len(header)} ({text[:60]!r})",
                              f"fix or remove line {line} (fields are separated by commas; quote a value that holds "
                              "one)", kind="malformed-row")
            continue
        case_id = (row.get("case_id") or "").strip()
        if not case_id:
            yield CaseProblem(f"<line {line}>", "empty case_id", f"give line {line} of {manifest} an id",
                              kind="empty-id")
            continue
        # every problem of the row at once, so one edit fixes it
        problems = [p for p in [_diagnosis_problem(case_id, row.get("diagnosis") or "", manifest.name)] if p]
        empty = [c for c in (*sequences, "mask") if not (row.get(c) or "").strip()]
        if empty:
            problems.append(CaseProblem(case_id, f"no path for {', '.join(empty)} in {manifest.name}",
                                        f"fill in the {', '.join(empty)} column(s) of line {line}",
                                        kind="missing-file"))
        if problems:
            absent = [c for c in (*sequences, "mask") if c not in empty and not (data_root / row[c].strip()).exists()]
            if absent:  # the Case is not built, so the file checks would never name these
                problems.append(CaseProblem(case_id, f"no file for {', '.join(absent)} "
                                            f"({', '.join(row[c].strip() for c in absent)})",
                                            f"fix the path(s) on line {line} (relative to {data_root})",
                                            kind="missing-file"))
            yield from problems
            continue
        yield Case(case_id=case_id, diagnosis=(row["diagnosis"] or "").strip().upper(),
                   images={seq: data_root / row[seq].strip() for seq in sequences},
                   mask=data_root / row["mask"].strip(), covariates=_other_columns(row, needed))


def _other_columns(row: Mapping[str | None, Any], known: Iterable[str]) -> dict[str, str]:
    """A CSV row's columns besides ``known`` (e.g. age, sex), stripped; extra unnamed fields are ignored."""
    skip = set(known)
    return {k: str(v or "").strip() for k, v in row.items() if k is not None and k not in skip}


def read_diagnoses(labels_csv: Path) -> tuple[dict[str, dict[str, str]], list[CaseProblem]]:
    """``labels.csv`` (case_id,diagnosis[,covariates...]) as {case_id: its row}, plus its bad rows."""
    if not labels_csv.exists():
        raise SiteError(f"{labels_csv} is missing: image folders carry no diagnosis, so write a CSV with "
                        f"columns case_id,diagnosis (one row per case folder, diagnosis HGG or BM)")
    header, rows = read_csv(labels_csv)
    missing = [c for c in ("case_id", "diagnosis") if c not in header]
    if missing:
        raise SiteError(f"{labels_csv} lacks column(s) {missing}: the header must be case_id,diagnosis")
    diagnoses: dict[str, dict[str, str]] = {}
    problems: list[CaseProblem] = []
    for line, row in enumerate(rows, start=2):
        case_id = (row.get("case_id") or "").strip()
        if not case_id:
            problems.append(CaseProblem(f"<{labels_csv.name} line {line}>", "empty case_id",
                                        f"give line {line} of {labels_csv} a case id", kind="empty-id"))
        elif case_id in diagnoses:
            problems.append(CaseProblem(case_id, f"listed twice in {labels_csv.name}",
                                        f"keep one row for {case_id} in {labels_csv}", kind="duplicate-id"))
        else:
            diagnoses[case_id] = {"diagnosis": row.get("diagnosis") or "",
                                  **_other_columns(row, ("case_id", "diagnosis"))}
    return diagnoses, problems


def _case_folders(data_root: Path, skip: Iterable[Path]) -> list[Path]:
    skipped = {p.resolve() for p in skip}
    return sorted(p for p in data_root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.resolve() not in skipped)


def _brats_entry(folder: Path, suffix: str) -> list[Path]:
    """Files ``*-<suffix>.<ext>`` (or ``_<suffix>``) in a BraTS case folder, case-insensitive."""
    wanted = [f"{sep}{suffix}{ext}".lower() for sep in ("-", "_") for ext in IMAGE_SUFFIXES]
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(tuple(wanted)))


def _ucsf_bmsr_entry(folder: Path, name: str) -> list[Path]:
    """The file ``<id>_<name>.nii.gz`` (or .nii, .nrrd) in a UCSF-BMSR folder ``<id>/``, case-insensitive."""
    wanted = {f"{folder.name}_{name}{ext}".lower() for ext in IMAGE_SUFFIXES}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower() in wanted)


def _dicom_entry(folder: Path, name: str) -> list[Path]:
    """A sub-folder ``<name>`` (DICOM series) or a file ``<name>.<ext>`` in a case folder, case-insensitive."""
    wanted = {name.lower()} | {f"{name}{ext}".lower() for ext in IMAGE_SUFFIXES}
    return sorted(p for p in folder.iterdir() if p.name.lower() in wanted and (p.is_dir() or p.is_file()))


def _folder_cases(data_root: Path, labels_csv: Path, sequences: tuple[str, ...], names: Mapping[str, str],
                  mask_name: str, skip: Iterable[Path], find: Callable[[Path, str], list[Path]],
                  expect: Callable[[str, str], str]) -> Iterator[ImportItem]:
    """One case per folder under ``data_root``; ``find(folder, name)`` lists the entries matching a name."""
    diagnoses, problems = read_diagnoses(labels_csv)
    yield from problems
    folders = {p.name: p for p in _case_folders(data_root, skip)}
    keys = [*((seq, names.get(seq, seq)) for seq in sequences), ("mask", mask_name)]
    looked = 0  # case folders searched for volumes
    held: set[str] = set()  # keys found in at least one of them
    for case_id, folder in folders.items():
        if case_id not in diagnoses:
            yield CaseProblem(case_id, f"no diagnosis for {case_id} in {labels_csv.name}",
                              f"add a row '{case_id},HGG' or '{case_id},BM' to {labels_csv}", kind="no-diagnosis")
            continue
        problem = _diagnosis_problem(case_id, diagnoses[case_id]["diagnosis"], labels_csv.name)
        if problem:
            yield problem
            continue
        found: dict[str, Path] = {}
        absent: dict[str, str] = {}  # key -> what was expected
        ambiguous: list[CaseProblem] = []
        looked += 1
        for key, name in keys:
            entries = find(folder, name)
            held.update([key] if entries else [])
            if len(entries) > 1:
                ambiguous.append(CaseProblem(
                    case_id, f"{len(entries)} entries match {key} ({', '.join(p.name for p in entries)})",
                    f"keep one {key} volume in {folder}", kind="ambiguous-file"))
            elif entries:
                found[key] = entries[0]
            else:
                absent[key] = expect(case_id, name)
        if ambiguous:
            yield ambiguous[0]
        elif absent:
            listed = ", ".join(f"{key} ({expected})" for key, expected in absent.items())
            yield CaseProblem(case_id, f"no file for {listed} in {folder}",
                              "add the missing volume(s), or map them to their names with 'sequence_names' / "
                              "'mask_name' in site.yaml", kind="missing-mask" if list(absent) == ["mask"]
                              else "missing-sequence")
        else:
            mask = found.pop("mask")
            row = diagnoses[case_id]
            yield Case(case_id=case_id, diagnosis=row["diagnosis"].strip().upper(), images=found, mask=mask,
                       covariates={k: v for k, v in row.items() if k != "diagnosis"})
    for case_id in diagnoses:
        if case_id not in folders:
            yield CaseProblem(case_id, f"listed in {labels_csv.name} but {data_root / case_id} is not a folder",
                              f"restore the case folder or remove {case_id} from {labels_csv}", kind="missing-file")
    lacking = [(key, name) for key, name in keys if key not in held]
    if looked and lacking:
        listed = ", ".join(f"{key} ({expect('<case>', name)})" for key, name in lacking)
        raise SiteError(f"no case folder under {data_root} holds {listed}, which the profile needs (its sequences: "
                        f"{', '.join(sequences)}): use a profile whose sequences this site has (radfed profile list), "
                        "or map each to its file name with 'sequence_names' / 'mask_name' in site.yaml")


def import_brats(data_root: Path, labels_csv: Path, sequences: tuple[str, ...], names: Mapping[str, str] | None = None,
                 mask_name: str | None = None, skip: Iterable[Path] = ()) -> Iterator[ImportItem]:
    """Cases of a BraTS-style folder; ``names`` maps profile sequences to file suffixes (BraTS 2023 defaults)."""
    suffixes = {**BRATS_NAMES, **(names or {})}
    return _folder_cases(data_root, labels_csv, sequences, suffixes, mask_name or "seg", skip, _brats_entry,
                         lambda case_id, name: f"{case_id}-{name}.nii.gz or .nrrd")


def import_ucsf_bmsr(data_root: Path, labels_csv: Path, sequences: tuple[str, ...],
                     names: Mapping[str, str] | None = None, mask_name: str | None = None,
                     skip: Iterable[Path] = ()) -> Iterator[ImportItem]:
    """Cases of a UCSF-BMSR folder (``UCSF_BrainMetastases_TRAIN``); ``names`` maps profile sequences to file
    suffixes (UCSF-BMSR's by default)."""
    suffixes = {**UCSF_BMSR_NAMES, **(names or {})}
    return _folder_cases(data_root, labels_csv, sequences, suffixes, mask_name or "seg", skip, _ucsf_bmsr_entry,
                         lambda case_id, name: f"{case_id}_{name}.nii.gz")


def import_dicom(data_root: Path, labels_csv: Path, sequences: tuple[str, ...], names: Mapping[str, str] | None = None,
                 mask_name: str | None = None, skip: Iterable[Path] = ()) -> Iterator[ImportItem]:
    """Cases of DICOM series folders; ``names`` maps profile sequences to sub-folder names (default: same)."""
    return _folder_cases(data_root, labels_csv, sequences, dict(names or {}), mask_name or "mask", skip,
                         _dicom_entry, lambda case_id, name: f"a DICOM folder {name}/ or {name}.nii.gz/.nrrd")
