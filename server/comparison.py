"""Model families side by side: their paired comparison from each site's aggregates, and the run's choice of model.

``compare``: every site of a cohort scores its evaluation cases with every family's model (one
``query.compare`` message holding all of them) and sends the AUCs, their paired DeLong covariance and Brier
sums; the server pools sites by inverse variance (common.delong) into each family's AUC and Brier difference to
the reference (the first listed family), with 95% intervals and p-values.

``compare_out_of_fold``: the same under cross-validation, over every usable case's out-of-fold scores (each from
the model of the fold that held the case out), one ``query.compare_out_of_fold`` per repeat; sites pooled by inverse
variance per repeat, the repeats averaged (mean difference with the mean of the repeats' standard errors: they share
their cases, so they are not independent).

``choose``: the run's ``model-choice`` rule, fixed in the plan before any external validation: the family with
the highest internal validated AUC (held-out split, or out-of-fold under cross-validation), ties to the first
listed. It is audited (``model-choice``) before the leave-one-site-out folds start.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from common import delong, metrics, protocol
from server import clinical
from server.federation import Cohort, Run, RunRefused
from server.pipeline import Fitted

log = logging.getLogger("flwr.radfed.server")


def compare(run: Run, fitted: Fitted, scorers: Cohort, split: str) -> dict[str, object]:
    """Paired comparison of ``fitted``'s families at the ``scorers`` (``split``: "test" for a cohort's own held-out
    cases, "all" at sites outside it, which have joined its harmonisation): per family but the reference,
    ``auc_diff`` (family - reference) with ``auc_diff_ci`` and ``p_value``, ``brier_diff`` with its interval;
    ``sites`` the per-site AUCs. {} with one family; ``error`` when no site could compare."""
    names = list(fitted.models)
    if len(names) < 2:
        return {}
    arrays = ArrayRecord({f"{name}|{key}": Array(np.ascontiguousarray(value))
                          for name in names for key, value in fitted.compared_arrays(name).items()})
    config = {**fitted.config(names[0]), "split": split}
    try:
        replies = scorers.ask(run, "comparison", protocol.COMPARE, config,
                              per_node=lambda _: RecordDict({"arrays": arrays}))
    except RunRefused as exc:
        log.warning("Paired comparison failed: %s", exc)
        return {"error": str(exc)}
    sites = _site_comparisons(scorers, replies)
    pairs = delong.combine(list(sites.values()), names)
    result = {"reference": names[0], "families": names, "pairs": pairs,
              "sites": {s: dict(zip(names, c.auc.tolist(), strict=True)) for s, c in sorted(sites.items())}}
    run.audit.append("family-comparison", split=split, **result, **scorers.tag)
    return result


def compare_out_of_fold(run: Run, everyone: Cohort) -> dict[str, object]:
    """Cross-validation's paired comparison: per repeat, each site compares the families on the out-of-fold scores
    of all its usable cases (``query.compare_out_of_fold``) and the sites are pooled by inverse variance as for a
    held-out split; the repeats are then averaged (common.delong.average_repeats: mean difference, mean standard
    error, since repeats of the same cases are not independent). {} with one family; ``error`` when no site could
    compare."""
    names = list(run.config.compared)
    if len(names) < 2:
        return {}
    repeats: list[dict[str, object]] = []
    for repeat in range(run.config.cv_repeats):
        try:
            replies = everyone.ask(run, "out-of-fold comparison", protocol.COMPARE_OUT_OF_FOLD, {"repeat": repeat})
        except RunRefused as exc:
            log.warning("Paired comparison of the out-of-fold scores failed: %s", exc)
            return {"error": str(exc)}
        sites = _site_comparisons(everyone, replies)
        pairs = delong.combine(list(sites.values()), names)
        done = {"repeat": repeat, "pairs": pairs,
                "sites": {s: dict(zip(names, c.auc.tolist(), strict=True)) for s, c in sorted(sites.items())}}
        run.audit.append("family-comparison", split="out-of-fold", reference=names[0], families=names, **done)
        repeats.append(done)
    pairs = {name: delong.average_repeats([r["pairs"][name] for r in repeats])  # type: ignore[index]
             for name in names[1:]}
    for name, pair in pairs.items():
        log.info("Out-of-fold AUC difference %s - %s: %+.3f (95%% CI %+.3f to %+.3f), p = %.3g over %d repeat(s)",
                 name, names[0], pair["auc_diff"], *pair["auc_diff_ci"], pair["p_value"], len(repeats))  # type: ignore[misc]
    return {"reference": names[0], "families": names, "pairs": pairs, "repeats": repeats}


def _site_comparisons(scorers: Cohort, replies: Mapping[int, object]) -> dict[str, delong.SiteComparison]:
    """Each replying site's ``query.compare`` (or ``query.compare_out_of_fold``) reply, by site name."""
    return {scorers.fed.sites[nid]: delong.from_reply({k: v.numpy() for k, v in r.content["arrays"].items()},  # type: ignore[attr-defined]
                                                      int(r.content["metrics"]["num-examples"]))  # type: ignore[attr-defined]
            for nid, r in replies.items()}


def internal_auc(evaluations: Mapping[str, Mapping[str, float]]) -> float:
    """The federation's internal AUC of one family from its per-site evaluation records (common.metrics)."""
    return float(metrics.combine_sites(list(evaluations.values()))["auc"]) if evaluations else float("nan")


