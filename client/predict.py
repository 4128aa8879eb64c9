"""`radfed predict`: the global model's probability of HGG vs BM for one new case, computed at the site.

A site administrator runs it on a case the federation has never seen (files on disk, or a case of the site's
own manifest by id). It does what a run does to the site's cases, in the same order:

1. extraction with the federation's profile (the site's ``site.yaml`` profile; its hash must equal the
   model's ``profile_sha256``, ``client.modelfile``), after the same input checks (``client.checks``), with the
   site's label map;
2. the site's own ComBat parameters of the run that made the model (``<output_dir>/harmonization/
   run-<run id>.json``, written by the ClientApp or ``radfed site join``; which file, and when none is needed:
   ``client.harmonization_params``), on the model's features;
3. the model's standardisation and logistic regression (``common.model``).

It also says which features drove the result: each model feature's contribution ``w_j * z_j`` to the
log-odds (``common.explain``). The contributions plus the intercept are the logit exactly.

This module loads the site and the case, runs those steps (``predict``) and formats the result
(``prediction_json``, ``render_text``); the command line is in ``radfed.cli.site``. Nothing leaves the site:
the command reads local files only, and it blocks network connections while it runs (``offline``), so a
dependency cannot send anything either.

Exit codes (``client.predict_refusals``): 0 a probability was computed; 1 the case cannot be scored (a missing
or unreadable file, geometry mismatch, NaN voxels, an empty mask, labels outside the profile, a region too small,
pyradiomics failing, a non-finite feature): the message names the case and the fix; 2 refused or wrong usage
(the site's profile or radfed's protocol differs from the model's, harmonisation parameters missing, ambiguous
or for other features, an unreadable model file, bad options).
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.harmonization_params import Harmonization, resolve_harmonization
from client.modelfile import ModelFile, check_profile, check_protocol, load_model_file
from client.predict_refusals import EXIT_BAD_CASE, EXIT_OK, EXIT_REFUSED, CaseRefusal, PredictRefusal
from client.sitefiles import SiteFiles
from common.explain import THRESHOLD, Contribution, describe, drivers, explain, leans_towards

if TYPE_CHECKING:
    from client.site import Case
    from common.profile import Profile

__all__ = ["DISCLAIMER", "EXIT_BAD_CASE", "EXIT_OK", "EXIT_REFUSED", "OFFLINE_NOTE", "SCHEMA", "THRESHOLD",
           "CaseRefusal", "Contribution", "Harmonization", "ModelFile", "Prediction", "PredictRefusal", "SiteInfo",
           "case_from_files", "case_from_site", "check_profile", "check_protocol", "describe", "extract_case",
           "load_model_file", "offline", "open_site", "predict", "prediction_json", "render_text",
           "resolve_harmonization", "score"]

SCHEMA = "radfed.prediction/1"
OFFLINE_NOTE = "computed at this site: no network connection was opened and nothing left the site"
DISCLAIMER = "Research software: not a diagnostic device."


# ------------------------------------------------------------------------------------------------------------
# The site and the case


@dataclass
class SiteInfo:
    name: str
    root: Path
    work_dir: Path
    profile: Profile
    label_map: dict[int, str] | None


def open_site(site_dir: str | Path) -> SiteInfo:
    """The site's name, output_dir, profile and label map from its site.yaml (no case is read)."""
    from client.site import SiteError, load_site_config, resolved_paths
    from common.profile import ProfileError, load_profile

    root = Path(site_dir).expanduser().resolve()
    try:
        config = load_site_config(root)
        profile = load_profile(config.profile or "default")
    except (SiteError, ProfileError) as exc:
        raise PredictRefusal(str(exc), f"fix the site folder or its site.yaml (radfed site check --site {root})") \
            from exc
    _, work_dir = resolved_paths(root, config)
    label_map = dict(config.label_map) if config.label_map is not None else None
    return SiteInfo(config.name or root.name, root, work_dir, profile, label_map)


def case_from_site(site: SiteInfo, case_id: str) -> Case:
    """A case of the site's own manifest (or BraTS/DICOM folders), by id."""
    from client.site import SiteError, load_site

    try:
        loaded = load_site(site.root, site.profile.sequences)
    except SiteError as exc:
        raise PredictRefusal(str(exc), "fix the site folder or its site.yaml "
                             f"(radfed site check --site {site.root})") from exc
    for case in loaded.cases:
        if case.case_id == case_id:
            return case
    for problem in loaded.problems:
        if problem.case_id == case_id:
            raise CaseRefusal(f"case {case_id}: {problem.reason}", problem.fix, case_id)
    known = [c.case_id for c in loaded.cases]
    shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
    raise PredictRefusal(f"site {site.name} has no case {case_id!r} ({len(known)} case(s): {shown or 'none'})",
                         "check the id, or give the files with --image SEQ=PATH ... --mask PATH")


