"""A hospital's data as radfed sees it: the site folder, its optional ``site.yaml`` and its cases.

Site folder layout::

    <site>/site.yaml      optional, see SiteConfig (name, source, label_map, profile, ...)
    <site>/manifest.csv   source "manifest" (default): case_id,diagnosis,<one column per sequence>,mask
    <site>/labels.csv     sources "brats", "ucsf-bmsr" and "dicom": case_id,diagnosis (the image folders
                          carry none)
    <site>/.radfed/       what radfed keeps locally (``output_dir``): cache, reports, features; never sent

The cases themselves are read by the importers in ``client.importers``; image paths are relative to
``data_root`` (default: the site folder), CSV files to the site folder.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Case, CaseProblem, SiteError and DIAGNOSES live in client.cases, which the importers share (no import
# circle); re-exported here, where the rest of radfed imports them from.
from client import importers, runcache
from client.cases import DIAGNOSES as DIAGNOSES
from client.cases import Case, CaseProblem, SiteError
from client.sitefiles import SiteFiles
from common.protocol import DEFAULT_K

SOURCES = ("manifest", "brats", "ucsf-bmsr", "dicom")
BACKGROUND = "background"  # label_map target that drops a source label (e.g. a resection cavity)


@dataclass
class Site:
    """A site's usable-looking cases (not yet checked image by image) and the rows it could not import.

    ``work_dir`` is the site's ``output_dir`` (default ``<root>/.radfed``); ``label_map`` maps the
    source's mask labels to profile region names (None: the masks already use the profile's numbering).
    """

    name: str
    root: Path
    cases: list[Case]
    problems: list[CaseProblem] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    work_dir: Path = None  # type: ignore[assignment]  # filled in by __post_init__
    label_map: dict[int, str] | None = None

    def __post_init__(self) -> None:
        if self.work_dir is None:
            self.work_dir = self.root / ".radfed"

    @property
    def files(self) -> SiteFiles:
        """Every local file of the site, by name (client.sitefiles)."""
        return SiteFiles(self.work_dir)


class SiteConfig(BaseModel):
    """``site.yaml``. Every key is optional; unknown keys are refused so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, min_length=1)
    data_root: Path | None = None
    source: Literal["manifest", "brats", "ucsf-bmsr", "dicom"] = "manifest"
    manifest: str = "manifest.csv"
    labels_csv: str = "labels.csv"
    # profile sequence -> file suffix (BraTS, e.g. flair: t2f; UCSF-BMSR, e.g. t1c: T1post) or sub-folder name (DICOM)
    sequence_names: dict[str, str] = Field(default_factory=dict)
    mask_name: str | None = None  # BraTS / UCSF-BMSR suffix or DICOM entry of the mask; default "seg" / "mask"
    label_map: dict[int, str] | None = None
    min_cases_per_class: int | None = Field(None, ge=1, strict=True)  # strict: 'true' is not 1
    profile: str | None = None
    output_dir: Path | None = None
    # development only: run any plan without approval (every run then logs a warning at both ends)
    require_approval: bool = Field(True, strict=True)
    # also write every array's values (not only shape and sha256) to the outbox: for audits; large
    outbox_values: bool = Field(False, strict=True)
    # the site's own cap on the differential privacy its model updates and noised query releases may spend,
    # together, over all runs (one case changed, zCDP composed, converted at dp_budget_delta); with a cap, updates
    # and the moments, correlation and Newton queries without DP noise are refused
    dp_budget_epsilon: float | None = Field(None, gt=0)
    dp_budget_delta: float = Field(1e-5, gt=0, lt=1)


# What a correct line looks like, for the fix in error messages.
_EXAMPLES = {
    "name": "name: hospital-a",
    "data_root": "data_root: /data/brats2023",
    "source": "source: brats",
    "manifest": "manifest: manifest.csv",
    "labels_csv": "labels_csv: labels.csv",
    "sequence_names": "sequence_names: {flair: t2f}",
    "mask_name": "mask_name: seg",
    "label_map": "label_map: {3: enhancing, 1: necrosis, 2: edema}",
    "min_cases_per_class": "min_cases_per_class: 5",
    "profile": "profile: default",
    "output_dir": "output_dir: /var/lib/radfed/hospital-a",
    "require_approval": "require_approval: true",
    "outbox_values": "outbox_values: false",
    "dp_budget_epsilon": "dp_budget_epsilon: 8.0",
    "dp_budget_delta": "dp_budget_delta: 1e-5",
}


_PROBLEMS = {  # pydantic error type -> plain words
    "string_type": "must be text",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "dict_type": "must be a mapping (key: value)",
    "path_type": "must be a path",
    "string_too_short": "must not be empty",
    "bool_type": "must be true or false",
}