def choose(run: Run, internal: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The run's model by ``model-choice`` = "internal-auc": the family whose internal validated AUC (``internal``:
    family -> site -> evaluation record) is highest; ties and undefined AUCs go to the first listed. Audited."""
    order = run.config.families
    aucs = {f: internal_auc(internal.get(f, {})) for f in order}
    best = order[0]
    for family in order[1:]:
        if math.isfinite(aucs[family]) and (not math.isfinite(aucs[best]) or aucs[family] > aucs[best]):
            best = family
    if len(order) > 1:  # with one family there is nothing to choose
        run.audit.append("model-choice", rule=run.config.model_choice, chosen=best, internal_auc=aucs,
                         validation=run.config.internal_validation)
        log.info("Model choice (%s): %s, internal AUC %s", run.config.model_choice, best,
                 ", ".join(f"{f} {a:.3f}" for f, a in aucs.items()))
    return best


def internal_records(fitted: Fitted, crossed: Mapping[str, object]) -> dict[str, dict[str, dict[str, float]]]:
    """Per family, per site, the internal validation's evaluation record: the out-of-fold one under
    cross-validation (``crossed``), else the last evaluation of the family's model on the held-out split."""
    if crossed:
        return {f: dict(r["sites"]) for f, r in crossed["families"].items()}  # type: ignore[attr-defined]
    return {f: t.evaluations[max(t.evaluations)] for f, t in fitted.models.items() if t.evaluations}


def _row(records: list[Mapping[str, float]]) -> dict[str, object]:
    """One family's line of the table from site (or fold) records: pooled counts and rates, the n-weighted AUC
    with its interval, and the Brier score over every case."""
    if not records:
        return {}
    agg = metrics.combine_sites(records)
    out: dict[str, object] = {**agg, "ci": metrics.intervals(agg)}
    if all("sse" in r for r in records):
        out["brier"] = sum(float(r["sse"]) for r in records) / max(sum(int(r["n"]) for r in records), 1)
    return out


def _external(loso: Mapping[str, Mapping[str, object]], names: list[str]) -> tuple[dict[str, object], dict]:
    """Per family its leave-one-site-out row over the folds, and the paired differences pooled over folds (each
    fold's held-out site is independent of the others: inverse variance again)."""
    rows: dict[str, object] = {}
    folds = [r for r in loso.values() if "error" not in r]
    for family in names:
        records = [r["families"][family] for r in folds if family in r.get("families", {})]  # type: ignore[index, operator]
        rows[family] = _row(records)
        if rows[family]:  # each held-out site's calibration slope, pooled over folds by inverse variance
            rows[family]["calibration"] = metrics.pool_slopes([r["calibration"] for r in records  # type: ignore[index]
                                                               if "calibration" in r])
    pairs: dict[str, object] = {}
    for family in names[1:]:
        per_fold = [r["comparison"]["pairs"][family] for r in folds  # type: ignore[index]
                    if isinstance(r.get("comparison"), dict) and family in r["comparison"].get("pairs", {})]  # type: ignore[union-attr, attr-defined]
        pairs[family] = delong.pool_differences(per_fold)
    return rows, pairs


def summary(run: Run, cohort: Cohort, fitted: Fitted, crossed: Mapping[str, object],
            internal_compared: Mapping[str, object], loso: Mapping[str, Mapping[str, object]],
            pooled: Mapping[str, object] | None) -> dict[str, object] | None:
    """metrics.json ``families``: the chosen family and rule, per family its internal and external (leave-one-
    site-out) AUC, sensitivity, specificity, Brier and calibration slope with intervals (external: each held-out
    site's slope, pooled over folds by inverse variance), and the paired AUC and Brier differences to the
    reference. None for a run with one family. The calibration slope of each family other than the chosen one takes
    its own capped recalibration rounds on the held-out split (none under cross-validation, whose out-of-fold scores
    come from one model per fold)."""
    names = run.config.compared
    if len(names) < 2:
        return None
    internal = internal_records(fitted, crossed)
    external_rows, external_pairs = _external(loso, names) if loso else ({}, {})
    rows: dict[str, object] = {}
    for family in names:
        row: dict[str, object] = {"internal": _row(list(internal.get(family, {}).values())),
                                  "external": external_rows.get(family, {})}
        if not crossed:
            cal = (dict((pooled or {}).get("calibration", {})) if family == fitted.family  # type: ignore[call-overload]
                   else clinical.calibration_phase(run, cohort, fitted.models[family].arrays, fitted.config(family)))
            kept = ("slope", "slope_se", "intercept", "converged", "error", "skipped")
            row["calibration"] = {k: cal[k] for k in kept if k in cal} | (
                {"slope_ci": metrics.slope_interval(cal)} if "slope" in cal else {})
        rows[family] = row
    return {"chosen": fitted.family, "rule": run.config.model_choice, "reference": names[0], "order": names,
            "internal_validation": run.config.internal_validation,
            "rows": rows, "comparison": {"internal": dict(internal_compared), "external": external_pairs,
                                         # cross-validation's out-of-fold comparison (server.validation)
                                         "cv": dict(crossed.get("comparison", {})) if crossed else {}}}
