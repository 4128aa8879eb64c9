"""A site's data for a run, as plain Python: where the site is, its usable cases, one row per patient, split
by whole release blocks (a held-out split, or cross-validation folds), the case sets each part covers, and the
matrices the handlers compute on (client.compute). Whether a run plan can run here is judged from the
manifest alone (``plan_reply``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from client import level_groups, patients, runcache
from client.extract import FeatureTable, extract_site, pyradiomics_version
from client.featurecache import cache_file
from client.ledger import Blocking, Declaration, Ledger, in_batch
from client.matrices import (  # noqa: F401
    Harmonizer,
    has_clinical,
    names_sha256,
    radiomics_columns,
    radiomics_names,
    site_matrix,
    training_moments,
)
from client.site import CaseProblem, Site, SiteError, load_site, site_floor, site_settings
from client.sitefiles import atomic_write
from common import covariates as cov
from common.profile import Profile, load_profile, resolve_profile_path
from common.protocol import PROTOCOL_VERSION
from common.runconfig import RunConfig, parse
from common.split import cv_tag, eligibility_problem, parse_cv_tag, split_problem


def run_config(values: RunConfig | Mapping[str, Any]) -> RunConfig:
    """The run's validated config (Flower hands each message the raw table; tests and benches may pass the
    parsed one), validated once per table. Raises RunConfigError naming a bad key.

    A message asks about a dozen times (mods, handler, guard) with the same table: looked up once per message or
    batch (client.runcache.in_look), since sorting and hashing its ~100 items each time was a visible share of a
    batched sub-request."""
    if isinstance(values, RunConfig):
        return values
    return runcache.in_look(("run-config", id(values)), values, lambda: _validated(values))


def _validated(values: Mapping[str, Any]) -> RunConfig:
    try:
        return _parsed(tuple(sorted(values.items())))
    except TypeError:  # an unhashable value (not TOML's): parse names it
        return parse(values)


@functools.lru_cache(maxsize=64)
def _parsed(items: tuple) -> RunConfig:
    return parse(dict(items))  # a RunConfig is frozen: one per raw table serves every message


def locate_site(node_config: Mapping[str, Any], run: RunConfig) -> Path:
    """The site folder: ``site-dir`` from the node config (deployment), else the partition's folder
    under the run config's ``data-root`` (simulation: sorted folders holding a manifest.csv or a site.yaml,
    one per partition)."""
    # asked about eight times per message (mods, handler, guard): found once per message or batch
    return runcache.in_look(("site-dir", id(node_config), run.data_root), node_config,
                            lambda: _locate(node_config, run))


def _locate(node_config: Mapping[str, Any], run: RunConfig) -> Path:
    if "site-dir" in node_config:
        return Path(str(node_config["site-dir"])).expanduser()
    if "partition-id" not in node_config:
        raise SiteError("this node has no 'site-dir' in its node config: start the SuperNode with "
                        "--node-config \"site-dir='/path/to/site'\"")
    root = Path(run.data_root).expanduser()
    if not root.is_dir():
        raise SiteError(f"data-root {root} does not exist: generate the demo with 'radfed demo' or set "
                        "--run-config \"data-root='/path'\"")
    # listed once per process while the folder's own entries stay the same (client.runcache watches data-root):
    # every message asks several times, and at 1,000 simulated sites each listing stats 1,000 folders
    sites = runcache.remember("site-folders", str(runcache.resolved(root)), lambda: _site_folders(root),
                              lambda _: [root])
    pid = int(node_config["partition-id"])  # type: ignore[arg-type]
    if pid >= len(sites):
        raise SiteError(f"simulated node {pid} has no site: {root} holds {len(sites)} site folder(s); "
                        f"run with num-supernodes={len(sites)}")
    return sites[pid]


def _site_folders(root: Path) -> list[Path]:
    """The simulated sites under ``root``: sorted folders holding a manifest.csv or a site.yaml."""
    return sorted(p for p in root.iterdir() if (p / "manifest.csv").exists() or (p / "site.yaml").exists())


PARTS = ("train", "test", "all")  # the splits a reply can aggregate over; each also by class ("-hgg", "-bm")


@dataclass
class SiteData:
    site: Site
    profile: Profile
    table: FeatureTable
    held_out: np.ndarray  # (n,) bool over table rows
    covariates: np.ndarray | None = None  # (n, p) ComBat covariate design over table rows, when the run has any
    blocking: Blocking | None = None  # the release blocks the rows are drawn from (client.ledger)
    cv_fold: np.ndarray | None = None  # (repeats, n) int: each row's fold per repeat (internal-validation = "cv")
    clinical: np.ndarray | None = None  # (n, pc) the model-covariates' coded columns over table rows, when any
    clinical_names: tuple[str, ...] = ()  # their input names (clinical/age, clinical/sex=M), pc of them
    # each part's case sets, worked out once per split (a batch's sub-requests share one split; fold_view makes anew)
    _sets: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def fold_view(self, fold: str) -> SiteData:
        """The data as cohort ``fold`` sees it: for a cross-validation fold ("cv:<repeat>:<v>"), that repeat's fold v
        is held out and its other folds train; any other cohort (main, leave-one-site-out, local-only) uses the
        run's split."""
        if not fold.startswith("cv:"):
            return self
        where = parse_cv_tag(fold)
        if self.cv_fold is None or where is None or where[0] >= len(self.cv_fold):
            raise SiteError(f"the server asked for cross-validation fold {fold}, which this run's internal "
                            "validation does not have here; restart the run")
        return replace(self, held_out=self.cv_fold[where[0]] == where[1])

    def cv_tags(self) -> list[str]:
        """Every cross-validation fold's cohort tag ([] without cross-validation)."""
        if self.cv_fold is None:
            return []
        return [cv_tag(r, int(v)) for r in range(len(self.cv_fold)) for v in np.unique(self.cv_fold[r]) if v >= 0]

    def rows(self, part: str) -> np.ndarray:
        """(n,) bool: the rows of ``part`` (train, test or all)."""
        return {"train": ~self.held_out, "test": self.held_out, "all": np.ones_like(self.held_out)}[part]

    def case_sets(self, part: str) -> dict[str, frozenset[str]]:
        """The case ids of ``part`` and of its classes: {part, part-hgg, part-bm}."""
        sets = self._sets.get(part)
        if sets is None:
            rows, ids = self.rows(part), np.array(self.table.case_ids, dtype=object)
            y = self.table.labels
            sets = {part: frozenset(ids[rows]), f"{part}-hgg": frozenset(ids[rows & (y == 1)]),
                    f"{part}-bm": frozenset(ids[rows & (y == 0)])}
            self._sets[part] = sets
        return dict(sets)

    def declare(self, part: str, counts: Mapping[str, str], groups: Mapping[str, frozenset[str]] | None = None,
                ) -> Declaration:
        """What a reply over ``part`` aggregates: its class sets, ``groups`` (covariate levels), and which set
        each count key counts (``counts``: count key -> "" for the part, "hgg" or "bm" for a class)."""
        sets = {**self.case_sets(part), **(groups or {})}
        return Declaration(sets, {key: f"{part}-{cls}" if cls else part for key, cls in counts.items()},
                           self.blocking)


