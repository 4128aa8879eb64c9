"""`radfed predict`: the global model's probability of HGG vs BM for one new case, computed at the site.

A site administrator runs it on a case the federation has never seen (files on disk, or a case of the site's
own manifest by id). It does what a run does to the site's cases, in the same order:

1. extraction with the federation's profile (the site's ``site.yaml`` profile; its hash must equal the
   model's ``profile_sha256``), after the same input checks (``client.checks``), with the site's label map;
2. the site's own ComBat parameters of the run that made the model (``<output_dir>/harmonization/
   run-<run id>.json``, written by the ClientApp), on the model's features (ComBat acts feature by feature,
   so this equals harmonising the whole agreed list and then picking the model's columns);
3. the model's standardisation and logistic regression (``common.model``).

It also says which features drove the result: each model feature's contribution ``w_j * z_j`` to the
log-odds (``z_j`` the harmonised value standardised with the federation's pooled mean and std). The
contributions plus the intercept are the logit exactly.

Nothing leaves the site: the command reads local files only, and it blocks network connections while it
runs, so a dependency cannot send anything either.

Exit codes: 0 a probability was computed; 1 the case cannot be scored (a missing or unreadable file,
geometry mismatch, NaN voxels, an empty mask, labels outside the profile, a region too small, pyradiomics
failing, a non-finite feature): the message names the case and the fix; 2 refused or wrong usage (the site's
profile or radfed's protocol differs from the model's, harmonisation parameters missing, ambiguous or for
other features, an unreadable model file, bad options).

Which run made the model: ``--run-id``, else ``model.pt["run_id"]``, else the run folder's name
(``<time>-run<id>``), else the only parameter file at the site whose feature list covers the model's features.
Whether the run harmonised: ``model.pt["harmonization"]`` when present; otherwise a missing parameter file is a
refusal unless ``--no-harmonization`` says the federation ran without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.sitefiles import SiteFiles

if TYPE_CHECKING:
    import torch

    from client.site import Case
    from common.combat import SiteCombat
    from common.covariates import Covariate
    from common.profile import Profile

EXIT_OK = 0
EXIT_BAD_CASE = 1
EXIT_REFUSED = 2
SCHEMA = "radfed.prediction/1"
THRESHOLD = 0.5  # the federation's metrics count a case as HGG at probability >= 0.5
OFFLINE_NOTE = "computed at this site: no network connection was opened and nothing left the site"
DISCLAIMER = "Research software: not a diagnostic device."
_RUN_FOLDER = re.compile(r"-run(\d+)$")  # server.app names a run folder <time>-run<run id>


class PredictRefusal(Exception):
    """radfed predict cannot give a probability: what is wrong, the fix, and the exit code."""

    exit_code = EXIT_REFUSED
    status = "refused"

    def __init__(self, reason: str, fix: str, case_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix
        self.case_id = case_id


class CaseRefusal(PredictRefusal):
    """The case itself cannot be scored (bad input or a non-finite feature)."""

    exit_code = EXIT_BAD_CASE
    status = "bad-input"


# ------------------------------------------------------------------------------------------------------------
# The model file


@dataclass
class ModelFile:
    """A run's ``model.pt`` as written by server.app, with what predict needs to know about it."""

    path: Path
    sha256: str  # of the file
    weights_sha256: str  # common.canon.arrays_sha256 of the state dict: the audit log's model_sha256
    state: dict[str, torch.Tensor]
    features: list[str]
    profile_sha256: str
    protocol: str
    run_id: str | None = None  # model.pt["run_id"] (proposed), else the run folder's name
    run_id_source: str | None = None
    harmonization: str | None = None  # model.pt["harmonization"] (proposed): "combat" or "none"
    agreed_sha256: str | None = None  # model.pt["agreed_features_sha256"] (proposed)

    @property
    def weights(self) -> np.ndarray:
        return self.state["linear.weight"].detach().cpu().numpy().reshape(-1)

    @property
    def intercept(self) -> float:
        return float(self.state["linear.bias"].detach().cpu().numpy().reshape(-1)[0])


