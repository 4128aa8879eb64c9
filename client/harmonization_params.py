"""The site's ComBat parameters for the run that made a model: where they are, and whether they fit it.

Each site keeps the ComBat parameters it fitted in a run (or fitted later with ``radfed site join``) in
``<output_dir>/harmonization/run-<run id>.json``. ``resolve_harmonization`` finds the file of the model's run
and checks it, or says why none applies:

- which run made the model: ``--run-id``, else ``model.pt["run_id"]``, else the run folder's name
  (``<time>-run<id>``), else the only parameter file at the site whose feature list covers the model's features;
- whether the run harmonised: ``model.pt["harmonization"]`` when present; otherwise a missing parameter file is
  a refusal unless ``--no-harmonization`` says the federation ran without it;
- the file must hold the run's agreed features (``model.pt["agreed_features_sha256"]`` when present) or at
  least the model's; its parameters are restricted to the model's features, in the model's order (ComBat acts
  feature by feature, so this equals harmonising the whole agreed list and then picking the model's columns).

The result is a ``Harmonization``: what predict applies between extraction and the model, with the run's
covariates and where the parameters came from. Every problem is a ``PredictRefusal`` naming the file and the
fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.predict_refusals import CaseRefusal, PredictRefusal
from client.sitefiles import SiteFiles

if TYPE_CHECKING:
    from client.modelfile import ModelFile
    from common.combat import SiteCombat
    from common.covariates import Covariate


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
    lacking = [n for n in model.radiomics if n not in set(features)]
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
    cols = np.array([index[n] for n in model.radiomics], dtype=np.int64)
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


def _missing(path_text: str, model: ModelFile, why: str, site_dir: Path | None) -> PredictRefusal:
    joiner = model.path.parent / "harmonization.json"  # model.pt sits in its run folder, beside this file
    site = site_dir if site_dir is not None else "SITE_DIR"
    options = ["if this site took part in that run, its output_dir may have moved: pass --harmonization FILE",
               f"if it did not take part, join after the run first: radfed site join {joiner} --site {site} (fits "
               "this site's own ComBat location/scale against the run's pooled estimates; nothing leaves the site), "
               "then predict again"]
    if model.harmonization is None:
        options.append("if the federation ran with harmonization=none, pass --no-harmonization")
    return PredictRefusal(f"no harmonisation parameters of this site for the model's run: looked for {path_text}"
                          f" ({why})", "; ".join(options))


def resolve_harmonization(model: ModelFile, work_dir: Path, run_id: str | None = None,
                          explicit: Path | None = None, skip: bool = False,
                          site_dir: Path | None = None) -> Harmonization:
    """Find and check the site's ComBat parameters for the model's run (see the module doc); ``site_dir`` only
    completes the command a refusal suggests."""
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
            raise _missing(str(path), model, f"the model's run is {known}, from {source}", site_dir)
        doc = _read_params(path)
        file_run = None if doc.get("run_id") is None else str(doc["run_id"])
        if file_run is not None and file_run != known:
            raise PredictRefusal(f"{path} holds the parameters of run {file_run}, not of run {known} (renamed?)",
                                 f"restore the file of run {known}, or pass the right one with --harmonization")
        return _combat_from(path, doc, model, f"ComBat parameters of run {known} (run id from {source})", known)

    # No run id anywhere: the one parameter file at the site that fits the model.
    files = sorted(folder.glob("run-*.json"))
    if not files:
        raise _missing(str(folder / "run-*.json"), model, "model.pt names no run and the site holds no parameters",
                       site_dir)
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
