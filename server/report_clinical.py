"""The report's clinical metrics of the final model: the pooled AUC over every site's held-out cases with its
binning bound in words, calibration slope and intercept, Brier score and the decision curve.

Built from metrics.json's ``final.pooled`` (server.clinical) beside ``final.aggregate`` (the site-AUC mean, kept
for comparability with earlier runs). A document without it says why.
"""

from __future__ import annotations

from typing import Any

from server import plots
from server.report_blocks import Block, Facts, Figure, Section, Table, Text, as_dict, finite_number, unavailable

TITLE = "Clinical metrics (pooled held-out cases, final model)"


def _f(value: Any, digits: int = 3) -> str:
    v = finite_number(value)
    return "n/a" if v is None else f"{v:.{digits}f}"


def _auc_facts(pooled: dict[str, Any], aggregate: dict[str, Any]) -> list[tuple[str, str]]:
    ci = pooled.get("auc_ci") or [None, None]
    both = finite_number(ci[0]) is not None and finite_number(ci[1]) is not None
    interval = f" (95% CI {_f(ci[0], 2)}–{_f(ci[1], 2)})" if both else ""
    binning = as_dict(pooled.get("binning"))
    bound = (f"the exact pooled AUC lies between {_f(pooled.get('auc_low'))} and {_f(pooled.get('auc_high'))}, so "
             f"within {_f(pooled.get('auc_bound'))} of {_f(pooled.get('auc'))}: each site sends per-class score "
             f"histograms over {binning.get('bins', '?')} bins (equal logit steps over "
             f"[−{_f(binning.get('span'), 0)}, {_f(binning.get('span'), 0)}]) merged into groups of at least k cases, "
             "and a HGG and a BM case in overlapping groups cannot be ordered; the interval adds this range to "
             "the sampling error")
    return [("pooled AUC", _f(pooled.get("auc")) + interval), ("binning bound", bound),
            ("site-AUC mean", f"{_f(aggregate.get('auc'))}: the mean of the site AUCs weighted by held-out cases "
                              "(the final table's AUC, comparable with earlier runs); the pooled AUC instead ranks "
                              "every HGG case against every BM case of all sites, so it also counts pairs across "
                              "sites")]


def _calibration_facts(pooled: dict[str, Any]) -> list[tuple[str, str]]:
    facts = [("Brier score", f"{_f(pooled.get('brier'))}: mean squared difference between the predicted HGG "
                             "probability and the outcome (0 is perfect; 0.25 is always predicting 0.5)")]
    cal = as_dict(pooled.get("calibration"))
    if "error" in cal or "skipped" in cal:
        facts.append(("calibration slope and intercept", f"not fitted: {cal.get('error') or cal.get('skipped')}"))
        return facts
    if not cal:
        return facts
    rounds = f"{cal.get('rounds')} round(s) of at most {cal.get('max_rounds')}"
    state = "converged" if cal.get("converged") else "did not converge (the values are the last step)"
    facts += [("calibration slope", f"{_f(cal.get('slope'))} ± {_f(cal.get('slope_se'))} (SE): 1 is ideal; below 1 "
                                    "the predictions are too extreme, above 1 too timid"),
              ("calibration intercept", f"{_f(cal.get('intercept'))} ± {_f(cal.get('intercept_se'))} (SE): 0 is ideal "
                                        "at slope as fitted; the logistic fit of the outcome on logit(p)"),
              ("calibration fit", f"federated Newton on the sites' summed gradients and Hessians, {rounds}: {state}")]
    return facts


def _decision_blocks(pooled: dict[str, Any]) -> list[Block]:
    curve = as_dict(pooled.get("net_benefit"))
    if not curve.get("threshold"):
        return [unavailable("the sites sent no decision-curve counts")]
    caption = ("Net benefit of calling HGG above each threshold probability, pooled over every site's held-out "
               "cases, against treating all as HGG and treating none. A site releases its counts at a threshold "
               "only where they change by 0 or at least k cases of each class; where one withheld it, the shaded "
               "range holds the pooled value.")
    n = len(curve["threshold"])

    def column(key: str) -> list[Any]:
        values = curve.get(key)
        return list(values) if isinstance(values, list) and len(values) == n else [None] * n

    model, low, high, treat_all, kept = (column(k) for k in ("model", "model_low", "model_high", "treat_all",
                                                              "kept_by_every_site"))
    rows = [[_f(curve["threshold"][i], 2), _f(model[i]) if kept[i] else f"{_f(low[i])} to {_f(high[i])}",
             _f(treat_all[i]), "0.000"] for i in range(n)]
    return [Figure(plots.decision_curve_png, (curve, "decision curve (pooled held-out cases)"),
                   alt="decision curve", caption=caption, fallback="the decision curve"),
            Table(["threshold", "net benefit: model", "treat all", "treat none"], rows,
                  fold="net benefit by threshold")]


def clinical_section(doc: dict[str, Any]) -> Section:
    final = as_dict(doc.get("final"))
    pooled = as_dict(final.get("pooled"))
    if not pooled:
        why = ("the run ended before its final evaluation" if doc.get("status") != "completed"
               else "the sites sent no pooled-metric terms (a run from before they were reported)")
        return Section("", "", [unavailable(why)])
    about = Text(f"All {pooled.get('n', '?')} held-out cases of {len(pooled.get('sites') or [])} site(s) together "
                 f"({pooled.get('n_hgg', '?')} HGG, {pooled.get('n_bm', '?')} BM), from aggregates only: no site sent "
                 "a case's score.")
    return Section("clinical", TITLE, [about, Facts(_auc_facts(pooled, as_dict(final.get("aggregate")))),
                                       Facts(_calibration_facts(pooled)), *_decision_blocks(pooled)])