def case_from_files(images: Mapping[str, Path], mask: Path, profile: Profile, name: str | None) -> Case:
    """A new case from its files; every profile sequence is needed, and no other."""
    from client.site import Case

    case_id = name or re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr)$", "", Path(mask).name) or "new case"
    missing = [s for s in profile.sequences if s not in images]
    unknown = [s for s in images if s not in profile.sequences]
    if missing or unknown:
        parts = ([f"no image for {', '.join(missing)}"] if missing else []) + \
                ([f"{', '.join(unknown)} is not a sequence of the profile"] if unknown else [])
        raise PredictRefusal(f"case {case_id}: {'; '.join(parts)} (the profile needs {', '.join(profile.sequences)})",
                             "give one --image SEQ=PATH for each of " + ", ".join(profile.sequences), case_id)
    return Case(case_id=case_id, diagnosis="", images={s: Path(images[s]).expanduser() for s in profile.sequences},
                mask=Path(mask).expanduser())


@contextmanager
def _pyradiomics_log(path: Path) -> Iterator[None]:
    """pyradiomics' own messages go to the site's predict.log, not the terminal."""
    from client.extract import quiet_pyradiomics

    quiet_pyradiomics()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("radiomics")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def extract_case(case: Case, site: SiteInfo) -> dict[str, float]:
    """All features of the case under the site's profile, after the site's input checks."""
    from client.checks import CaseInputError
    from client.extract import extract_case_features
    from client.site import SiteError

    try:
        with _pyradiomics_log(SiteFiles(site.work_dir).predict_log):
            return extract_case_features(case, site.profile, site.label_map)
    except SiteError as exc:  # the site's label_map, not the case
        raise PredictRefusal(str(exc), "fix 'label_map' in the site's site.yaml "
                             f"(radfed site check --site {site.root})") from exc
    except CaseInputError as exc:
        raise CaseRefusal(f"case {case.case_id}: {exc.reason}", exc.fix, case.case_id) from exc
    except (ValueError, RuntimeError) as exc:
        raise CaseRefusal(f"case {case.case_id}: pyradiomics failed on {exc}",
                          "check that region's segmentation and image: after resampling to the profile's spacing it "
                          "must keep the profile's minimum ROI size", case.case_id) from exc


# ------------------------------------------------------------------------------------------------------------
# Scoring (the contributions and their words: common.explain)


# A feature this many standard deviations from the training mean is outside what the model learned from.
FAR_Z = 4.0


@dataclass
class Prediction:
    """One scored case, with what scored it (model, profile, harmonisation) and why (contributions)."""

    case_id: str
    case_source: str  # "files" or "site"
    inputs: dict[str, str]
    site: str
    probability: float  # of HGG
    logit: float
    intercept: float
    contributions: list[Contribution]  # model order
    model: ModelFile
    profile: Profile
    harmonization: Harmonization
    notes: list[str] = field(default_factory=list)

    def drivers(self, top: int) -> list[Contribution]:
        return drivers(self.contributions, top)


def _finite_or_refuse(values: np.ndarray, names: list[str], case_id: str, stage: str, fix: str) -> None:
    bad = [n for n, v in zip(names, values, strict=True) if not np.isfinite(v)]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise CaseRefusal(f"case {case_id}: {len(bad)} of the model's {len(names)} features {stage} "
                          f"not finite (NaN/inf): {shown}", fix, case_id)


