"""A hospital's data as radfed sees it: the site folder, its manifest and its optional site.yaml.

Site folder layout::

    <site>/manifest.csv   case_id,diagnosis,<one column per profile sequence>,mask (paths relative to <site>)
    <site>/site.yaml      optional: name, profile (bundled name or path), min_cases_per_class
    <site>/.radfed/       what radfed keeps locally: feature cache, error report (never sent)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DIAGNOSES = {"HGG": 1, "BM": 0}  # positive class = high-grade glioma


class SiteError(ValueError):
    """The site as a whole cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Case:
    case_id: str
    diagnosis: str
    images: dict[str, Path]
    mask: Path

    @property
    def label(self) -> int:
        return DIAGNOSES[self.diagnosis]


@dataclass(frozen=True)
class CaseProblem:
    """One case that radfed could not use, and what to do about it."""

    case_id: str
    reason: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        return {"case_id": self.case_id, "reason": self.reason, "fix": self.fix}


@dataclass
class Site:
    name: str
    root: Path
    cases: list[Case]
    problems: list[CaseProblem] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def work_dir(self) -> Path:
        return self.root / ".radfed"


def load_site(root: str | Path, sequences: tuple[str, ...]) -> Site:
    """Read a site folder. Problems with single rows become CaseProblems; the other cases survive."""
    root = Path(root).expanduser().resolve()
    settings = site_settings(root)
    manifest = root / "manifest.csv"
    if not manifest.exists():
        raise SiteError(f"{manifest} is missing: write a manifest with columns case_id,diagnosis,"
                        f"{','.join(sequences)},mask")
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        needed = ["case_id", "diagnosis", *sequences, "mask"]
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise SiteError(f"{manifest} lacks column(s) {missing}: the header must hold {','.join(needed)}")
        rows = list(reader)

    cases: list[Case] = []
    problems: list[CaseProblem] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        case_id = (row.get("case_id") or "").strip()
        if not case_id:
            problems.append(CaseProblem(f"<line {line}>", "empty case_id", f"give line {line} of {manifest} an id"))
            continue
        if case_id in seen:
            problems.append(CaseProblem(case_id, "duplicate case_id in manifest", "give each case a unique id"))
            continue
        seen.add(case_id)
        diagnosis = (row.get("diagnosis") or "").strip().upper()
        if diagnosis not in DIAGNOSES:
            problems.append(CaseProblem(case_id, f"unknown diagnosis {row.get('diagnosis')!r}",
                                        f"use one of {sorted(DIAGNOSES)}"))
            continue
        cases.append(Case(
            case_id=case_id,
            diagnosis=diagnosis,
            images={seq: root / row[seq].strip() for seq in sequences},
            mask=root / row["mask"].strip(),
        ))
    name = str(settings.get("name") or root.name)
    return Site(name=name, root=root, cases=cases, problems=problems, settings=settings)


def site_settings(root: str | Path) -> dict[str, Any]:
    """The site's optional site.yaml (name, profile, min_cases_per_class), validated."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise SiteError(f"site folder {root} does not exist: check the site path (node config 'site-dir')")
    path = root / "site.yaml"
    if not path.exists():
        return {}
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SiteError(f"{path} is not valid YAML ({exc}): fix the syntax") from exc
    if not isinstance(doc, dict):
        raise SiteError(f"{path} must be a mapping (e.g. 'name: hospital-a')")
    unknown = set(doc) - {"name", "profile", "min_cases_per_class"}
    if unknown:
        raise SiteError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: name, profile, min_cases_per_class")
    return doc
