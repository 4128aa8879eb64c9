"""Radiomics extraction at a site: real pyradiomics per case x sequence x region, cached per case.

The cache lives in ``<site>/.radfed/cache/<profile-hash>/``; an entry is reused only when the sha256 of
every input file, the profile hash and the pyradiomics version all match, so a re-run only extracts
what changed. Nothing here leaves the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from client.checks import CaseInputError, load_case_volumes
from client.site import Case, CaseProblem, Site
from common.profile import Profile

log = logging.getLogger("flwr.radfed.extract")
MIN_REGION_VOXELS = 20


@dataclass
class FeatureTable:
    """Features of a site's usable cases.

    Attributes:
        case_ids: n case ids, in manifest order.
        labels: (n,) int array, 1 = HGG, 0 = BM.
        names: d feature names ``<sequence>/<region>/<pyradiomics key>`` (shape: ``shape/<region>/...``).
        values: (n, d) float64 array.
        problems: cases that could not be used, each with reason and fix.
    """

    case_ids: list[str]
    labels: np.ndarray
    names: list[str]
    values: np.ndarray
    problems: list[CaseProblem] = field(default_factory=list)

    def columns(self, names: list[str]) -> np.ndarray:
        """The (n, len(names)) sub-matrix in the order given."""
        index = {n: i for i, n in enumerate(self.names)}
        return self.values[:, [index[n] for n in names]]


def pyradiomics_version() -> str:
    import radiomics

    return str(radiomics.__version__)


def quiet_pyradiomics() -> None:
    """pyradiomics installs its own stderr handler and warns per call; keep the user's terminal clean."""
    import radiomics

    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    logging.getLogger("pykwalify").setLevel(logging.WARNING)


_EXTRACTORS: dict[str, tuple[object, object]] = {}


def _extractors(profile: Profile) -> tuple[object, object]:
    """(with shape, without shape) extractors for a profile, built once per process."""
    if profile.sha256 not in _EXTRACTORS:
        from radiomics.featureextractor import RadiomicsFeatureExtractor

        quiet_pyradiomics()
        with_shape = RadiomicsFeatureExtractor(json.loads(json.dumps(profile.params)))
        without_shape = RadiomicsFeatureExtractor(json.loads(json.dumps(profile.params)))
        without_shape.enableFeatureClassByName("shape", enabled=False)
        _EXTRACTORS[profile.sha256] = (with_shape, without_shape)
    return _EXTRACTORS[profile.sha256]


def extract_case_features(case: Case, profile: Profile) -> dict[str, float]:
    """All features of one case; raises CaseInputError (bad input) or ValueError (pyradiomics)."""
    volumes, mask = load_case_volumes(case.images, case.mask, profile.regions, MIN_REGION_VOXELS)
    with_shape, without_shape = _extractors(profile)
    features: dict[str, float] = {}
    for seq in profile.sequences:
        extractor = with_shape if seq == profile.shape_from else without_shape
        for region, label in profile.regions.items():
            try:
                result = extractor.execute(volumes[seq], mask, label=label)
            except (ValueError, RuntimeError) as exc:  # name where it failed: pyradiomics does not
                raise type(exc)(f"{seq} / {region} (label {label}): {exc}") from exc
            for key, value in result.items():
                if key.startswith("diagnostics_"):
                    continue
                prefix = "shape" if "_shape_" in key else seq
                features[f"{prefix}/{region}/{key}"] = float(value)
    return features


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _input_hashes(case: Case) -> dict[str, str]:
    paths = {**{seq: p for seq, p in case.images.items()}, "mask": case.mask}
    return {key: file_sha256(p) if p.exists() else "missing" for key, p in paths.items()}


def _cache_file(site: Site, profile: Profile, case_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)
    tag = hashlib.sha256(case_id.encode()).hexdigest()[:8]
    return site.work_dir / "cache" / profile.short_hash / f"{safe}-{tag}.json"


def _extract_one(args: tuple[Case, Profile, str]) -> tuple[str, dict[str, float] | None, CaseProblem | None, float]:
    case, profile, _ = args
    quiet_pyradiomics()
    start = time.perf_counter()
    try:
        features = extract_case_features(case, profile)
        return case.case_id, features, None, time.perf_counter() - start
    except CaseInputError as exc:
        return case.case_id, None, CaseProblem(case.case_id, exc.reason, exc.fix), time.perf_counter() - start
    except (ValueError, RuntimeError) as exc:
        problem = CaseProblem(case.case_id, f"pyradiomics failed on {exc}",
                              "check that region's segmentation: after resampling to the profile's spacing it "
                              "must keep the profile's minimum ROI size")
        return case.case_id, None, problem, time.perf_counter() - start


