"""Validation inside one run: leave-one-site-out folds, local-only baselines and cross-validation folds, each
the whole pipeline on its own cohort, so nothing is learned from the cases a model is scored on.

Each fold is the whole pipeline (server.pipeline.fit) on the other sites: the feature agreement, ComBat's
pooled estimates, moments, selection and training see none of the held-out site's data. The held-out site
then harmonises itself against the fold's pooled ComBat estimates exactly as a late-joining hospital does
(its own location/scale from all its usable cases, no labels; ``radfed site join``) and scores the fold's
model on all its usable cases, sending counts, AUC with its DeLong variance and k-anonymous curves.

The local-only baseline is the same pipeline on one site alone (its own ComBat, standardisation, selection
and model), scored on its own held-out split (internal) and, like a fold's model, at every other site after
that site joins its harmonisation (external). What the federation gains at an unseen site is the
leave-one-site-out AUC there minus the mean AUC of the other sites' local-only models there
(``common.metrics.federation_gain``).

Cross-validation (``internal-validation = "cv"``) refits the pipeline on every site's other folds for each fold
of whole release blocks; each site keeps its held-out fold's scores and finally evaluates them together.

Each fold is a ``FoldJob``; ``server.folds.run_folds`` runs a group of them (the leave-one-site-out folds with the
local-only baselines; the cross-validation folds) together in the same rounds, or one after another
(``fold-batching``), with identical results.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from flwr.app import RecordDict

from common import metrics, protocol
from common.split import cv_tag
from server import clinical, comparison, harmonization, pipeline
from server.federation import Cohort, FeatureAgreement, Federation, Run, RunRefused
from server.folds import FoldJob, run_folds
from server.strategy import evaluation_records, record_sha256

log = logging.getLogger("flwr.radfed.server")


def score_all(run: Run, fitted: pipeline.Fitted, trained_on: Cohort, scorers: Cohort, outside: bool = True,
              paired: bool = True, calibrated: Sequence[str] = ()) -> tuple[dict[str, dict[str, dict[str, object]]],
                                                                        dict[str, object]]:
    """``scorers`` score every family's model fitted on ``trained_on`` and send metrics: per family, per scoring
    site; and, with several families and ``paired``, their paired comparison (server.comparison). ``outside``: sites
    that were not in the cohort first join its harmonisation (once), then score all their usable cases; otherwise
    the cohort's own sites score their held-out split. ``scorers`` carries the cohort's fold tag. The first
    calibration round of each family in ``calibrated`` (``_calibration`` fits them next) rides with the scoring."""
    by_family: dict[str, dict[str, dict[str, object]]] = {}
    try:
        if outside and fitted.harmonization is not None:
            harmonization.join_phase(run, scorers, fitted.harmonization)
        for family in calibrated:  # after the join (riders go in the order added): the site needs its harmonisation
            clinical.prefetch_site_fit(run, scorers, fitted.models[family].arrays, _calibration_config(fitted, family))
        for family, trained in fitted.models.items():
            config = {**fitted.config(family), "split": "all" if outside else "test",
                      "server-round": max(trained.training) if trained.training else run.config.num_server_rounds}
            replies = scorers.ask(run, "external validation" if outside else "evaluate", protocol.EVALUATE, config,
                                  per_node=lambda _, a=trained.arrays: RecordDict({"arrays": a}))
            per_site, site_curves = evaluation_records(scorers.fed.sites, replies.values())
            by_family[family] = {site: {**values, "ci": metrics.intervals(values), **site_curves.get(site, {})}
                                 for site, values in per_site.items()}
    except RunRefused:  # every scoring site failed: say why, in their words
        reasons = "; ".join(f"{d['site']}: {d['reason']}" for d in scorers.fed.dropped)
        raise RunRefused(f"could not score the model ({reasons})") from None
    return by_family, comparison.compare(run, fitted, scorers, "all" if outside else "test") if paired else {}


def _without_curves(record: dict[str, object]) -> dict[str, object]:
    """A site's metrics without its ROC and calibration points (what the audit log and the baselines keep)."""
    return {k: v for k, v in record.items() if k not in ("roc", "calibration")}