def load_model_file(path: str | Path) -> ModelFile:
    """Read and check ``model.pt``; raises PredictRefusal naming the file and the fix."""
    import torch

    from common.canon import arrays_sha256, file_sha256
    from common.model import model_from_state

    path = Path(path).expanduser()
    fix_path = "pass the model.pt of a finished run: --model <run folder>/model.pt"
    if not path.is_file():
        raise PredictRefusal(f"model file {path} does not exist", fix_path)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no code runs on load
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise PredictRefusal(f"{path} is not a radfed model file (torch cannot read it: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})",
                             fix_path) from exc
    needed = ("state_dict", "features", "profile_sha256", "protocol")
    missing = [k for k in needed if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise PredictRefusal(f"{path} is not a radfed model file: it lacks {', '.join(missing)}", fix_path)
    state, features = doc["state_dict"], [str(n) for n in doc["features"]]
    try:
        net = model_from_state(state)
    except (RuntimeError, KeyError, AttributeError, TypeError) as exc:
        raise PredictRefusal(f"{path}: its state dict is not radfed's logistic model ({exc})", fix_path) from exc
    if int(net.mean.shape[0]) != len(features):
        raise PredictRefusal(f"{path} is inconsistent: {len(features)} feature names for a model of "
                             f"{int(net.mean.shape[0])} inputs", "use the model.pt a run wrote, unmodified")
    if len(set(features)) != len(features):
        raise PredictRefusal(f"{path} names a feature twice", "use the model.pt a run wrote, unmodified")
    weights_sha256 = arrays_sha256({k: v.detach().cpu().numpy() for k, v in state.items()})
    run_id, source = (str(doc["run_id"]), "model.pt") if doc.get("run_id") is not None else (None, None)
    if run_id is None and (match := _RUN_FOLDER.search(path.resolve().parent.name)):
        run_id, source = match.group(1), "the run folder's name"
    harmonization = str(doc["harmonization"]) if doc.get("harmonization") is not None else None
    if harmonization not in (None, "combat", "none"):
        raise PredictRefusal(f"{path} says harmonization={harmonization!r}, which radfed predict does not know",
                             "use a radfed release that knows it, or a model from a run with combat or none")
    agreed = str(doc["agreed_features_sha256"]) if doc.get("agreed_features_sha256") else None
    return ModelFile(path=path, sha256=file_sha256(path), weights_sha256=weights_sha256, state=state,
                     features=features, profile_sha256=str(doc["profile_sha256"]), protocol=str(doc["protocol"]),
                     run_id=run_id, run_id_source=source, harmonization=harmonization, agreed_sha256=agreed)


def check_protocol(model: ModelFile) -> None:
    from common.protocol import PROTOCOL_VERSION

    if model.protocol != PROTOCOL_VERSION:
        raise PredictRefusal(
            f"{model.path} was written under radfed protocol {model.protocol}; this radfed speaks protocol "
            f"{PROTOCOL_VERSION}, so its features, harmonisation or model may not mean the same",
            f"use the radfed release the federation ran with (protocol {model.protocol}), or a model from a run "
            f"under protocol {PROTOCOL_VERSION}")


def _bundled_profile_with(sha256: str) -> str | None:
    from common.profile import PROFILE_DIR, ProfileError, load_profile

    for path in sorted(PROFILE_DIR.glob("*.yaml")):
        try:
            if load_profile(path).sha256 == sha256:
                return path.stem
        except ProfileError:
            continue
    return None


def check_profile(model: ModelFile, profile: Profile, site_dir: Path) -> None:
    if profile.sha256 == model.profile_sha256:
        return
    bundled = _bundled_profile_with(model.profile_sha256)
    hint = (f"set 'profile: {bundled}' in {site_dir / 'site.yaml'}" if bundled else
            f"set 'profile:' in {site_dir / 'site.yaml'} to the federation's profile file (its hash, shown by "
            f"'radfed profile show FILE', must be {model.profile_sha256})")
    raise PredictRefusal(
        f"the site's extraction profile ({profile.name} v{profile.version}, sha256 {profile.sha256}, from "
        f"{profile.source}) is not the one the model was trained on (sha256 {model.profile_sha256}): its "
        "features would not mean what the model's weights expect",
        f"{hint}, or use a model from a run made with this site's profile")


# ------------------------------------------------------------------------------------------------------------
# Harmonisation parameters


@dataclass
class Harmonization:
    """What predict applies between extraction and the model."""

    method: str  # "combat" or "none"
    how: str  # one sentence: where it came from
    path: Path | None = None
    run_id: str | None = None
    params: SiteCombat | None = None  # restricted to the model's features, in the model's order
    covariates: list[Covariate] = field(default_factory=list)  # what params adjust for (common.covariates)
    notes: list[str] = field(default_factory=list)

    def design(self, values: Mapping[str, str], case_id: str) -> np.ndarray | None:
        """The case's covariate row (1, p) for ComBat, or None when the run had no covariates."""
        if not self.covariates:
            return None
        from common.covariates import code_case, describe

        try:
            return code_case(self.covariates, values)[None, :]
        except ValueError as exc:
            names = " ".join(f"--covariate {c.name}=..." for c in self.covariates)
            raise CaseRefusal(f"case {case_id}: {exc}; the run's ComBat adjusts for {describe(self.covariates)}",
                              f"give the case's values with {names} (or fill in those columns of the site's "
                              "manifest)", case_id) from None


def _read_params(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PredictRefusal(f"harmonisation file {path} does not exist",
                             "pass the site's harmonization/run-<run id>.json of the run that made the model") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PredictRefusal(f"harmonisation file {path} cannot be read ({exc})",
                             "restore it from the site's backup, or rerun the federation with this site") from exc
    if not isinstance(doc, dict) or "features" not in doc or "grand_mean" not in doc:
        raise PredictRefusal(f"{path} is not a radfed harmonisation file (no 'features' or ComBat parameters)",
                             "pass the site's harmonization/run-<run id>.json of the run that made the model")
    return doc


def _feature_problem(doc: Mapping[str, Any], model: ModelFile) -> str | None:
    """Why this parameter file cannot harmonise the model's features, or None."""
    from common.canon import sha256_json

    features = [str(n) for n in doc.get("features") or []]
    if model.agreed_sha256 is not None and sha256_json(features) != model.agreed_sha256:
        return (f"its feature list ({len(features)} features, sha256 {sha256_json(features)[:12]}) is not the "
                f"run's agreed list (sha256 {model.agreed_sha256[:12]})")
    lacking = [n for n in model.features if n not in set(features)]
    if lacking:
        shown = ", ".join(lacking[:3]) + (", ..." if len(lacking) > 3 else "")
        return f"it lacks {len(lacking)} of the model's {len(model.features)} features ({shown})"
    return None


def _params_for_model(doc: Mapping[str, Any], path: Path, model: ModelFile) -> SiteCombat:
    """The file's ComBat parameters restricted to the model's features (model order)."""
    from common.combat import SiteCombat

    features = [str(n) for n in doc["features"]]
    damaged = PredictRefusal(f"{path} is damaged: its parameters do not match its {len(features)} features",
                             "restore it from the site's backup, or rerun the federation with this site")
    try:
        params = SiteCombat.from_dict(dict(doc))
    except (KeyError, TypeError, ValueError) as exc:
        raise damaged from exc
    if params.grand_mean.shape[0] != len(features):
        raise damaged
    from common.covariates import columns

    if params.beta_cov.shape[0] != len(columns(_covariates_of(doc, path))):
        raise damaged
    index = {n: i for i, n in enumerate(features)}
    cols = np.array([index[n] for n in model.features], dtype=np.int64)
    return replace(params, grand_mean=params.grand_mean[cols], beta_cov=params.beta_cov[:, cols],
                   var_pooled=params.var_pooled[cols], gamma_star=params.gamma_star[cols],
                   delta_star=params.delta_star[cols], unadjusted=params.unadjusted[cols])


def _covariates_of(doc: Mapping[str, Any], path: Path) -> list[Covariate]:
    from common.covariates import CovariateError, parse

    try:
        return parse(str(doc.get("covariates") or ""))
    except CovariateError as exc:
        raise PredictRefusal(f"{path} is damaged: its covariate spec is malformed ({exc})",
                             "restore it from the site's backup, or rerun the federation with this site") from None


def _combat_from(path: Path, doc: Mapping[str, Any], model: ModelFile, how: str,
                 run_id: str | None) -> Harmonization:
    problem = _feature_problem(doc, model)
    if problem:
        raise PredictRefusal(
            f"the harmonisation file {path} does not fit the model: {problem}",
            "pass the parameters of the run that made this model (--run-id N, or --harmonization "
            "<site output_dir>/harmonization/run-N.json, N from the run folder's name <time>-runN); if this site "
            "has none for that run, rerun the federation with this site")
    file_run = None if doc.get("run_id") is None else str(doc["run_id"])
    return Harmonization("combat", how, path=path, run_id=file_run or run_id,
                         params=_params_for_model(doc, path, model), covariates=_covariates_of(doc, path))


def _missing(path_text: str, model: ModelFile, why: str) -> PredictRefusal:
    options = ["if this site took part in that run, its output_dir may have moved: pass --harmonization FILE",
               "if it did not take part, rerun the federation with this site (each site fits its own ComBat "
               "parameters during the run)"]
    if model.harmonization is None:
        options.append("if the federation ran with harmonization=none, pass --no-harmonization")
    return PredictRefusal(f"no harmonisation parameters of this site for the model's run: looked for {path_text}"
                          f" ({why})", "; ".join(options))


def resolve_harmonization(model: ModelFile, work_dir: Path, run_id: str | None = None,
                          explicit: Path | None = None, skip: bool = False) -> Harmonization:
    """Find and check the site's ComBat parameters for the model's run (see the module doc)."""
    files = SiteFiles(work_dir)
    folder = files.harmonization_dir
    if run_id is not None and model.run_id is not None and model.run_id_source == "model.pt" \
            and str(run_id) != model.run_id:
        raise PredictRefusal(f"--run-id {run_id} but {model.path} was made by run {model.run_id}",
                             f"drop --run-id, or pass the model.pt of run {run_id}")
    if skip and explicit is not None:
        raise PredictRefusal("--harmonization and --no-harmonization contradict each other", "pass one of them")
    known, source = (str(run_id), "--run-id") if run_id is not None else (model.run_id, model.run_id_source)

    if model.harmonization == "none":
        if explicit is not None:
            raise PredictRefusal(f"{model.path} says its run did not harmonise, but --harmonization was given",
                                 "drop --harmonization: the model expects features without ComBat")
        return Harmonization("none", "the run did not harmonise (model.pt says harmonization=none)", run_id=known)
    if skip:
        if model.harmonization == "combat":
            raise PredictRefusal(f"{model.path} says its run harmonised with ComBat, so its weights expect "
                                 "harmonised features; --no-harmonization would give a wrong probability",
                                 f"drop --no-harmonization (the parameters are in {folder})")
        if known is not None and (files.harmonization(known)).exists():
            raise PredictRefusal(f"this site holds ComBat parameters of run {known} ({files.harmonization(known)})"
                                 ", so that run harmonised; --no-harmonization would give a wrong probability",
                                 "drop --no-harmonization")
        return Harmonization("none", "skipped at your request (--no-harmonization): the federation ran "
                                     "without harmonisation", run_id=known)

    if explicit is not None:
        explicit = Path(explicit).expanduser()
        doc = _read_params(explicit)
        file_run = None if doc.get("run_id") is None else str(doc["run_id"])
        strong = source in ("--run-id", "model.pt")
        if strong and file_run is not None and file_run != known:
            raise PredictRefusal(f"{explicit} holds the parameters of run {file_run}, but the model is of run "
                                 f"{known} ({source})",
                                 f"pass {files.harmonization(known)}, or the model.pt of run {file_run}")
        return _combat_from(explicit, doc, model, f"from {explicit} (--harmonization)", known)

    if known is not None:
        path = files.harmonization(known)
        if not path.exists():
            raise _missing(str(path), model, f"the model's run is {known}, from {source}")
        doc = _read_params(path)
        file_run = None if doc.get("run_id") is None else str(doc["run_id"])
        if file_run is not None and file_run != known:
            raise PredictRefusal(f"{path} holds the parameters of run {file_run}, not of run {known} (renamed?)",
                                 f"restore the file of run {known}, or pass the right one with --harmonization")
        return _combat_from(path, doc, model, f"ComBat parameters of run {known} (run id from {source})", known)

    # No run id anywhere: the one parameter file at the site that fits the model.
    files = sorted(folder.glob("run-*.json"))
    if not files:
        raise _missing(str(folder / "run-*.json"), model, "model.pt names no run and the site holds no parameters")
    fitting: list[tuple[Path, dict[str, Any], str]] = []
    unfit: list[str] = []
    for path in files:
        try:
            doc = _read_params(path)
        except PredictRefusal as exc:
            unfit.append(f"{path.name}: {exc.reason}")
            continue
        name_run = path.stem.removeprefix("run-")
        if doc.get("run_id") is not None and str(doc["run_id"]) != name_run:
            unfit.append(f"{path.name}: holds run {doc['run_id']}")
            continue
        problem = _feature_problem(doc, model)
        if problem:
            unfit.append(f"{path.name}: {problem}")
        else:
            fitting.append((path, doc, name_run))
    if len(fitting) > 1:
        runs = ", ".join(run for _, _, run in fitting)
        raise PredictRefusal(f"model.pt names no run, and this site holds parameters of several runs that fit its "
                             f"features (runs {runs} in {folder})",
                             "say which run made the model: --run-id N (the run folder is named <time>-runN), or "
                             "--harmonization FILE")
    if not fitting:
        raise PredictRefusal(f"none of the {len(files)} harmonisation file(s) in {folder} fits the model: "
                             + "; ".join(unfit),
                             "pass the parameters of the run that made this model (--run-id N or --harmonization "
                             "FILE); if this site has none for that run, rerun the federation with this site")
    path, doc, run = fitting[0]
    result = _combat_from(path, doc, model, f"ComBat parameters of run {run} (the only file at the site that fits "
                                            "the model's features; --run-id makes this explicit)", run)
    result.notes.append(f"model.pt names no run: used {path.name}, the only parameter file that fits")
    return result


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
        raise PredictRefusal(str(exc), "fix the site folder or its site.yaml (radfed site check SITE_DIR)") from exc
    _, work_dir = resolved_paths(root, config)
    label_map = dict(config.label_map) if config.label_map is not None else None
    return SiteInfo(config.name or root.name, root, work_dir, profile, label_map)


def case_from_site(site: SiteInfo, case_id: str) -> Case:
    """A case of the site's own manifest (or BraTS/DICOM folders), by id."""
    from client.site import SiteError, load_site

    try:
        loaded = load_site(site.root, site.profile.sequences)
    except SiteError as exc:
        raise PredictRefusal(str(exc), "fix the site folder or its site.yaml (radfed site check SITE_DIR)") from exc
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
        raise PredictRefusal(str(exc), "fix 'label_map' in the site's site.yaml (radfed site check SITE_DIR)") from exc
    except CaseInputError as exc:
        raise CaseRefusal(f"case {case.case_id}: {exc.reason}", exc.fix, case.case_id) from exc
    except (ValueError, RuntimeError) as exc:
        raise CaseRefusal(f"case {case.case_id}: pyradiomics failed on {exc}",
                          "check that region's segmentation and image: after resampling to the profile's spacing it "
                          "must keep the profile's minimum ROI size", case.case_id) from exc


# ------------------------------------------------------------------------------------------------------------
# Scoring and explaining


@dataclass
class Contribution:
    feature: str
    weight: float
    value: float  # harmonised
    z: float  # (value - pooled mean) / pooled std
    contribution: float  # weight * z

    @property
    def towards(self) -> str:
        return "HGG" if self.contribution > 0 else "BM" if self.contribution < 0 else "neither"

    def words(self) -> str:
        return describe(self.feature, self.z, self.contribution)

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "words": self.words(), "weight": self.weight, "value": self.value,
                "z": self.z, "contribution": self.contribution, "towards": self.towards}


@dataclass
class Prediction:
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
        ranked = sorted(self.contributions, key=lambda c: (-abs(c.contribution), c.feature))
        return ranked[:max(top, 0)]


def _finite_or_refuse(values: np.ndarray, names: list[str], case_id: str, stage: str, fix: str) -> None:
    bad = [n for n, v in zip(names, values, strict=True) if not np.isfinite(v)]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise CaseRefusal(f"case {case_id}: {len(bad)} of the model's {len(names)} features {stage} "
                          f"not finite (NaN/inf): {shown}", fix, case_id)


def score(features: Mapping[str, float], model: ModelFile, harmonization: Harmonization,
          case_id: str, covariates: Mapping[str, str] | None = None) -> tuple[float, float, list[Contribution]]:
    """(probability of HGG, logit, contributions) of one case's extracted features; ``covariates`` are its
    raw ComBat covariate values (e.g. {"age": "63"}) when the run adjusted for any."""
    from common.model import model_from_state, predict_proba

    absent = [n for n in model.features if n not in features]
    if absent:
        shown = ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else "")
        raise PredictRefusal(f"case {case_id}: the extraction gave no value for {len(absent)} of the model's "
                             f"features ({shown}), although the profile hash matches",
                             "extract with the federation's pyradiomics version (see the run's report)", case_id)
    x = np.array([[float(features[n]) for n in model.features]], dtype=np.float64)
    _finite_or_refuse(x[0], model.features, case_id, "are",
                      "check the case's images and segmentation (a region too small or uniform after "
                      "resampling gives undefined texture features); the model cannot score it without them")
    if harmonization.params is not None:
        x = harmonization.params.apply(x, harmonization.design(covariates or {}, case_id))
        _finite_or_refuse(x[0], model.features, case_id, "are after harmonisation",
                          "the site's ComBat parameters are damaged: restore the harmonisation file")
    net = model_from_state(model.state)
    probability = float(predict_proba(net, x)[0])
    mean = net.mean.detach().numpy()
    scale = net.scale.detach().numpy()
    z = (x[0] - mean) / scale
    w = model.weights
    contributions = [Contribution(n, float(w[j]), float(x[0, j]), float(z[j]), float(w[j] * z[j]))
                     for j, n in enumerate(model.features)]
    logit = float(np.sum(w * z) + model.intercept)
    return probability, logit, contributions