def open_site(site_dir: Path, profile_name: str) -> tuple[Site, Profile]:
    """The site's cases, one row per patient (duplicates named, see client.patients), and its profile."""
    settings = site_settings(site_dir)
    profile = load_profile(str(settings.get("profile") or profile_name))
    return patients.one_row_per_patient(load_site(site_dir, profile.sequences)), profile


def min_cases(site: Site, run: RunConfig) -> int:
    """k for each reply: the federation's minimum, raised (never lowered) by the site's own floor."""
    return max(run.min_cases_per_class, site_floor(site.settings))


def ledger(site: Site) -> Ledger:
    """The site's release ledger (blocks of the site's own k, at ``<output_dir>/release``)."""
    return Ledger(site.files.release, site_floor(site.settings))


def plan_reply(site_dir: Path, values: RunConfig | Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """Phase 1: who the site is, which profile it extracts with, how many cases per class, and whether the
    plan can run here: its splits from the manifest's cases, checked against everything the site released
    before (no image is read)."""
    run = run_config(values)
    site, profile = open_site(site_dir, run.profile)
    n_hgg = sum(c.diagnosis == "HGG" for c in site.cases)
    n_bm = len(site.cases) - n_hgg
    problem = eligibility_problem(n_hgg, n_bm, min_cases(site, run), run.test_fraction, site_floor(site.settings),
                                  run.cv_folds if run.internal_validation == "cv" else 0)
    if problem:
        reason = f"site {site.name} cannot take part: {problem} (add cases)"
    else:
        reason = _release_problem(site, profile, run)
    config = {
        "site-name": site.name,
        "profile-sha256": profile.sha256,
        "profile-version": profile.version,
        "pyradiomics": pyradiomics_version(),
        "protocol": PROTOCOL_VERSION,
        "status": "ineligible" if reason else "ok",
        "reason": reason,
    }
    return config, {"n-hgg": n_hgg, "n-bm": n_bm, "n-problems": len(site.problems)}


def _release_problem(site: Site, profile: Profile, run: RunConfig) -> str:
    """Why this plan cannot run at the site under the release rule ('' when it can): the sets it would
    aggregate over, from the manifest's cases, must pass the ledger with everything released before."""
    table = FeatureTable([c.case_id for c in site.cases], np.array([c.label for c in site.cases], dtype=np.int64),
                         [], np.zeros((len(site.cases), 0)), [])
    spec, clinical_spec = run.covariates(), run.model_covariates_spec()
    by_id = {c.case_id: c for c in site.cases}
    rows, coded = [], []
    for i, case_id in enumerate(table.case_ids):
        try:  # named at the features phase; the plan is judged on the cases that have values
            values = by_id[case_id].covariates
            coded.append((cov.code_case(spec, values), cov.code_case(clinical_spec, values)))
            rows.append(i)
        except ValueError:
            continue
    table = _subset(table, rows)
    design = np.array([c for c, _ in coded], dtype=np.float64).reshape(len(rows), len(cov.columns(spec)))
    clinical = np.array([m for _, m in coded], dtype=np.float64).reshape(len(rows), len(cov.columns(clinical_spec)))
    try:
        data = split_site(site, profile, table, design if spec else None, run, record_problems=False,
                          clinical=clinical if clinical_spec else None)
    except SiteError as exc:
        return str(exc)
    views = [data, *(data.fold_view(tag) for tag in data.cv_tags())]
    sets = {}
    for i, view in enumerate(views):  # the main split, and each cross-validation fold's
        sets.update({f"{i}:{name}": s for part in PARTS for name, s in view.case_sets(part).items() if s})
        sets.update({f"{i}:{name}": s for name, s in level_groups.covariate_sets(view, spec).items()})
        sets.update({f"{i}:{name}": s for name, s in level_groups.clinical_sets(view, clinical_spec).items()})
    why = ledger(site).check(sets)
    return f"site {site.name} refuses this run plan: {why}" if why else ""


def code_covariates(site: Site, table: FeatureTable, spec: list[cov.Covariate],
                    knob: str = "combat-covariates") -> tuple[FeatureTable, np.ndarray]:
    """The covariate design (n, p) of the table's cases, from the manifest; a case without a valid value is
    taken out of the table and added to its problems (and to errors.json), named with the fix. ``knob`` is the
    run-config key that asks for them (the ComBat covariates or the model's)."""
    what = "ComBat covariates" if knob == "combat-covariates" else "model covariates (the model's clinical inputs)"
    by_id = {c.case_id: c for c in site.cases}
    rows, design, problems = [], [], []
    for i, case_id in enumerate(table.case_ids):
        try:
            design.append(cov.code_case(spec, by_id[case_id].covariates))
            rows.append(i)
        except ValueError as exc:
            problems.append(CaseProblem(
                case_id, f"{exc} ({what} {cov.describe(spec)}, run config {knob})",
                f"fill in {', '.join(c.name for c in spec)} for {case_id} in the site's manifest (or labels.csv)",
                kind="bad-covariate"))
    if problems:
        table = _subset(table, rows, problems)
        _add_to_errors_report(site, problems)
    return table, np.array(design, dtype=np.float64).reshape(len(rows), len(cov.columns(spec)))


def _add_to_errors_report(site: Site, problems: list[CaseProblem]) -> None:
    path = site.files.errors
    report = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"problems": []}
    known = {(p["case_id"], p["reason"]) for p in report["problems"]}
    new = [p.as_dict() for p in problems if (p.case_id, p.reason) not in known]
    if not new:
        return  # already named: the report is not rewritten
    report["problems"] += new
    report["cases_used"] = report.get("cases_used", 0) - len(new)
    atomic_write(path, json.dumps(report, indent=2))