def _loso_fold(run: Run, fed: Federation, agreement: FeatureAgreement, covariates: str, held_node: int,
               held: str, family: str = "", main: pipeline.Fitted | None = None) -> dict[str, object]:
    """One leave-one-site-out fold: fit without ``held``, score every family at ``held``; the record of the
    ``family`` in use (with several, also each one's metrics and their paired comparison), or ``error``. ``main``:
    the main run's fit (its ComBat sums and, with ``loso-warm-start``, its models: ``pipeline.fit``)."""
    others = {name for nid, name in fed.sites.items() if nid != held_node}
    # its first steps, if the main run worked them out while it waited (server.fold_prefetch): the same numbers
    start = main.prefetch.take(held, agreement, others) if main is not None and main.prefetch is not None else None
    train_on = Cohort(fed.subset(others), start.agreement if start else agreement.restricted(others), fold=held)
    outsider = Cohort(fed.subset({held}), train_on.agreement, fold=held)
    log.info("External validation: training without %s on %s", held, ", ".join(sorted(others)))
    try:
        fitted = pipeline.fit(run, train_on, covariates, evaluate_rounds=False, main=main, start=start)
        fitted.family = family or fitted.family
        calibrated = list(fitted.models) if len(fitted.models) > 1 else [fitted.family]
        every, compared = score_all(run, fitted, train_on, outsider, calibrated=calibrated)
        scored = every[fitted.family]
        if held not in scored:
            raise RunRefused(f"{held} could not score the model")
        record: dict[str, object] = {**scored[held], "trained_on": sorted(others), "features": fitted.chosen.names}
        # each family's calibration slope at the held-out site (the one in use's always): the main run's
        # recalibration rounds (server.clinical.calibration_phase) over every case the site scored
        fits = {f: _calibration(run, fitted, outsider, f) for f in calibrated}
        record["calibration_fit"] = fits[fitted.family]
        if len(every) > 1:
            record["families"] = {f: {**_without_curves(r.get(held, {})), "calibration": fits[f]}
                                  for f, r in every.items()}
            record["comparison"] = compared
        values = {k: v for k, v in _without_curves(scored[held]).items() if k != "ci"}
        run.audit.append("external-validation", fold=held, trained_on=record["trained_on"],
                         model_sha256=record_sha256(fitted.trained.arrays), metrics=values, ci=record["ci"],
                         calibration=record["calibration_fit"])
        log.info("External validation at %s: AUC %.3f over %d cases", held, values["auc"], values["n"])
        return record
    except RunRefused as exc:
        log.warning("External validation at %s failed: %s", held, exc)
        run.audit.append("external-validation", fold=held, error=str(exc))
        return {"error": str(exc)}


def _calibration_config(fitted: pipeline.Fitted, family: str) -> dict[str, object]:
    """What a calibration fit's requests carry at sites outside the cohort: the model's features, all their cases."""
    return {**fitted.config(family), "split": "all"}


def _calibration(run: Run, fitted: pipeline.Fitted, scorer: Cohort, family: str) -> dict[str, object]:
    """Calibration slope (with its standard error and 95% interval) and intercept of one family's model at the
    held-out site, fitted there (``clinical.site_fit``); ``error`` / ``skipped`` as calibration_phase says."""
    try:
        cal = clinical.site_fit(run, scorer, fitted.models[family].arrays, _calibration_config(fitted, family))
    except RunRefused as exc:  # the fold's metrics stand without it, as when the federated fit fails
        log.warning("Calibration fit at %s failed: %s", ", ".join(scorer.fed.sites.values()), exc)
        run.audit.append("recalibration", error=str(exc), **scorer.tag)
        cal = {"error": str(exc)}
    kept = {k: cal[k] for k in ("slope", "slope_se", "intercept", "converged", "rounds", "error", "skipped")
            if k in cal}
    return {**kept, "slope_ci": metrics.slope_interval(cal)} if "slope" in cal else kept


def loso_jobs(fed: Federation, agreement: FeatureAgreement, covariates: str = "", family: str = "",
              main: pipeline.Fitted | None = None) -> list[FoldJob]:
    """One fold per site, in site order: the pipeline on the other sites, scored at the held-out one."""
    sites = sorted(fed.sites.items(), key=lambda kv: kv[1])
    return [FoldJob("leave-one-site-out", held,
                    lambda run, n=nid, h=held: _loso_fold(run, fed, agreement, covariates, n, h, family, main))
            for nid, held in sites]