_SEQUENCES = {"t1c": "T1c", "flair": "FLAIR", "adc": "ADC", "t1": "T1", "t2": "T2"}
_REGIONS = {"enhancing": "the enhancing tumour", "necrosis": "the necrosis", "edema": "the peritumoral edema"}
_CLASSES = {"firstorder": "intensity", "glcm": "GLCM texture", "glrlm": "run-length texture",
            "glszm": "size-zone texture", "gldm": "grey-level dependence texture",
            "ngtdm": "neighbourhood-difference texture", "shape": "shape"}
_FEATURES = {"10Percentile": "10th percentile", "90Percentile": "90th percentile", "Idm": "inverse difference moment",
             "Idmn": "normalised inverse difference moment", "Id": "inverse difference",
             "Idn": "normalised inverse difference", "Imc1": "informational measure of correlation 1",
             "Imc2": "informational measure of correlation 2", "MCC": "maximal correlation coefficient"}


def describe(feature: str, z: float, contribution: float) -> str:
    """A feature's part in the result, in plain words."""
    parts = feature.split("/")
    where = feature
    if len(parts) == 3:
        seq, region, key = parts
        bits = key.split("_")
        image_type, klass, name = (bits[0], bits[1], "_".join(bits[2:])) if len(bits) >= 3 else ("original", "", key)
        words = _FEATURES.get(name) or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).lower()
        kind = _CLASSES.get(klass, klass)
        region_words = _REGIONS.get(region, region)
        filtered = "" if image_type == "original" else f", {image_type} filtered"
        where = (f"{words} ({kind}) of {region_words}" if seq == "shape" else
                 f"{words} ({kind}{filtered}) of {region_words} on {_SEQUENCES.get(seq, seq)}")
    if abs(z) < 0.05:
        level = f"is about the federation's average (z = {z:+.2f})"
    else:
        level = f"is {'higher' if z > 0 else 'lower'} than the federation's average (z = {z:+.2f})"
    if contribution > 0:
        effect = "which points to HGG"
    elif contribution < 0:
        effect = "which points to BM"
    else:
        effect = "which the model does not weigh"
    return f"{where} {level}, {effect}"


