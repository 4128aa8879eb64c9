"""Patients, not rows: manifest rows that hold the same images are one patient.

k counts patients. Nine rows of one patient's images would make a "class mean over nine cases" equal that
patient's features, so rows sharing any image file's content are one patient: the first row (manifest
order) stays and the others are named; when they disagree on the diagnosis none is used, since radfed cannot
know which is right. (A repeated case id is handled when the site is read, client.site.load_site.)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from client.inputhashes import input_sha256, recall
from client.site import Case, CaseProblem, Site


def _content(path: Path) -> str | None:
    """The file's sha256 (shared with the extraction cache's lookup: hashed once per process), None if missing
    (a missing file is the extraction checks' business)."""
    digest = input_sha256(path)
    return None if digest == "missing" else digest


def same_patient_groups(cases: list[Case]) -> list[list[Case]]:
    """Cases grouped by shared image content (any sequence; masks are not compared), in manifest order."""
    parent = list(range(len(cases)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, case in enumerate(cases):
        for path in case.images.values():
            digest = _content(path)
            if digest is None:
                continue
            if digest in owner:
                a, b = root(owner[digest]), root(i)
                parent[max(a, b)] = min(a, b)
            else:
                owner[digest] = i
    groups: dict[int, list[Case]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(root(i), []).append(case)
    return list(groups.values())


def one_row_per_patient(site: Site) -> Site:
    """The site with one case per patient; the other rows become named problems."""
    recall(site)  # the image hashes the site recorded at its extraction: only changed files are hashed again
    kept: list[Case] = []
    problems: list[CaseProblem] = []
    for group in same_patient_groups(site.cases):
        first, others = group[0], group[1:]
        if not others:
            kept.append(first)
            continue
        ids = ", ".join(c.case_id for c in group)
        if len({c.diagnosis for c in group}) > 1:
            problems += [CaseProblem(c.case_id, f"cases {ids} hold the same images but disagree on the diagnosis "
                                     f"({', '.join(f'{x.case_id}: {x.diagnosis}' for x in group)})",
                                     "check the diagnosis in the records and keep one row per patient",
                                     kind="conflicting-diagnosis") for c in group]
            continue
        kept.append(first)
        problems += [CaseProblem(c.case_id, f"same images as case {first.case_id}: one patient counts once",
                                 f"remove the duplicate row {c.case_id} from the manifest", kind="duplicate-patient")
                     for c in others]
    if not problems:
        return site
    return replace(site, cases=kept, problems=[*site.problems, *problems])
