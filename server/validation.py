"""External validation: leave-one-site-out folds inside one run, with nothing learned from the held-out site.

Each fold is the whole pipeline (server.pipeline.fit) on the other sites: the feature agreement, ComBat's
pooled estimates, moments, selection and training see none of the held-out site's data. The held-out site
then harmonises itself against the fold's pooled ComBat estimates exactly as a late-joining hospital does
(its own location/scale from all its usable cases, no labels; ``radfed site join``) and scores the fold's
model on all its usable cases, sending counts, AUC with its DeLong variance and k-anonymous curves.
"""

from __future__ import annotations

import logging

from flwr.app import RecordDict

from common import metrics, protocol
from server import phases, pipeline, training
from server.federation import Cohort, FeatureAgreement, Federation, Run, RunRefused
from server.strategy import evaluation_records, record_sha256

log = logging.getLogger("flwr.radfed.server")


def score_outside(run: Run, fitted: pipeline.Fitted, trained_on: Cohort, outsider: Cohort) -> dict[str, object]:
    """Sites outside ``trained_on`` (in ``outsider``, which carries the fold's tag) join its harmonisation and
    score its model on all their usable cases. Returns the metrics per outside site."""
    trained, chosen = fitted.trained, fitted.chosen
    config = {**training.shared_config(chosen, trained_on.agreement.pos_weight), "split": "all",
              "server-round": max(trained.training) if trained.training else run.config.num_server_rounds}
    try:
        if fitted.harmonization is not None:
            phases.join_phase(run, outsider, fitted.harmonization)
        replies = outsider.ask(run, "external validation", protocol.EVALUATE, config,
                               per_node=lambda _, a=trained.arrays: RecordDict({"arrays": a}))
    except RunRefused:  # every outside site failed: say why, in their words
        reasons = "; ".join(f"{d['site']}: {d['reason']}" for d in outsider.fed.dropped)
        raise RunRefused(f"could not score the model ({reasons})") from None
    per_site, site_curves = evaluation_records(outsider.fed.sites, replies.values())
    return {site: {**values, "ci": metrics.intervals(values), **site_curves.get(site, {})}
            for site, values in per_site.items()}


def leave_one_site_out(run: Run, fed: Federation, agreement: FeatureAgreement,
                       covariates: str = "") -> dict[str, dict[str, object]]:
    """Per held-out site: n, counts, AUC, rates, 95% intervals, ROC and calibration; or ``error``."""
    folds: dict[str, dict[str, object]] = {}
    for held_node, held in sorted(fed.sites.items(), key=lambda kv: kv[1]):
        others = {name for nid, name in fed.sites.items() if nid != held_node}
        train_on = Cohort(fed.subset(others), agreement.restricted(others), fold=held)
        outsider = Cohort(fed.subset({held}), train_on.agreement, fold=held)
        log.info("External validation: training without %s on %s", held, ", ".join(sorted(others)))
        try:
            fitted = pipeline.fit(run, train_on, covariates, evaluate_rounds=False)
            scored = score_outside(run, fitted, train_on, outsider)
            if held not in scored:
                raise RunRefused(f"{held} could not score the model")
            record: dict[str, object] = {**scored[held], "trained_on": sorted(others),
                                         "features": fitted.chosen.names}
            values = {k: v for k, v in scored[held].items() if k not in ("ci", "roc", "calibration")}
            run.audit.append("external-validation", fold=held, trained_on=record["trained_on"],
                             model_sha256=record_sha256(fitted.trained.arrays), metrics=values,
                             ci=record["ci"])
            folds[held] = record
            log.info("External validation at %s: AUC %.3f over %d cases", held, values["auc"], values["n"])
        except RunRefused as exc:
            log.warning("External validation at %s failed: %s", held, exc)
            run.audit.append("external-validation", fold=held, error=str(exc))
            folds[held] = {"error": str(exc)}
    return folds