def score(features: Mapping[str, float], model: ModelFile, harmonization: Harmonization,
          case_id: str, covariates: Mapping[str, str] | None = None) -> tuple[float, float, list[Contribution]]:
    """(probability of HGG, logit, contributions) of one case's extracted features; ``covariates`` are its
    raw covariate values (e.g. {"age": "63"}): ComBat's when the run adjusted for any, and the model's clinical
    inputs (model-covariates), which join after harmonisation as the sites coded them."""
    from common.families import predict_proba

    radiomics = model.radiomics
    absent = [n for n in radiomics if n not in features]
    if absent:
        shown = ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else "")
        raise PredictRefusal(f"case {case_id}: the extraction gave no value for {len(absent)} of the model's "
                             f"features ({shown}), although the profile hash matches",
                             "extract with the federation's pyradiomics version (see the run's report)", case_id)
    clinical = model.code_clinical(covariates or {}, case_id)
    x = np.array([[float(features[n]) for n in radiomics]], dtype=np.float64)
    _finite_or_refuse(x[0], radiomics, case_id, "are",
                      "check the case's images and segmentation (a region too small or uniform after "
                      "resampling gives undefined texture features); the model cannot score it without them")
    if harmonization.params is not None:
        x = harmonization.params.apply(x, harmonization.design(covariates or {}, case_id))
        _finite_or_refuse(x[0], radiomics, case_id, "are after harmonisation",
                          "the site's ComBat parameters are damaged: restore the harmonisation file")
    if clinical:  # the model's inputs in its order: radiomics (harmonised), clinical (never adjusted)
        joined = dict(zip(radiomics, x[0].tolist(), strict=True)) | clinical
        x = np.array([[joined[n] for n in model.features]], dtype=np.float64)
    arrays = model.arrays
    probability = float(predict_proba(model.family, arrays, x)[0])
    logit, contributions = explain(model.features, x[0], arrays["mean"], arrays["scale"], model.weights,
                                   model.intercept)
    if not model.linear:  # no weight per feature: the contributions only carry each feature's z (all 0 weight)
        eps = 1e-300
        logit = float(np.log(max(probability, eps)) - np.log(max(1.0 - probability, eps)))
    return probability, logit, contributions


# ------------------------------------------------------------------------------------------------------------
# The whole flow, its output, and the network block


def predict(model_path: str | Path, site_dir: str | Path, *, case_id: str | None = None,
            images: Mapping[str, Path] | None = None, mask: Path | None = None, case_name: str | None = None,
            run_id: str | None = None, harmonization_file: Path | None = None,
            no_harmonization: bool = False, covariates: Mapping[str, str] | None = None) -> Prediction:
    """One case's probability of HGG with the run's global model; raises PredictRefusal / CaseRefusal.

    Everything that can be refused without reading the case is checked first.
    """
    if case_id is not None and (images or mask is not None):
        raise PredictRefusal("give either --case-id or the case's files (--image, --mask), not both",
                             "drop one of them")
    if case_id is None and (mask is None or not images):
        raise PredictRefusal("no case given" if mask is None and not images else
                             "a case from files needs its images and its mask",
                             "pass --case-id ID, or --image SEQ=PATH for each sequence and --mask PATH")
    site = open_site(site_dir)
    model = load_model_file(model_path)
    check_protocol(model)
    check_profile(model, site.profile, site.root)
    harmonization = resolve_harmonization(model, site.work_dir, run_id, harmonization_file, no_harmonization,
                                          site_dir=site.root)
    notes = list(harmonization.notes)
    if case_id is not None:
        case = case_from_site(site, case_id)
        source = "site"
        notes.append(f"{case_id} is one of the site's own cases: if the run trained on it, its probability is "
                     "optimistic")
    else:
        assert mask is not None and images
        case = case_from_files(images, mask, site.profile, case_name)
        source = "files"
    from common.covariates import parse as parse_covariates

    taken = parse_covariates(model.model_covariates, "model-covariates")
    unknown = sorted(set(covariates or {}) - {c.name for c in [*harmonization.covariates, *taken]})
    if unknown:
        from common.covariates import describe as describe_covariates

        adjusted = describe_covariates(harmonization.covariates)
        used = describe_covariates(taken)
        raise PredictRefusal(f"--covariate {', '.join(unknown)}: the run's ComBat adjusted for "
                             f"{adjusted or 'no covariates'} and its model takes {used or 'no covariates'}",
                             f"give only {','.join(x for x in (adjusted, used) if x)}" if adjusted or used
                             else "drop --covariate", case.case_id)
    values = {**case.covariates, **(covariates or {})}  # --covariate overrides the manifest
    harmonization.design(values, case.case_id)  # refuse a missing covariate before the slow extraction
    model.code_clinical(values, case.case_id)
    features = extract_case(case, site)
    probability, logit, contributions = score(features, model, harmonization, case.case_id, values)
    far = sorted((c for c in contributions if abs(c.z) > FAR_Z), key=lambda c: -abs(c.z))
    if far:  # the model never saw such values: a linear model extrapolates silently
        shown = "; ".join(f"{c.feature} at {c.z:+.1f} SD" for c in far[:3]) + ("; ..." if len(far) > 3 else "")
        notes.append(f"{len(far)} of the model's {len(contributions)} features lie more than {FAR_Z:g} standard "
                     f"deviations from the federation's training mean ({shown}): outside what the model learned "
                     "from (another scanner or protocol, or a segmentation error?); treat the probability with "
                     "caution")
    inputs = {**{s: str(p) for s, p in case.images.items()}, "mask": str(case.mask)}
    return Prediction(case.case_id, source, inputs, site.name, probability, logit, model.intercept, contributions,
                      model, site.profile, harmonization, notes)


