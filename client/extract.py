"""Radiomics extraction at a site: real pyradiomics per case x sequence x region, cached per case.

pyradiomics gets each image exactly as SimpleITK reads it from the site's file (its stored pixel type), so a
site's features equal bare pyradiomics run on the same files with the profile's settings.

Everything is written under the site's ``output_dir`` (default ``<site>/.radfed``), and nothing here
leaves the site:

- ``cache/<profile-hash>/``: one entry per case, reused only when the sha256 of every input file, the
  label map, the profile hash and the pyradiomics version all match, so a re-run only extracts what changed
  (the reuse rules: ``client.featurecache``);
- ``features-<profile-hash-12>.csv`` with a ``.json`` sidecar (provenance: profile hash, pyradiomics
  version, time, case ids, labels, input hashes);
- ``extraction.log``: pyradiomics' own log and one line per case, so the terminal stays clean;
- ``errors.json``: every case not used, with reason and fix.

Every file is written through a unique temporary file and ``os.replace`` (``client.sitefiles``), so
concurrent runs on one site never fail or leave half a file. With ``workers > 1`` the worker processes never
outlive the extraction (``client.workerpool``).
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from client.checks import MIN_REGION_VOXELS, CaseInputError, label_lookup, load_case_volumes
from client.featurecache import cache_file, new_entry, read_cache, write_cache
from client.featurefiles import features_path, save_features
from client.inputhashes import input_hashes as _input_hashes
from client.inputhashes import input_sha256, recall, record
from client.site import Case, CaseProblem, Site
from client.sitefiles import write_json_unless_same
from client.workerpool import itk_worker, worker_pool
from common.profile import Profile

__all__ = ["MIN_REGION_VOXELS", "ExtractionSummary", "FeatureTable", "extract_case_features", "extract_site",
           "features_path", "input_sha256"]

log = logging.getLogger("flwr.radfed.extract")  # shown by Flower on the node's console
# One line per case and pyradiomics' own messages go to <output_dir>/extraction.log only.
file_log = logging.getLogger("radfed.extraction")


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
        index = self.index
        return self.values[:, [index[n] for n in names]]

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Each feature name's column (made at the first use: a site's table serves every message of a run)."""
        return {n: i for i, n in enumerate(self.names)}


@functools.cache
def pyradiomics_version() -> str:
    """pyradiomics' ``__version__``, read from its ``_version.py`` alone when the package is not loaded yet:
    importing pyradiomics (~0.3 s) only for its version cost every simulation worker that much at its first plan
    and features replies, though a site answering from its cache never extracts."""
    if "radiomics" not in sys.modules:
        with suppress(Exception):  # any surprise: the import below says it as it always did
            return _version_file_only()
    import radiomics

    return str(radiomics.__version__)


def _version_file_only() -> str:
    """``radiomics._version.get_versions()['version']`` (what ``radiomics.__version__`` is set from) without
    running ``radiomics/__init__.py``."""
    import importlib.util

    spec = importlib.util.find_spec("radiomics")  # finding a top-level package does not run it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("radiomics is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "_version.py"
    loaded = importlib.util.spec_from_file_location("_radfed_radiomics_version", path)
    if loaded is None or loaded.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return str(module.get_versions()["version"])


def quiet_pyradiomics() -> None:
    """pyradiomics installs its own stderr handler and warns per call: silence that handler and keep its
    warnings for extraction.log (attached by ``_log_to``), away from the user's terminal. Not loaded yet, it is
    not loaded for this (~0.2 s at every simulation worker's first look at a site answered from its cache): the
    code that loads it to extract (``_extractors``) calls this again."""
    file_log.setLevel(logging.INFO)
    file_log.propagate = False
    if "radiomics" not in sys.modules:
        return
    import radiomics

    radiomics.setVerbosity(60)  # pyradiomics' "quiet": its stderr handler prints nothing
    logger = logging.getLogger("radiomics")
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # a host app's root handler (Flower, pytest) would print them again
    logging.getLogger("pykwalify").setLevel(logging.WARNING)


def _ensure_log_handler(path: Path) -> logging.Handler | None:
    """Attach a file handler for ``path`` to pyradiomics' and radfed's extraction loggers, once per process.

    Returns the handler when this call attached it (the caller removes it), None when one was there
    already (e.g. inherited by a forked worker).
    """
    target = str(path.resolve())
    for handler in file_log.handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == target:
            return None
    handler = logging.FileHandler(target, encoding="utf-8")  # append: O_APPEND keeps worker lines whole
    handler.setFormatter(logging.Formatter("%(asctime)s pid=%(process)d %(name)s %(levelname)s %(message)s"))
    for logger in (file_log, logging.getLogger("radiomics")):
        logger.addHandler(handler)
    return handler


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet_pyradiomics()
    handler = _ensure_log_handler(path)
    try:
        yield
    finally:
        if handler is not None:
            for logger in (file_log, logging.getLogger("radiomics")):
                logger.removeHandler(handler)
            handler.close()


def _init_worker(log_path: str, parent: int) -> None:
    """Worker start-up: die with the parent, leave SIGINT to it, one ITK thread (``itk_worker``), quiet pyradiomics,
    log to the site's file."""
    itk_worker(1, parent)
    quiet_pyradiomics()
    _ensure_log_handler(Path(log_path))


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


# What a failing sequence/region gives: another pyradiomics result, None (left out), or it raises.
OnError = Callable[[Any, str, str, int, Exception], Mapping[str, Any] | None]


def _named(extractor: Any, seq: str, region: str, label: int, exc: Exception) -> None:
    raise type(exc)(f"{seq} / {region} (label {label}): {exc}") from exc  # pyradiomics does not say where


