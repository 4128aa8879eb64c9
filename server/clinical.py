"""The clinical metrics of a run's final model, from the sites' aggregates only (server half of common.clinical).

Every evaluation reply carries, besides a site's own AUC, the terms of the pooled metrics: per-class score
histograms over the run's bins, the Brier sum and decision-curve counts at the run's thresholds. ``pooled``
combines the replies of one evaluation (all sites scored the same model) into the pooled AUC with its binning
bound, the pooled Brier score and the decision curve; ``calibration_phase`` fits the calibration slope and
intercept of the main run's final model in a few extra rounds (federated Newton, ``query.recalibrate``), each
round in the audit log. The result is metrics.json's ``final.pooled``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from common import clinical, protocol
from common.canon import arrays_sha256
from server.federation import Cohort, Run, RunRefused

log = logging.getLogger("flwr.radfed.server")

SPAN = 8.0  # common.clinical.score_edges' default: the bins are equal logit steps over [-SPAN, SPAN]

Terms = dict[str, Any]


def site_terms(reply: Message) -> Terms | None:
    """One evaluation reply's terms of the pooled metrics (None for a reply without them)."""
    arrays, values = reply.content.get("arrays"), reply.content["metrics"]
    if not isinstance(arrays, ArrayRecord) or "score-start" not in arrays or "sse" not in values:  # type: ignore[operator]
        return None
    return {"start": arrays["score-start"].numpy(), "end": arrays["score-end"].numpy(),
            "sse": float(values["sse"]), "n": int(values["num-examples"]),  # type: ignore[arg-type, index]
            "tp_fp": arrays["decision"].numpy(), "kept": arrays["decision-kept"].numpy(),
            "n_pos_neg": arrays["decision-totals"].numpy()}


def terms_of(sites: dict[int, str], replies: Iterable[Message]) -> dict[str, Terms]:
    """Per site name, the terms of one evaluation's replies (sites that sent none are left out)."""
    out = {}
    for reply in replies:
        terms = site_terms(reply)
        if terms is not None:
            out[sites[reply.metadata.src_node_id]] = terms
    return out


def pooled(terms: dict[str, Terms], score_bins: int, decision_thresholds: int) -> dict[str, Any]:
    """Pooled AUC (with the range the exact value lies in, its bound and 95% interval), Brier score and decision
    curve of one evaluation's sites, sent over the run's ``score-bins`` and ``decision-thresholds``; {} without
    terms. Sites in name order, so the sums are reproducible."""
    if not terms:
        return {}
    replies = [terms[s] for s in sorted(terms)]
    auc = clinical.pooled_auc(replies)
    roc = clinical.pooled_roc(replies)  # its area is auc["auc"]: the report draws it beside that number
    ci = clinical.auc_interval(auc)
    thresholds = clinical.decision_thresholds(decision_thresholds)
    curve = clinical.pooled_net_benefit(replies, thresholds)
    kept_everywhere = np.all([np.asarray(r["kept"]) == 1 for r in replies], axis=0)
    return {
        "sites": sorted(terms), "n": int(sum(r["n"] for r in replies)),
        "n_hgg": int(auc["n_pos"]), "n_bm": int(auc["n_neg"]),
        "auc": auc["auc"], "auc_bound": auc["bound"], "auc_low": auc["low"], "auc_high": auc["high"],
        "auc_var": auc["variance"], "auc_ci": list(ci),
        "roc": {"fpr": roc["fpr"].tolist(), "tpr": roc["tpr"].tolist()},
        "binning": {"bins": score_bins, "scale": "logit", "span": SPAN},
        "brier": clinical.pooled_brier(replies),
        "net_benefit": {key: np.asarray(value).tolist() for key, value in curve.items()}
        | {"kept_by_every_site": kept_everywhere.tolist()},
    }


def _recalibrate_request(config: dict[str, Any], params: np.ndarray, rnd: int) -> dict[str, Any]:
    return {**config, "intercept": float(params[0]), "slope": float(params[1]), "server-round": rnd}


def prefetch_calibration(run: Run, cohort: Cohort, arrays: ArrayRecord, config: dict[str, Any]) -> None:
    """The calibration fit's first round of the model ``arrays`` (at (a, b) = (0, 1), so it waits for nothing) goes
    out with the cohort's next query, the model's final evaluation (merge-phases, server/merging.py); the fit
    (``calibration_phase``) takes those replies when it asks exactly that."""
    if run.config.recalibration_max_rounds > 0 and run.config.internal_validation != "cv":
        cohort.prefetch(run, protocol.RECALIBRATE, _recalibrate_request(config, clinical.START, 1),
                        per_node=lambda _: RecordDict({"arrays": arrays}))


def _site_fit_request(run: Run, config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "max-rounds": run.config.recalibration_max_rounds}


def _model_sha256(arrays: ArrayRecord) -> str:
    """The audited hash of the model a calibration fit is about (the same hash whoever fits it)."""
    return arrays_sha256(dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True)))


