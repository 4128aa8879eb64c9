"""``radfed site check``: can this site take part, and which cases must be fixed first?

Reads the site (any importer), runs every per-case input check of ``client.checks`` and the site's
eligibility rule, without pyradiomics, so it takes seconds. The result is a table for the site
administrator and a JSON report (default ``<output_dir>/check.json``); nothing is sent anywhere.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.checks import MIN_REGION_VOXELS, CaseInputError, label_lookup, load_case_volumes
from client.patients import one_row_per_patient
from client.site import DIAGNOSES, Case, CaseProblem, Site, load_site, site_floor, site_settings
from client.sitefiles import atomic_write
from common.profile import Profile, load_profile
from common.split import eligibility_problem

# The federation's defaults (pyproject [tool.flwr.app.config]); a site.yaml may only raise k.
DEFAULT_MIN_CASES = 5
DEFAULT_TEST_FRACTION = 0.3
REPORT_SCHEMA = "radfed.site-check/1"

EXIT_OK = 0  # usable cases remain (possibly with warnings)
EXIT_NOTHING_USABLE = 1
EXIT_CANNOT_TAKE_PART = 3  # usable cases, but too few per class for the federation's k
# (2 is the CLI's code for a site that cannot be read at all, e.g. a malformed site.yaml)


@dataclass
class SiteCheck:
    """Outcome of checking one site."""

    site: Site
    profile: Profile
    k: int
    test_fraction: float
    usable: list[Case]
    problems: list[CaseProblem]
    eligibility: str | None  # why the site cannot take part with its usable cases, or None
    seconds: float

    @property
    def n_cases(self) -> int:
        """Cases the site holds: imported ones plus rows/folders that could not be imported."""
        imported = {c.case_id for c in self.site.cases}
        return len(imported) + len({p.case_id for p in self.site.problems} - imported)

    @property
    def by_class(self) -> dict[str, int]:
        counts = Counter(c.diagnosis for c in self.usable)
        return {d: counts.get(d, 0) for d in DIAGNOSES}

    @property
    def problems_by_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(p.kind for p in self.problems).items()))

    @property
    def status(self) -> str:
        if not self.usable:
            return "nothing-usable"
        if self.eligibility:
            return "cannot-take-part"
        return "warnings" if self.problems else "ok"

    @property
    def exit_code(self) -> int:
        return {"nothing-usable": EXIT_NOTHING_USABLE, "cannot-take-part": EXIT_CANNOT_TAKE_PART}.get(
            self.status, EXIT_OK)

    @property
    def verdict(self) -> str:
        """One sentence for the site administrator."""
        name, bad = self.site.name, len({p.case_id for p in self.problems})
        if self.status == "nothing-usable":
            return (f"site {name} has no usable case ({bad} with problems): it cannot take part; "
                    "fix the cases listed above")
        if self.status == "cannot-take-part":
            todo = "fix the cases listed above or add cases" if self.problems else "add cases"
            return (f"site {name} cannot take part: {self.eligibility} (k = {self.k}, held-out fraction "
                    f"{self.test_fraction:g}); {todo}")
        if self.problems:
            return (f"site {name} can take part with {len(self.usable)} usable case(s); {bad} case(s) will be "
                    "left out until fixed")
        return f"site {name} can take part: all {len(self.usable)} case(s) usable"

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "site": self.site.name,
            "site_dir": str(self.site.root),
            "source": self.site.settings.get("source", "manifest"),
            "checked": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(self.seconds, 3),
            "profile": {"name": self.profile.name, "version": self.profile.version, "sha256": self.profile.sha256},
            "min_cases_per_class": self.k,
            "test_fraction": self.test_fraction,
            "status": self.status,
            "exit_code": self.exit_code,
            "verdict": self.verdict,
            "eligibility_problem": self.eligibility,
            "counts": {
                "cases": self.n_cases,
                "usable": len(self.usable),
                "by_class": self.by_class,
                "problem_cases": len({p.case_id for p in self.problems}),
                "problems_by_kind": self.problems_by_kind,
            },
            "problems": [p.as_dict() for p in self.problems],
            "usable_cases": [c.case_id for c in self.usable],
        }


def check_site(site_dir: str | Path, profile: str | Path | None = None, min_cases_per_class: int | None = None,
               test_fraction: float = DEFAULT_TEST_FRACTION) -> SiteCheck:
    """Check every case of a site; raises SiteError/ProfileError when the site as a whole cannot be read.

    ``profile`` defaults to the site.yaml's, then ``default``; k is the larger of ``min_cases_per_class``
    (the federation's, default 5) and the site.yaml's own.
    """
    start = time.perf_counter()
    settings = site_settings(site_dir)
    prof = load_profile(profile or settings.get("profile") or "default")
    read = load_site(site_dir, prof.sequences)
    label_lookup(read.label_map, prof.regions)  # a bad label_map is a site error, not every case's
    k = max(min_cases_per_class or DEFAULT_MIN_CASES, int(settings.get("min_cases_per_class", 0)))
    block = site_floor(settings)  # release blocks hold the site's own k, whatever the run asks

    # Every case's files are checked, also those a repeated patient rules out: one pass shows every problem.
    broken: list[CaseProblem] = []
    for case in read.cases:
        absent = [(name, path) for name, path in (*case.images.items(), ("mask", case.mask)) if not path.exists()]
        if absent:  # all of them at once (the volume checks stop at the first)
            files = " and ".join(f"{name} file {path}" for name, path in absent)
            broken.append(CaseProblem(case.case_id, f"{files} {'is' if len(absent) == 1 else 'are'} missing",
                                      "fix the path(s) in the site's manifest/folder or restore the file(s)",
                                      kind="missing-file"))
            continue
        try:
            load_case_volumes(case.images, case.mask, prof.regions, MIN_REGION_VOXELS, read.label_map)
        except CaseInputError as exc:
            broken.append(CaseProblem(case.case_id, exc.reason, exc.fix, kind=exc.kind))
    site = one_row_per_patient(read)
    failed = {p.case_id for p in broken}
    usable = [c for c in site.cases if c.case_id not in failed]
    problems = [*site.problems, *broken]
    n_hgg = sum(c.diagnosis == "HGG" for c in usable)
    eligibility = eligibility_problem(n_hgg, len(usable) - n_hgg, k, test_fraction, block) if usable else None
    return SiteCheck(site, prof, k, test_fraction, usable, problems, eligibility, time.perf_counter() - start)


def write_report(check: SiteCheck, path: Path | None = None) -> Path:
    """Write the JSON report (default ``<output_dir>/check.json``) atomically; returns its path."""
    path = path or check.site.files.check
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(check.as_dict(), indent=2))
    return path


def render(check: SiteCheck, console: Any) -> None:
    """The check as rich tables: one row per problem case, then the counts and the verdict."""
    from rich.table import Table

    if check.problems:
        table = Table(title=f"site {check.site.name}: cases that cannot be used", title_justify="left")
        table.add_column("case", style="bold", no_wrap=True)
        table.add_column("problem")
        table.add_column("fix", style="green")
        per_case: dict[str, list[CaseProblem]] = {}
        for problem in check.problems:
            per_case.setdefault(problem.case_id, []).append(problem)
        # Paths relative to the site and data folders keep the rows readable (the JSON keeps them whole).
        roots = sorted({str(check.site.root), str(check.site.settings.get("data_root", check.site.root))},
                       key=len, reverse=True)

        def short(text: str) -> str:
            for root in roots:
                text = text.replace(root + os.sep, "")
            return text

        for case_id, items in per_case.items():
            table.add_row(case_id, short("; ".join(p.reason for p in items)), short("; ".join(p.fix for p in items)))
        console.print(table)

    counts = Table(title="counts", title_justify="left", show_header=False)
    counts.add_column("what")
    counts.add_column("n", justify="right")
    counts.add_row("cases", str(check.n_cases))
    counts.add_row("usable", str(len(check.usable)))
    for diagnosis, n in check.by_class.items():
        counts.add_row(f"  usable {diagnosis}", str(n))
    counts.add_row("cases with problems", str(len({p.case_id for p in check.problems})))
    for kind, n in check.problems_by_kind.items():
        counts.add_row(f"  {kind}", str(n))
    counts.add_row("k (min cases per class)", str(check.k))
    console.print(counts)
    style = {"ok": "bold green", "warnings": "bold yellow"}.get(check.status, "bold red")
    console.print(check.verdict, style=style, soft_wrap=True)