@dataclass
class ExtractionSummary:
    extracted: int
    cached: int
    failed: int
    seconds: float
    seconds_per_extracted_case: float


def extract_site(site: Site, profile: Profile, workers: int = 1,
                 progress: Callable[[int, int], None] | None = None) -> tuple[FeatureTable, ExtractionSummary]:
    """Extract (or load from cache) every case of a site under a profile.

    Returns the feature table of all usable cases (manifest order) and a summary; every case that
    failed is in ``table.problems`` and in ``<site>/.radfed/errors.json`` with reason and fix.
    """
    start = time.perf_counter()
    version = pyradiomics_version()
    results: dict[str, dict[str, float]] = {}
    problems = list(site.problems)
    todo: list[Case] = []
    hashes: dict[str, dict[str, str]] = {}
    for case in site.cases:
        hashes[case.case_id] = _input_hashes(case)
        cached = _read_cache(_cache_file(site, profile, case.case_id), hashes[case.case_id], profile, version)
        if isinstance(cached, CaseProblem):
            problems.append(cached)  # failures are cached too: same inputs, same failure
        elif cached is not None:
            results[case.case_id] = cached
        else:
            todo.append(case)

    extract_seconds = 0.0
    jobs = [(case, profile, version) for case in todo]
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) if workers > 1 and len(jobs) > 1 else \
            nullcontext() as pool:
        outcomes = pool.map(_extract_one, jobs) if pool is not None else map(_extract_one, jobs)
        for done, (case_id, features, problem, seconds) in enumerate(outcomes, start=1):
            if progress:
                progress(done, len(jobs))
            extract_seconds += seconds
            if problem is not None:
                log.warning("case %s not used: %s (fix: %s)", case_id, problem.reason, problem.fix)
                problems.append(problem)
            else:
                assert features is not None
                results[case_id] = features
            _write_cache(_cache_file(site, profile, case_id), {
                "case_id": case_id, "inputs": hashes[case_id], "profile_sha256": profile.sha256,
                "pyradiomics": version, "features": features, "problem": problem and problem.as_dict()})

    usable = [c for c in site.cases if c.case_id in results]
    names = _common_names([results[c.case_id] for c in usable])
    values = np.array([[results[c.case_id].get(n, np.nan) for n in names] for c in usable], dtype=np.float64)
    table = FeatureTable(
        case_ids=[c.case_id for c in usable],
        labels=np.array([c.label for c in usable], dtype=np.int64),
        names=names,
        values=values.reshape(len(usable), len(names)),
        problems=problems,
    )
    summary = ExtractionSummary(
        extracted=sum(1 for c in todo if c.case_id in results),
        cached=len(site.cases) - len(todo),
        failed=len(problems),
        seconds=time.perf_counter() - start,
        seconds_per_extracted_case=extract_seconds / len(todo) if todo else 0.0,
    )
    _write_report(site, profile, version, table, summary)
    return table, summary


def _write_cache(path: Path, entry: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a killed run never leaves half an entry


def _read_cache(path: Path, inputs: dict[str, str], profile: Profile,
                version: str) -> dict[str, float] | CaseProblem | None:
    """The cached features or failure of a case, or None when absent or made with other inputs."""
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if entry.get("inputs") != inputs or entry.get("profile_sha256") != profile.sha256 \
            or entry.get("pyradiomics") != version:
        return None
    if entry.get("problem"):
        return CaseProblem(**entry["problem"])
    return {k: float(v) for k, v in entry["features"].items()}


def _common_names(rows: list[dict[str, float]]) -> list[str]:
    if not rows:
        return []
    names = set(rows[0])
    for row in rows[1:]:
        names &= set(row)
    return sorted(names)


def _write_report(site: Site, profile: Profile, version: str, table: FeatureTable,
                  summary: ExtractionSummary) -> None:
    """The site's local record of what was extracted and what failed (never sent)."""
    site.work_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "site": site.name,
        "profile": {"name": profile.name, "version": profile.version, "sha256": profile.sha256},
        "pyradiomics": version,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "cases_in_manifest": len(site.cases) + len(site.problems),
        "cases_used": len(table.case_ids),
        "features": len(table.names),
        "extracted": summary.extracted,
        "cached": summary.cached,
        "problems": [p.as_dict() for p in table.problems],
    }
    (site.work_dir / "errors.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