def leave_one_site_out(run: Run, fed: Federation, agreement: FeatureAgreement,
                       covariates: str = "", family: str = "",
                       main: pipeline.Fitted | None = None) -> dict[str, dict[str, object]]:
    """Per held-out site: n, counts, AUC, rates, 95% intervals, ROC and calibration points of the ``family`` in use
    (default: the first listed) and its calibration slope there (``calibration_fit``); with several families also
    ``families`` (each one's metrics and slope there) and ``comparison`` (paired, vs the first listed); or
    ``error``."""
    return run_folds(run, loso_jobs(fed, agreement, covariates, family, main))


def _local_fold(run: Run, fed: Federation, agreement: FeatureAgreement, covariates: str,
                site: str) -> dict[str, object]:
    """One site's local-only baseline: its internal and external scores, or ``error``."""
    others = {name for name in fed.sites.values() if name != site}
    fold = f"local:{site}"
    alone = Cohort(fed.subset({site}), agreement.restricted({site}), fold=fold)
    log.info("Local-only baseline: %s alone", site)
    try:
        fitted = pipeline.fit(run, alone, covariates, evaluate_rounds=False)
        # under cross-validation nothing is held out of the main split: its internal score would need its own
        # folds (one fit each); the comparison that matters, at the other sites, does not
        # every family's model, without a paired comparison (the baseline is compared with the federation)
        internal = {} if run.config.internal_validation == "cv" else score_all(
            run, fitted, alone, Cohort(fed.subset({site}), alone.agreement, fold=fold), outside=False, paired=False)[0]
        external = score_all(run, fitted, alone, Cohort(fed.subset(others), alone.agreement, fold=fold),
                             paired=False)[0]
    except RunRefused as exc:
        log.warning("Local-only baseline of %s failed: %s", site, exc)
        run.audit.append("local-only", site=site, error=str(exc))
        return {"error": str(exc)}
    per_family = {f: {"internal": _without_curves(internal.get(f, {}).get(site, {})),
                      "external": {s: _without_curves(r) for s, r in sorted(external[f].items())}}
                  for f in fitted.models}
    # the first listed family's records stay at the top: the federation gain compares them
    record: dict[str, object] = {**per_family[fitted.family], "features": fitted.chosen.names}
    if len(per_family) > 1:
        record["families"] = per_family
    run.audit.append("local-only", site=site, model_sha256=record_sha256(fitted.trained.arrays),
                     internal=record["internal"], external=record["external"],
                     **({"families": per_family} if len(per_family) > 1 else {}))
    return record


def local_only_jobs(fed: Federation, agreement: FeatureAgreement, covariates: str = "") -> list[FoldJob]:
    """One baseline per site, in site order (fold tag ``local:<site>``)."""
    return [FoldJob("local-only", f"local:{site}",
                    lambda run, s=site: _local_fold(run, fed, agreement, covariates, s))
            for site in sorted(fed.sites.values())]


def local_only(run: Run, fed: Federation, agreement: FeatureAgreement,
               covariates: str = "") -> dict[str, dict[str, object]]:
    """Per site: the model it would build alone (the whole pipeline on its own training split), scored on its
    own held-out split (``internal``) and at every other site (``external``, by site); or ``error``."""
    done = run_folds(run, local_only_jobs(fed, agreement, covariates))
    return {fold.removeprefix("local:"): record for fold, record in done.items()}


Records = dict[str, dict[str, object]]


def external_and_local(run: Run, fed: Federation, agreement: FeatureAgreement, covariates: str, loso: bool,
                       local: bool, family: str = "", main: pipeline.Fitted | None = None) -> tuple[Records, Records]:
    """The leave-one-site-out folds (scored as ``family``, the run's choice) and the local-only baselines asked for,
    all together in the same rounds (``fold-batching``); returns (loso by held-out site, local-only by site).
    ``main``: the main run's fit, which each leave-one-site-out fold starts from (``pipeline.fit``)."""
    jobs = (loso_jobs(fed, agreement, covariates, family, main) if loso else []) + \
        (local_only_jobs(fed, agreement, covariates) if local else [])
    done = run_folds(run, jobs)
    held = {j.fold for j in jobs if j.kind == "leave-one-site-out"}
    return ({f: r for f, r in done.items() if f in held},
            {f.removeprefix("local:"): r for f, r in done.items() if f not in held})


