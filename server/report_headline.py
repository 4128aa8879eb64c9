"""The report's first screen: what the federation found, with intervals, before any hash or setting.

Three answers a clinical reader asks for, each from metrics.json alone: how the model does at a hospital it never
saw (leave-one-site-out: every fold's confusion counts summed, the case-weighted mean of the folds' AUCs), whether
that beats what each hospital could build alone (``report_validation.gain_sentence``), and how it does on the
training sites' held-out cases (internal). Plus one line naming every interval too wide to read anything into.
"""

from __future__ import annotations

from typing import Any

from common import metrics
from server.report_blocks import Block, Facts, Section, Text, as_dict, finite_number
from server.report_validation import calibration_sentence, gain_sentence

# A 95% interval of an AUC, sensitivity or specificity wider than this says little about the point value.
TOO_WIDE = 0.3


def _pct(value: Any) -> str:
    v = finite_number(value)
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _ci(ci: Any, pct: bool = False) -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return ""
    lo, hi = finite_number(ci[0]), finite_number(ci[1])
    if lo is None or hi is None:
        return ""
    return f" (95% CI {_pct(lo)}–{_pct(hi)})" if pct else f" (95% CI {lo:.2f}–{hi:.2f})"


def _operating_point(record: dict[str, Any]) -> str:
    ci = as_dict(record.get("ci"))
    return (f"sensitivity {_pct(record.get('sensitivity'))}{_ci(ci.get('sensitivity'), pct=True)}, "
            f"specificity {_pct(record.get('specificity'))}{_ci(ci.get('specificity'), pct=True)}")


def unseen_sites(loso: dict[str, Any]) -> dict[str, Any] | None:
    """Leave-one-site-out over all folds: summed confusion counts (rates with Wilson intervals), the case-weighted
    mean AUC of the folds with the variance of that mean; None without a completed fold."""
    folds = [as_dict(r) for r in loso.values()
             if isinstance(r, dict) and "error" not in r and all(k in r for k in (*metrics.COUNT_KEYS, "auc", "n"))]
    if not folds:
        return None
    record = metrics.combine_sites(folds)
    return {**record, "sites": len(folds), "ci": metrics.intervals(record)}


def wide_intervals(doc: dict[str, Any]) -> list[str]:
    """"hospital-c internal AUC 0.575 (95% CI 0.25–0.90)" for every site metric whose interval spans > TOO_WIDE."""
    out = []
    parts = (("internal", as_dict(as_dict(doc.get("final")).get("sites"))),
             ("unseen", as_dict(as_dict(doc.get("validation")).get("loso"))))
    for what, records in parts:
        for name, r in sorted(records.items()):
            ci = as_dict(as_dict(r).get("ci")).get("auc")
            auc = finite_number(as_dict(r).get("auc"))
            if auc is None or not _ci(ci):
                continue
            if ci[1] - ci[0] > TOO_WIDE:
                out.append(f"{name} {what} AUC {auc:.3f}{_ci(ci)}, {as_dict(r).get('n', '?')} cases")
    return out


def headline_section(doc: dict[str, Any]) -> Section:
    status = str(doc.get("status", "n/a"))
    blocks: list[Block] = []
    if status != "completed":
        blocks.append(Text(f"This run did not complete ({status}"
                           + (f": {doc['error']}" if doc.get("error") else "") + "); below is what it got to.", "na"))
    facts: list[tuple[str, str]] = []
    unseen = unseen_sites(as_dict(as_dict(doc.get("validation")).get("loso")))
    if unseen:
        facts.append(("at a hospital it never saw", f"AUC {unseen['auc']:.3f}{_ci(unseen['ci'].get('auc'))}; "
                      f"{_operating_point(unseen)} (leave-one-site-out, {unseen['sites']} sites, "
                      f"{unseen['n']} cases)"))
    calibration = calibration_sentence(doc)
    if calibration:
        facts.append(("calibration", calibration))
    gain = gain_sentence(doc)
    if gain:
        facts.append(("vs each hospital alone", gain))
    final = as_dict(doc.get("final"))
    agg, pooled = as_dict(final.get("aggregate")), as_dict(final.get("pooled"))
    if agg:
        cv = as_dict(doc.get("config")).get("internal-validation") == "cv"
        where = "out-of-fold, every case" if cv else "held-out cases of the training sites"
        auc = finite_number(pooled.get("auc"))
        auc_text = (f"pooled AUC {auc:.3f}{_ci(pooled.get('auc_ci'))}; " if auc is not None
                    else f"mean site AUC {finite_number(agg.get('auc')) or float('nan'):.3f}; ")
        facts.append((f"internal ({where})", f"{auc_text}{_operating_point(agg)} at threshold "
                                              f"{as_dict(doc.get('notes')).get('threshold', 0.5)}, "
                                              f"{agg.get('n', '?')} cases"))
    if not facts and status == "completed":
        blocks.append(Text("This run's metrics hold no final evaluation.", "na"))
    if facts:
        blocks.append(Facts(facts))
    drops = [d for d in doc.get("dropouts") or [] if isinstance(d, dict)]
    if drops:  # whole reasons: each names what the site must do
        blocks.append(Facts([(f"{d.get('site')} left", f"at the {d.get('phase')} phase"
                              + (f", round {d['round']}" if d.get("round") is not None else "")
                              + f": {d.get('reason')}") for d in drops]))
    wide = wide_intervals(doc)
    if wide:
        blocks.append(Text("Too wide to read anything into (95% interval of the AUC spans more than "
                           f"{TOO_WIDE}): " + "; ".join(wide) + ". A gap between such a site's internal and "
                           "external AUC is what small samples produce, not evidence of a difference."))
    return Section("headline", "Result", blocks)