def _subset(table: FeatureTable, rows: list[int], problems: list[CaseProblem] | None = None) -> FeatureTable:
    """The table's ``rows``, with ``problems`` added to its problems."""
    return FeatureTable([table.case_ids[i] for i in rows], table.labels[rows], table.names, table.values[rows],
                        [*table.problems, *(problems or [])])


def split_site(site: Site, profile: Profile, table: FeatureTable, design: np.ndarray | None,
               run: RunConfig, record_problems: bool = True, clinical: np.ndarray | None = None) -> SiteData:
    """The usable cases drawn into the site's release blocks (client.ledger) and split by whole blocks.

    Cases the blocks leave out are named (in errors.json with ``record_problems``); raises SiteError when the
    split leaves a part with fewer than k cases."""
    blocking = ledger(site).blocking(table.case_ids, table.labels)
    if blocking.left_out:
        rows = [i for i, c in enumerate(table.case_ids) if c not in blocking.left_out]
        problems = [CaseProblem(c, f"left out of this run: {why}", "nothing to do: it takes part once the rule allows "
                                "(see docs/privacy.md, release blocks)", kind="release-block")
                    for c, why in blocking.left_out.items() if c in set(table.case_ids)]
        table = _subset(table, rows, problems)
        design = None if design is None else design[rows]
        clinical = None if clinical is None else clinical[rows]
        if record_problems:
            _add_to_errors_report(site, problems)
    k, y = min_cases(site, run), table.labels
    names = tuple(run.clinical_inputs) if clinical is not None else ()
    if run.internal_validation == "cv":  # every case trains the final model; each fold is held out once
        folds = blocking.cv_folds(table.case_ids, run.cv_folds, run.split_seed, run.cv_repeats)
        data = SiteData(site, profile, table, np.zeros(len(y), dtype=bool), design, blocking, folds, clinical, names)
        thin = [name for label, name in ((1, "HGG"), (0, "BM")) if blocking.n_blocks(label) < run.cv_folds]
        problem = (f"its usable {' and '.join(thin)} cases form fewer than cv-folds = {run.cv_folds} release "
                   f"blocks of k = {site_floor(site.settings)} (one per fold; lower cv-folds)" if thin else
                   next((p for tag in data.cv_tags() if (p := _split_problem(data.fold_view(tag), k))), None))
    else:
        data = SiteData(site, profile, table, blocking.held_out(table.case_ids, run.test_fraction, run.split_seed),
                        design, blocking, clinical=clinical, clinical_names=names)
        thin = [name for label, name in ((1, "HGG"), (0, "BM")) if blocking.n_blocks(label) < 2]
        problem = (f"its usable {' and '.join(thin)} cases form fewer than two release blocks of k = "
                   f"{site_floor(site.settings)} (one for training, one held out)" if thin else
                   _split_problem(data, k))
    if problem:
        raise SiteError(f"site {site.name} cannot take part: {problem}; {len(table.problems)} case(s) are not "
                        f"used, see {site.files.errors} at the site (add cases)")
    return data