def prefetch_site_fit(run: Run, cohort: Cohort, arrays: ArrayRecord, config: dict[str, Any]) -> None:
    """``site_fit``'s request rides with the cohort's next query (merge-phases): no round trip of its own."""
    if run.config.recalibration_max_rounds > 0:
        cohort.prefetch(run, protocol.CALIBRATION_FIT, _site_fit_request(run, config),
                        per_node=lambda _: RecordDict({"arrays": arrays}))


def site_fit(run: Run, cohort: Cohort, arrays: ArrayRecord, config: dict[str, Any]) -> dict[str, Any]:
    """``calibration_phase`` for a cohort of one site (a leave-one-site-out fold's held-out site): the site runs the
    same Newton fit on its own terms (``query.calibration_fit``) and sends the fit, in one round trip (none when it
    rode with the scoring: ``prefetch_site_fit``) instead of one per Newton step; the same numbers."""
    cap = run.config.recalibration_max_rounds
    if cap == 0:
        return {"skipped": "recalibration-max-rounds = 0"}
    model_sha256 = _model_sha256(arrays)
    replies = cohort.ask(run, "calibration fit", protocol.CALIBRATION_FIT, _site_fit_request(run, config),
                         per_node=lambda _: RecordDict({"arrays": arrays}))
    if not replies:
        raise RunRefused("the site did not send its calibration fit")
    (nid, reply), = replies.items()
    got = reply.content["metrics"]
    fit = {"intercept": float(got["intercept"]), "slope": float(got["slope"]),  # type: ignore[arg-type]
           "intercept_se": float(got["intercept-se"]), "slope_se": float(got["slope-se"]),  # type: ignore[arg-type]
           "loss": float(got["loss"]), "n": int(got["n"]), "rounds": int(got["rounds"]),  # type: ignore[arg-type]
           "converged": bool(got["converged"]), "max_rounds": cap, "sites": [cohort.fed.sites[nid]],
           "fitted_at": "site"}
    run.audit.append("recalibration", **fit, model_sha256=model_sha256, **cohort.tag)
    return fit


def calibration_phase(run: Run, cohort: Cohort, arrays: ArrayRecord, config: dict[str, Any]) -> dict[str, Any]:
    """Calibration slope and intercept of the final model ``arrays`` on the cohort's held-out cases: logistic
    recalibration y ~ a + b logit(p) fitted by Newton steps on the sites' summed gradients and Hessians
    (common.clinical.fit_recalibration), at most ``recalibration-max-rounds`` rounds. ``config``: what the
    model's evaluate messages carry (its features). Returns the fit, or ``error`` / ``skipped``; a failed fit
    never stops the run (the model and its other metrics stand)."""
    cap = run.config.recalibration_max_rounds
    if cap == 0:
        return {"skipped": "recalibration-max-rounds = 0"}
    model_sha256 = _model_sha256(arrays)
    answered: list[list[str]] = []

    def query(params: np.ndarray) -> list[dict[str, Any]]:
        rnd = len(answered) + 1
        replies = cohort.ask(run, "recalibrate", protocol.RECALIBRATE, _recalibrate_request(config, params, rnd),
                             per_node=lambda _: RecordDict({"arrays": arrays}), server_round=rnd)
        sites = [cohort.fed.sites[nid] for nid in replies]
        if answered and sites != answered[0]:  # the sums would then be over other cases than round 1's
            raise RunRefused(f"the sites answering changed during the calibration fit ({answered[0]} -> {sites})")
        answered.append(sites)
        terms = [{"gradient": r.content["arrays"]["gradient"].numpy(),  # type: ignore[union-attr]
                  "hessian": r.content["arrays"]["hessian"].numpy(),  # type: ignore[union-attr]
                  "loss": float(r.content["metrics"]["loss"]), "n": int(r.content["metrics"]["n"])}  # type: ignore[arg-type]
                 for r in replies.values()]
        run.audit.append("recalibration-round", round=rnd, intercept=float(params[0]), slope=float(params[1]),
                         model_sha256=model_sha256, **cohort.tag,
                         sites={s: {"n": t["n"], "loss": t["loss"],
                                    "terms_sha256": arrays_sha256({"gradient": t["gradient"], "hessian": t["hessian"]})}
                                for s, t in zip(sites, terms, strict=True)})
        return terms

    try:
        fit = clinical.fit_recalibration(query, max_rounds=cap)
    except (RunRefused, np.linalg.LinAlgError) as exc:
        log.warning("Calibration fit failed: %s", exc)
        run.audit.append("recalibration", error=str(exc), rounds=len(answered), **cohort.tag)
        return {"error": str(exc), "rounds": len(answered)}
    fit = {**fit, "max_rounds": cap, "sites": answered[0] if answered else []}
    run.audit.append("recalibration", **fit, model_sha256=model_sha256, **cohort.tag)
    log.info("Calibration of the final model: slope %.3f, intercept %.3f (%d round(s), %s)", fit["slope"],
             fit["intercept"], fit["rounds"], "converged" if fit["converged"] else "not converged")
    return fit