def _cv_fold(run: Run, fed: Federation, agreement: FeatureAgreement, covariates: str,
             tag: str) -> dict[str, object]:
    """One cross-validation fold: fit on every site's other folds, each site scores (and keeps) its fold-``tag``
    cases; the sites' metrics, or ``error``."""
    names = set(fed.sites.values())
    cohort = Cohort(fed.subset(names), agreement, fold=tag)
    log.info("Cross-validation: fold %s (%d folds x %d repeat(s))", tag, run.config.cv_folds, run.config.cv_repeats)
    try:
        fitted = pipeline.fit(run, cohort, covariates, evaluate_rounds=False)
        # every family scores the fold, so each site keeps every family's out-of-fold scores (compared per repeat
        # afterwards, over every case: server.comparison.compare_out_of_fold; a per-fold comparison would go unused)
        scorers = Cohort(fed.subset(names), agreement, fold=tag)
        scored = score_all(run, fitted, cohort, scorers, outside=False, paired=False)[0][fitted.family]
    except RunRefused as exc:  # without this fold some cases have no out-of-fold score: the sites say which
        log.warning("Cross-validation fold %s failed: %s", tag, exc)
        run.audit.append("cross-validation", fold=tag, error=str(exc))
        return {"error": str(exc)}
    plain = {s: _without_curves(r) for s, r in scored.items()}
    run.audit.append("cross-validation", fold=tag, model_sha256=record_sha256(fitted.trained.arrays),
                     sites=plain, features=fitted.chosen.names)
    return plain


def cross_validate(run: Run, fed: Federation, agreement: FeatureAgreement,
                   covariates: str = "") -> dict[str, object]:
    """``cv-folds``-fold cross-validation (``cv-repeats`` times) over every site at once: per fold v, the whole
    pipeline on the other folds' cases of every site, scored by each site on its fold-v cases (which it keeps,
    as out-of-fold scores); then each site evaluates its out-of-fold scores (their mean over the repeats) over
    all its usable cases.

    Returns {"folds": {v: {site: metrics}}, "sites": {site: metrics}, "curves": {site: roc, calibration},
    "terms": {site: the pooled clinical metrics' terms}, "comparison": the families' paired comparison ({} with
    one)}."""
    names = set(fed.sites.values())
    repeats, n_folds = run.config.cv_repeats, run.config.cv_folds
    jobs = [FoldJob("cross-validation", tag, lambda r, t=tag: _cv_fold(r, fed, agreement, covariates, t))
            for tag in (cv_tag(r, v) for r in range(repeats) for v in range(n_folds))]
    folds: dict[str, dict[str, object]] = run_folds(run, jobs)
    everyone = Cohort(fed.subset(names), agreement)
    out: dict[str, object] = {"folds": folds, "families": {}}
    for family in run.config.compared:  # the first listed first: its results are the run's until a choice
        try:
            replies = everyone.ask(run, "out-of-fold", protocol.OUT_OF_FOLD,
                                   {"pos-weight": agreement.pos_weight, "family": family})
        except RunRefused:
            reasons = "; ".join(f"{d['site']}: {d['reason']}" for d in everyone.fed.dropped)
            raise RunRefused(f"no site could evaluate its out-of-fold scores ({reasons})") from None
        per_site, site_curves = evaluation_records(everyone.fed.sites, replies.values())
        tag = {"family": family} if len(run.config.compared) > 1 else {}
        run.audit.append("out-of-fold", sites=per_site, aggregate=metrics.combine_sites(list(per_site.values())),
                         **tag)
        out["families"][family] = {"sites": per_site, "curves": site_curves,  # type: ignore[index]
                                   "terms": clinical.terms_of(everyone.fed.sites, replies.values())}
    # with several families, their paired comparison over the same out-of-fold scores (server.comparison)
    out["comparison"] = comparison.compare_out_of_fold(run, everyone)
    return {**out, **out["families"][run.config.families[0]]}  # type: ignore[index]