def _split_problem(data: SiteData, k: int) -> str | None:
    y, held_out = data.table.labels, data.held_out
    return split_problem(int(np.sum((y == 1) & ~held_out)), int(np.sum((y == 0) & ~held_out)),
                         int(np.sum((y == 1) & held_out)), int(np.sum((y == 0) & held_out)), k)


Loaded = tuple[Site, Profile, FeatureTable, np.ndarray | None, np.ndarray | None]


def load_site_data(site_dir: Path, values: RunConfig | Mapping[str, Any], workers: int = 1) -> SiteData:
    """Features of every usable case (extracted or from the cache), one row per patient, the ComBat
    covariates when the run has them, and the held-out split by whole release blocks.

    The site is read, checked and hashed once per process and read again only when one of its files changed
    (client.runcache); the split, which depends on the release ledger too, is drawn again when the site was read
    again or the ledger's files changed (inside a batch, again whenever a sub-reply froze a block: client.ledger)."""
    run = run_config(values)
    root = runcache.resolved(site_dir)
    key = (str(root), run.profile, run.combat_covariates if run.combat else "", run.model_covariates)
    loaded, _ = runcache.remember("site", key, lambda: _load(root, run, workers), lambda made: made[1])
    site, profile, table, design, clinical = loaded
    if in_batch():  # a batch's earlier sub-replies may have frozen blocks not yet on disk: drawn from them, and
        # drawn again whenever one of them froze a block (the blocks are all the split reads from the ledger; within
        # one batch they are only ever added to, so their number says whether the draw could differ)
        frozen = runcache.in_look(("ledger", id(site)), site, lambda: ledger(site)).frozen_blocks()  # one per look
        return runcache.in_look(("batch-split", key, run, frozen), loaded,
                                lambda: split_site(site, profile, table, design, run, clinical=clinical))
    # the split is a function of the loaded site (a reload is a new object), the run and the ledger's files: drawn
    # again when any of them changes
    _, data = runcache.remember("split", (key, run),
                                lambda: (loaded, split_site(site, profile, table, design, run, clinical=clinical)),
                                lambda _: ledger(site).files, valid=lambda kept: kept[0] is loaded)
    return data


