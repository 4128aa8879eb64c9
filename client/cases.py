"""The data types a site's cases are made of, shared by ``client.site`` and ``client.importers``.

They live here, not in ``client.site``, so that the importers (which build them) and the site loader
(which runs the importers) can both import them without importing each other. ``client.site`` re-exports
them: ``from client.site import Case, CaseProblem, SiteError`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DIAGNOSES = {"HGG": 1, "BM": 0}  # positive class = high-grade glioma


class SiteError(ValueError):
    """The site as a whole cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Case:
    case_id: str
    diagnosis: str
    images: dict[str, Path]  # sequence -> NIfTI/NRRD file or DICOM series folder
    mask: Path
    # the manifest's (or labels.csv's) other columns, as written, e.g. {"age": "63", "sex": "F"}: ComBat
    # covariates when the run names them (common.covariates); they never leave the site
    covariates: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> int:
        return DIAGNOSES[self.diagnosis]


@dataclass(frozen=True)
class CaseProblem:
    """One case that radfed could not use, and what to do about it.

    ``kind`` is a short stable tag (e.g. ``missing-file``, ``not-co-registered``) for counting problems.
    """

    case_id: str
    reason: str
    fix: str
    kind: str = "other"

    def as_dict(self) -> dict[str, str]:
        return {"case_id": self.case_id, "reason": self.reason, "fix": self.fix, "kind": self.kind}