def extract_volumes(profile: Profile, volumes: Mapping[str, Any], mask: Any,
                    on_error: OnError = _named) -> dict[str, float]:
    """Every sequence x region of one loaded (or perturbed) case through pyradiomics, as
    ``<sequence, or shape>/<region>/<pyradiomics key>``; shape features from ``profile.shape_from`` only.
    ``on_error(extractor, sequence, region, label, exc)`` decides a failing pair (default: raise, named)."""
    with_shape, without_shape = _extractors(profile)
    features: dict[str, float] = {}
    for seq in profile.sequences:
        extractor = with_shape if seq == profile.shape_from else without_shape
        for region, label in profile.regions.items():
            try:
                result = extractor.execute(volumes[seq], mask, label=label)  # type: ignore[attr-defined]
            except (ValueError, RuntimeError) as exc:
                result = on_error(extractor, seq, region, label, exc)
                if result is None:
                    continue
            for key, value in result.items():
                if not key.startswith("diagnostics_"):
                    features[f"{'shape' if '_shape_' in key else seq}/{region}/{key}"] = float(value)
    return features


def extract_case_features(case: Case, profile: Profile,
                          label_map: Mapping[int, str] | None = None) -> dict[str, float]:
    """All features of one case; raises CaseInputError (bad input) or ValueError (pyradiomics).

    ``label_map`` (the site's source label -> region name) relabels the mask as it is read.
    """
    volumes, mask = load_case_volumes(case.images, case.mask, profile.regions, MIN_REGION_VOXELS, label_map)
    return extract_volumes(profile, volumes, mask)


Job = tuple[Case, Profile, dict[int, str] | None]


def _extract_one(args: Job) -> tuple[str, dict[str, float] | None, CaseProblem | None, float]:
    case, profile, label_map = args
    start = time.perf_counter()
    try:
        features = extract_case_features(case, profile, label_map)
        seconds = time.perf_counter() - start
        file_log.info("case %s: %d features in %.2fs", case.case_id, len(features), seconds)
        return case.case_id, features, None, seconds
    except CaseInputError as exc:
        problem = CaseProblem(case.case_id, exc.reason, exc.fix, kind=exc.kind)
    except (ValueError, RuntimeError) as exc:
        problem = CaseProblem(case.case_id, f"pyradiomics failed on {exc}",
                              "check that region's segmentation: after resampling to the profile's spacing it "
                              "must keep the profile's minimum ROI size", kind="pyradiomics")
    file_log.warning("case %s not used: %s (fix: %s)", case.case_id, problem.reason, problem.fix)
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

    Returns the feature table of all usable cases (site order) and a summary; every case that failed
    is in ``table.problems`` and in ``<output_dir>/errors.json`` with reason and fix. ``progress(done,
    total)`` is called after each case that is not in the cache. Also writes the features CSV with its
    provenance sidecar and appends to ``<output_dir>/extraction.log``.
    """
    start = time.perf_counter()
    label_lookup(site.label_map, profile.regions)  # a bad label_map is the site's error, not each case's
    version = pyradiomics_version()
    results: dict[str, dict[str, float]] = {}
    problems = list(site.problems)
    todo: list[Case] = []
    hashes: dict[str, dict[str, str]] = {}
    extract_seconds = 0.0
    log_path = site.files.extraction_log
    recall(site)  # the input hashes the site recorded: only files changed since are hashed again
    with _log_to(log_path):  # from here on: a bad cache entry is logged too
        for case in site.cases:
            hashes[case.case_id] = _input_hashes(case, site.label_map)
            cached = read_cache(cache_file(site, profile, case.case_id), hashes[case.case_id], profile, version,
                                 case)
            if isinstance(cached, CaseProblem):
                problems.append(cached)  # failures are cached too: same inputs, same failure
            elif cached is not None:
                results[case.case_id] = cached
            else:
                todo.append(case)

        jobs: list[Job] = [(case, profile, site.label_map) for case in todo]
        parallel = workers > 1 and len(jobs) > 1
        file_log.info("site %s: %d case(s), %d from the cache, %d to extract (profile %s, pyradiomics %s, "
                      "%d worker(s))", site.name, len(site.cases), len(site.cases) - len(todo), len(todo),
                      profile.short_hash, version, min(workers, len(jobs)) if parallel else 1)
        pool_cm = worker_pool(min(workers, len(jobs)), _init_worker, (str(log_path),)) if parallel else nullcontext()
        with pool_cm as pool:
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
                write_cache(cache_file(site, profile, case_id),
                            new_entry(case_id, hashes[case_id], profile, version, features, problem))

        usable = [c for c in site.cases if c.case_id in results]
        names = _common_names([results[c.case_id] for c in usable])
        # every usable case holds every name (their intersection); one name: a value per case, reshaped below
        row = operator.itemgetter(*names) if names else (lambda _: ())
        values = np.array([row(results[c.case_id]) for c in usable], dtype=np.float64)
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
        save_features(site, profile, version, table, {c.case_id: hashes[c.case_id] for c in usable})
        record(site, [p for c in site.cases for p in (*c.images.values(), c.mask) if not p.is_dir()])
        file_log.info("site %s: %d usable, %d extracted now, %d cached, %d problem(s), %.1fs", site.name,
                      len(usable), summary.extracted, summary.cached, summary.failed, summary.seconds)
    return table, summary


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
        "cases_in_manifest": len(site.cases) + len(site.problems),  # kept for readers of the old report
        "cases_in_site": len(site.cases) + len(site.problems),
        "cases_used": len(table.case_ids),
        "features": len(table.names),
        "extracted": summary.extracted,
        "cached": summary.cached,
        "features_csv": features_path(site, profile).name,
        "problems": [p.as_dict() for p in table.problems],
    }
    write_json_unless_same(site.files.errors, report, "finished")