def _load(site_dir: Path, run: RunConfig, workers: int) -> tuple[Loaded, list[Path]]:
    """The site's cases and features, and every file they were made from (client.runcache watches them)."""
    profile = load_profile(str(site_settings(site_dir).get("profile") or run.profile))
    raw = load_site(site_dir, profile.sequences)
    watched = _site_files(raw, run)  # duplicates' files too: a changed one may no longer be a duplicate
    site = patients.one_row_per_patient(raw)
    table, _ = extract_site(site, profile, workers=workers)
    watched += [cache_file(site, profile, c.case_id) for c in site.cases]
    spec, clinical_spec = run.covariates(), run.model_covariates_spec()
    design = clinical = None
    if clinical_spec:  # first, so a case missing a value both lists need is named once per list
        table, clinical = code_covariates(site, table, clinical_spec, "model-covariates")
    if spec:
        before = {c: i for i, c in enumerate(table.case_ids)}
        table, design = code_covariates(site, table, spec)
        if clinical is not None:  # only the rows ComBat's coding kept
            clinical = clinical[[before[c] for c in table.case_ids]]
    return (site, profile, table, design, clinical), watched


def _site_files(site: Site, run: RunConfig) -> list[Path]:
    """What a site's cases are read from: site.yaml, the manifest or labels.csv, the profile, and each case's
    images and mask (every file of a DICOM folder); for folder layouts, the data root and each case folder."""
    files = [site.root / "site.yaml", site.root / str(site.settings["manifest"]),
             site.root / str(site.settings["labels_csv"]),
             resolve_profile_path(str(site.settings.get("profile") or run.profile))]
    folders = site.settings.get("source", "manifest") != "manifest"
    if folders:
        files.append(Path(site.settings["data_root"]))
    for case in site.cases:
        for path in (*case.images.values(), case.mask):
            files += sorted(path.rglob("*")) if path.is_dir() else [path]
            if folders:
                files.append(path.parent)
    return files


def features_reply(data: SiteData) -> tuple[list[str], dict[str, int]]:
    """Phase 2: feature names finite at every usable case, and the split's class counts."""
    finite = np.all(np.isfinite(data.table.values), axis=0)
    names = [n for n, ok in zip(data.table.names, finite, strict=True) if ok]
    y, test = data.table.labels, data.held_out
    counts = {
        "n-cases": len(y),
        "n-train-hgg": int(np.sum((y == 1) & ~test)), "n-train-bm": int(np.sum((y == 0) & ~test)),
        "n-test-hgg": int(np.sum((y == 1) & test)), "n-test-bm": int(np.sum((y == 0) & test)),
        "n-failed": len(data.table.problems),
    }
    return names, counts


def combat_design(data: SiteData, agreed: list[str], spec: list[cov.Covariate],
                  k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The training split's features (n, d) and covariates (n, p) for the ComBat rounds.

    Every group of cases a categorical covariate defines (a level; a pair of levels of two covariates) is
    aggregated over in XᵀX / XᵀY, so each must hold at least k cases: else the site refuses, naming them.
    """
    x, _ = site_matrix(data, agreed, held_out=False)
    if data.covariates is None:
        return x, None
    c = data.covariates[~data.held_out]
    level_groups.refuse_small(data, c, spec, k, "take part in ComBat with covariates", "combat-covariates")
    return x, c