def _error_sentence(error: Any) -> str:
    """One plain sentence (problem: fix) for one pydantic error."""
    loc = [str(p) for p in error["loc"] if p != "[key]"]  # pydantic marks dict-key errors with "[key]"
    key = loc[0] if loc else "?"
    where = ".".join(loc) if loc else "the file"
    value = error.get("input")
    kind = error["type"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(key, list(SiteConfig.model_fields), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return (f"unknown key '{key}': {hint}remove it or fix its spelling "
                f"(allowed keys: {', '.join(SiteConfig.model_fields)}).")
    if kind == "literal_error":
        return f"'{where}' is {value!r}, which is not one of {', '.join(SOURCES)}: write e.g. '{_EXAMPLES[key]}'."
    if len(loc) > 1 and loc[0] == "label_map" and "[key]" in [str(p) for p in error["loc"]]:
        problem = "is a source label that is not a whole number"
    elif kind == "greater_than_equal":
        problem = f"must be at least {error.get('ctx', {}).get('ge')}"
    else:
        problem = _PROBLEMS.get(kind, str(error["msg"]).rstrip(".").lower())
    return f"'{where}' {problem} (got {value!r}): write it like '{_EXAMPLES.get(key, key + ': ...')}'."


def load_site_config(root: str | Path) -> SiteConfig:
    """The site's ``site.yaml`` validated (defaults when there is none); raises SiteError naming each bad field."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise SiteError(f"site folder {root} does not exist: check the site path (node config 'site-dir')")
    path = root / "site.yaml"
    if not path.exists():
        return SiteConfig()
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SiteError(f"{path} is not valid YAML ({exc}): fix the syntax") from exc
    if doc is None:
        return SiteConfig()
    if not isinstance(doc, dict):
        raise SiteError(f"{path} must be a mapping of keys to values (e.g. 'name: hospital-a')")
    try:
        return SiteConfig.model_validate(doc)
    except ValidationError as exc:
        sentences = " ".join(_error_sentence(e) for e in exc.errors())
        raise SiteError(f"{path}: {sentences}") from None


def resolved_paths(root: Path, config: SiteConfig) -> tuple[Path, Path]:
    """(data_root, output_dir) as absolute paths; relative ones are taken from the site folder."""
    def absolute(value: Path | None, default: Path) -> Path:
        if value is None:
            return default
        value = value.expanduser()
        return (value if value.is_absolute() else root / value).resolve()

    return absolute(config.data_root, root), absolute(config.output_dir, root / ".radfed")


def site_settings(root: str | Path) -> dict[str, Any]:
    """The validated ``site.yaml`` as a dict of the keys that have a value (paths resolved); read again whenever
    site.yaml or the folder changes (client.runcache)."""
    root = runcache.resolved(root)
    return dict(runcache.remember("settings", str(root), lambda: _settings(root, load_site_config(root)),
                                  lambda _: [root, root / "site.yaml"]))


def site_floor(settings: dict[str, Any]) -> int:
    """The site's own k (site.yaml ``min_cases_per_class``, never below the protocol's default): every reply
    and the release blocks hold at least this many patients, whatever a run plan says."""
    return max(DEFAULT_K, int(settings.get("min_cases_per_class", DEFAULT_K)))


def site_files(root: str | Path) -> SiteFiles:
    """The local files of the site folder ``root`` (under its output_dir)."""
    return SiteFiles(work_dir(root))


def work_dir(root: str | Path) -> Path:
    """Where radfed keeps this site's local files (``output_dir``, default ``<site>/.radfed``): cache,
    reports, outbox, receipts, harmonisation parameters. Nothing in it is ever sent."""
    return Path(site_settings(root)["output_dir"])


def _settings(root: Path, config: SiteConfig) -> dict[str, Any]:
    data_root, output_dir = resolved_paths(root, config)
    settings = config.model_dump(exclude_none=True)
    settings.update(data_root=data_root, output_dir=output_dir)
    return settings


def load_site(root: str | Path, sequences: tuple[str, ...]) -> Site:
    """Read a site folder with the importer its ``source`` names.

    Problems with single cases become CaseProblems and the other cases survive; a case id seen twice
    keeps its first occurrence.
    """
    root = Path(root).expanduser().resolve()
    config = load_site_config(root)
    data_root, output_dir = resolved_paths(root, config)
    if not data_root.is_dir():
        raise SiteError(f"data_root {data_root} (site.yaml) does not exist: fix 'data_root' in {root / 'site.yaml'}")
    if config.source == "manifest":
        items = importers.import_manifest(data_root, root / config.manifest, sequences)
    else:
        layout = {"brats": importers.import_brats, "ucsf-bmsr": importers.import_ucsf_bmsr,
                  "dicom": importers.import_dicom}[config.source]
        items = layout(data_root, root / config.labels_csv, sequences, names=config.sequence_names,
                       mask_name=config.mask_name, skip=(output_dir,))

    cases: list[Case] = []
    problems: list[CaseProblem] = []
    seen: dict[str, Case] = {}
    conflicting: set[str] = set()
    for item in items:
        if isinstance(item, CaseProblem):
            problems.append(item)
        elif item.case_id in seen and item.diagnosis == seen[item.case_id].diagnosis:
            # named as a row of its own: the first row of that id stays usable, so the totals add up
            problems.append(CaseProblem(f"{item.case_id} (again)", f"case_id {item.case_id} listed again in "
                                        f"{config.source}; the first row is used",
                                        f"remove the repeated row of {item.case_id}", kind="duplicate-id"))
        elif item.case_id in seen:
            if item.diagnosis != seen[item.case_id].diagnosis:  # which one is right is unknown: use neither
                conflicting.add(item.case_id)
                problems.append(CaseProblem(item.case_id, f"case_id listed twice in {config.source} with different "
                                            f"diagnoses ({seen[item.case_id].diagnosis} and {item.diagnosis})",
                                            "check the diagnosis and keep one row per patient",
                                            kind="conflicting-diagnosis"))
        else:
            seen[item.case_id] = item
            cases.append(item)
    cases = [c for c in cases if c.case_id not in conflicting]
    return Site(name=config.name or root.name, root=root, cases=cases, problems=problems,
                settings=_settings(root, config),
                work_dir=output_dir, label_map=dict(config.label_map) if config.label_map is not None else None)