# ------------------------------------------------------------------------------------------------------------
# The whole command


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
    harmonization = resolve_harmonization(model, site.work_dir, run_id, harmonization_file, no_harmonization)
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
    unknown = sorted(set(covariates or {}) - {c.name for c in harmonization.covariates})
    if unknown:
        from common.covariates import describe as describe_covariates

        adjusted = describe_covariates(harmonization.covariates)
        raise PredictRefusal(f"--covariate {', '.join(unknown)}: the run's ComBat adjusted for "
                             f"{adjusted or 'no covariates'}",
                             f"give only {adjusted}" if adjusted else "drop --covariate", case.case_id)
    values = {**case.covariates, **(covariates or {})}  # --covariate overrides the manifest
    harmonization.design(values, case.case_id)  # refuse a missing covariate before the slow extraction
    features = extract_case(case, site)
    probability, logit, contributions = score(features, model, harmonization, case.case_id, values)
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
        "leans_towards": "HGG" if pred.probability >= THRESHOLD else "BM",
        "threshold": THRESHOLD,
        "logit": pred.logit,
        "intercept": pred.intercept,
        "drivers": [c.as_dict() for c in pred.drivers(top)],
        "contributions": [c.as_dict() for c in pred.contributions],
        "model": {"path": str(pred.model.path), "sha256": pred.model.sha256,
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
    leans = "HGG" if p >= THRESHOLD else "BM"
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
    lines += [f"    {c.contribution:+.3f}  {c.words()}" for c in drivers]
    lines += [
        f"    all contributions sum to {total:+.3f}; with the intercept {pred.intercept:+.3f} the log-odds are "
        f"{pred.logit:+.3f}",
        "",
        f"  model          {pred.model.path}",
        f"                 sha256 {pred.model.sha256}",
        f"                 weights sha256 {pred.model.weights_sha256} (the audit log's model_sha256)",
        f"                 run {pred.model.run_id or 'not named'}, {len(pred.model.features)} features, "
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


def _image_arg(text: str) -> tuple[str, Path]:
    seq, sep, path = text.partition("=")
    if not sep or not seq.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected SEQ=PATH (e.g. t1c=scans/p1_t1c.nii.gz), got {text!r}")
    return seq.strip(), Path(path.strip())


def _covariate_arg(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. age=63 or sex=F), got {text!r}")
    return name.strip(), value.strip()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``radfed predict`` to the CLI's subcommands."""
    parser = subparsers.add_parser(
        "predict", help="site administrator: the global model's probability of HGG vs BM for one case (offline)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Score one case with a run's global model, at the site: extraction with the federation's profile, the "
            "site's own ComBat parameters of that run, the model's standardisation. Prints the probability of HGG "
            "vs BM, the features that drove it, and the model's and profile's hashes. Nothing leaves the site.\n\n"
            "  radfed predict --model RUN/model.pt --site SITE_DIR --case-id ID\n"
            "  radfed predict --model RUN/model.pt --site SITE_DIR --image t1c=T1C --image flair=FLAIR "
            "--image adc=ADC --mask MASK\n\n"
            "The mask uses the site's label numbering (site.yaml 'label_map' applies).\n"
            "Exit codes: 0 probability computed; 1 the case cannot be scored (bad input or a non-finite "
            "feature; the message names the case and the fix); 2 refused or wrong usage (profile or protocol "
            "differs from the model's, harmonisation parameters missing, ambiguous or for other features, "
            "unreadable model)."))
    parser.add_argument("--model", required=True, help="the run's model.pt")
    parser.add_argument("--site", required=True, help="the site folder (its site.yaml, profile, output_dir)")
    parser.add_argument("--case-id", default=None, help="a case of the site's manifest (or BraTS/DICOM folders)")
    parser.add_argument("--image", action="append", type=_image_arg, default=[], metavar="SEQ=PATH",
                        help="one per profile sequence (default profile: t1c, flair, adc)")
    parser.add_argument("--mask", default=None, help="the case's multi-label mask")
    parser.add_argument("--case-name", default=None, help="a name for the case in messages (default: the mask's)")
    parser.add_argument("--run-id", default=None,
                        help="the run that made the model (default: model.pt's, else its folder's <time>-run<id>)")
    parser.add_argument("--harmonization", default=None, metavar="FILE",
                        help="this site's ComBat parameters (default <output_dir>/harmonization/run-<run id>.json)")
    parser.add_argument("--no-harmonization", action="store_true",
                        help="the federation ran with harmonization=none: apply no ComBat")
    parser.add_argument("--covariate", action="append", type=_covariate_arg, default=[], metavar="NAME=VALUE",
                        help="a ComBat covariate of the case (e.g. age=63, sex=F) when the run adjusted for any; "
                             "a site case's manifest columns are used otherwise")
    parser.add_argument("--top", type=int, default=5, help="how many driving features to show (default 5)")
    parser.add_argument("--json", action="store_true", help="print the result (or the refusal) as JSON")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``radfed predict``; returns the exit code (see the module doc)."""
    images: dict[str, Path] = {}
    try:
        for seq, path in args.image or []:
            if seq in images:
                raise PredictRefusal(f"--image {seq}= given twice", f"give one --image {seq}=PATH")
            images[seq] = path
        with offline():
            pred = predict(args.model, args.site, case_id=args.case_id, images=images,
                           mask=Path(args.mask) if args.mask else None, case_name=args.case_name,
                           run_id=args.run_id,
                           harmonization_file=Path(args.harmonization) if args.harmonization else None,
                           no_harmonization=args.no_harmonization, covariates=dict(args.covariate or []))
    except PredictRefusal as exc:
        if args.json:
            print(json.dumps({"schema": SCHEMA, "status": exc.status, "exit_code": exc.exit_code,
                              "case": exc.case_id, "reason": exc.reason, "fix": exc.fix, "offline": True,
                              "sent": "nothing"}, indent=2))
        else:
            word = "cannot score the case" if exc.exit_code == EXIT_BAD_CASE else "refused"
            print(f"radfed predict: {word}: {exc.reason}\n  fix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(prediction_json(pred, args.top), indent=2))
    else:
        print(render_text(pred, args.top))
    return EXIT_OK