def prediction_json(pred: Prediction, top: int) -> dict[str, Any]:
    from common.canon import json_safe
    from common.covariates import describe as describe_covariates

    h = pred.harmonization
    return json_safe({
        "schema": SCHEMA,
        "status": "ok",
        "exit_code": EXIT_OK,
        "case": {"id": pred.case_id, "source": pred.case_source, "inputs": pred.inputs},
        "site": pred.site,
        "probability_hgg": pred.probability,
        "probability_bm": 1.0 - pred.probability,
        "leans_towards": leans_towards(pred.probability),
        "threshold": THRESHOLD,
        "logit": pred.logit,
        "intercept": pred.intercept,
        "drivers": [c.as_dict() for c in pred.drivers(top)] if pred.model.linear else [],
        "contributions": [c.as_dict() for c in pred.contributions] if pred.model.linear else [],
        "model": {"path": str(pred.model.path), "sha256": pred.model.sha256, "family": pred.model.family,
                  "weights_sha256": pred.model.weights_sha256, "run_id": pred.model.run_id,
                  "run_id_source": pred.model.run_id_source, "protocol": pred.model.protocol,
                  "n_features": len(pred.model.features)},
        "profile": {"name": pred.profile.name, "version": pred.profile.version, "sha256": pred.profile.sha256},
        "harmonization": {"method": h.method, "file": str(h.path) if h.path else None, "run_id": h.run_id,
                          "how": h.how, "covariates": describe_covariates(h.covariates)},
        "offline": True,
        "sent": "nothing",
        "notes": pred.notes,
        "disclaimer": DISCLAIMER,
    })


def render_text(pred: Prediction, top: int) -> str:
    p = pred.probability
    leans = leans_towards(p)
    drivers = pred.drivers(top)
    total = sum(c.contribution for c in pred.contributions)
    lines = [
        f"radfed predict: case {pred.case_id} at site {pred.site}",
        f"  {OFFLINE_NOTE}",
        "",
        f"  probability of HGG  {p:.3f}   (BM {1.0 - p:.3f}; leans towards {leans} at the {THRESHOLD} threshold)",
        "",
        f"  what drove it: the {len(drivers)} largest of {len(pred.contributions)} contributions to the log-odds "
        "(weight x standardised value; + towards HGG, - towards BM)",
    ]
    if pred.model.linear:
        lines += [f"    {c.contribution:+.3f}  {c.words()}" for c in drivers]
        lines += [f"    all contributions sum to {total:+.3f}; with the intercept {pred.intercept:+.3f} the log-odds "
                  f"are {pred.logit:+.3f}"]
    else:
        lines[-1] = (f"  what drove it: a {pred.model.family} model has no weight per feature, so no plain-language "
                     f"drivers (log-odds {pred.logit:+.3f})")
    if pred.model.family == "svm":
        lines.append("  (svm: the score is sigmoid(margin); it ranks cases but is not a calibrated probability)")
    lines += [
        "",
        f"  model          {pred.model.path}",
        f"                 sha256 {pred.model.sha256}",
        f"                 weights sha256 {pred.model.weights_sha256} (the audit log's model_sha256)",
        f"                 {pred.model.family}, run {pred.model.run_id or 'not named'}, "
        f"{len(pred.model.features)} features, "
        f"protocol {pred.model.protocol}",
        f"  profile        {pred.profile.name} v{pred.profile.version}, sha256 {pred.profile.sha256}",
        f"  harmonisation  {pred.harmonization.how}" + (f"\n                 {pred.harmonization.path}"
                                                       if pred.harmonization.path else ""),
    ]
    lines += [f"  note: {n}" for n in pred.notes]
    lines += ["", f"  {DISCLAIMER}"]
    return "\n".join(lines)


@contextmanager
def offline() -> Iterator[None]:
    """Block outgoing network connections for the duration: prediction needs none, so none can happen."""
    def blocked(*_args: object, **_kwargs: object) -> None:
        raise OSError("radfed predict works offline: a network connection was attempted and blocked")

    saved = {name: getattr(socket.socket, name) for name in ("connect", "connect_ex", "sendto")}
    saved_create = socket.create_connection
    for name in saved:
        setattr(socket.socket, name, blocked)
    socket.create_connection = blocked  # type: ignore[assignment]
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(socket.socket, name, method)
        socket.create_connection = saved_create  # type: ignore[assignment]

