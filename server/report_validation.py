"""The report's external validation section and its answer to "is the federation better at an unseen hospital
than each hospital alone?".

Built from metrics.json's ``validation.loso`` (leave-one-site-out folds), ``validation.local_only`` (each site's
own pipeline, scored on its held-out cases and at every other site), ``validation.federation_gain``
(``common.metrics.federation_gain``) and ``validation.baselines``. The gain sentence is shared by the report's
first screen and the demo's final table.
"""

from __future__ import annotations

from typing import Any

from server import plots
from server.report_blocks import (
    SHOWN,
    Block,
    Figure,
    Heading,
    Section,
    Table,
    Text,
    as_dict,
    finite_number,
    fmt,
    fmt_ci,
    has_ci,
    metric_cells,
    metric_header,
    not_available,
    rounds_of,
    short,
    unavailable,
    why_no_rounds,
)
from server.report_curves import curves_of


def _auc(value: Any, ci: Any = None) -> str:
    v = finite_number(value)
    if v is None:
        return "n/a"
    if isinstance(ci, list | tuple) and len(ci) == 2 and None not in (finite_number(ci[0]), finite_number(ci[1])):
        return f"{v:.3f} ({ci[0]:.2f}–{ci[1]:.2f})"
    return f"{v:.3f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _gain(record: dict[str, Any]) -> str:
    gain, ci = finite_number(record.get("gain")), record.get("gain_ci") or [None, None]
    if gain is None:
        return "n/a"
    lo, hi = finite_number(ci[0]), finite_number(ci[1])
    return _signed(gain) + (f" (95% CI {_signed(lo)} to {_signed(hi)})" if lo is not None and hi is not None else "")


def gain_sentence(doc: dict[str, Any]) -> str | None:
    """One line: what the federation gained (or did not) at unseen sites, with its 95% interval; None when the
    run has no leave-one-site-out and local-only results to compare."""
    overall = as_dict(as_dict(as_dict(doc.get("validation")).get("federation_gain")).get("overall"))
    fed, local, gain = (finite_number(overall.get(k)) for k in ("federated_auc", "local_only_auc", "gain"))
    if fed is None or local is None or gain is None:
        return None
    ci = overall.get("gain_ci") or [None, None]
    lo, hi = finite_number(ci[0]), finite_number(ci[1])
    interval = f", 95% CI {_signed(lo)} to {_signed(hi)}" if lo is not None and hi is not None else ""
    if lo is not None and lo > 0:
        verdict = "the federation helped"
    elif hi is not None and hi < 0:
        verdict = "each hospital alone did better"
    else:
        verdict = "the interval includes no gain: these sites are too few or too small to tell"
    return (f"At sites it never saw, the federated model scored AUC {fed:.3f} against {local:.3f} for the "
            f"models each other hospital built alone (own pipeline): gain {_signed(gain)}{interval} over "
            f"{int(overall.get('sites', 0))} site(s); {verdict}.")


def calibration_sentence(doc: dict[str, Any]) -> str | None:
    """One line: the calibration slope at unseen sites (the held-out sites' slopes pooled by inverse variance) and
    what it means; None without it."""
    pooled = as_dict(as_dict(doc.get("validation")).get("loso_calibration"))
    slope, ci = finite_number(pooled.get("slope")), pooled.get("slope_ci") or [None, None]
    lo, hi = finite_number(ci[0]), finite_number(ci[1])
    if slope is None or lo is None or hi is None:
        return None
    if hi < 1:
        verdict = "below 1: its probabilities are too extreme at hospitals it never saw; recalibrate at a new site"
    elif lo > 1:
        verdict = "above 1: its probabilities are too timid at hospitals it never saw; recalibrate at a new site"
    else:
        verdict = "the interval includes 1: no miscalibration shown at these sites"
    return (f"Calibration slope at sites it never saw: {slope:.2f} (95% CI {lo:.2f} to {hi:.2f}) over "
            f"{int(pooled.get('folds', 0))} held-out site(s); {verdict}.")


def gain_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per unseen site: the federated leave-one-site-out AUC, the mean AUC of the other sites' local-only
    models there, and the gain with its 95% interval; no rows without those results."""
    gains = as_dict(as_dict(as_dict(doc.get("validation")).get("federation_gain")).get("sites"))
    rows = [[str(site), _auc(as_dict(g).get("federated_auc")), _auc(as_dict(g).get("local_only_auc")),
             _gain(as_dict(g))] for site, g in sorted(gains.items())]
    return ["unseen site", "federated AUC (trained on the others)", "mean AUC of the others alone", "gain"], rows


def local_only_blocks(doc: dict[str, Any]) -> list[Block]:
    """The comparison per unseen site, and each site's own model, internal and external."""
    validation = as_dict(doc.get("validation"))
    local = {str(k): as_dict(v) for k, v in as_dict(validation.get("local_only")).items()}
    if not local:
        return []
    blocks: list[Block] = [Heading("Federation vs each hospital alone"),
                           Text("Local-only: each site runs the whole pipeline alone (its own ComBat, "
                                "standardisation, feature selection with the run's knobs, and model) on its "
                                "training cases, as it could without the federation. It is scored on its own "
                                "held-out cases (internal) and at every other site, which first harmonises itself "
                                "against it as a late-joining hospital does (external), the same protocol as the "
                                "leave-one-site-out folds.")]
    sentence = gain_sentence(doc)
    if sentence:
        blocks.append(Text(sentence))
    header, rows = gain_table(doc)
    if rows:
        blocks.append(Table(header, rows))
        blocks.append(Text("Intervals add the two AUCs' DeLong variances as if independent; both are computed on "
                           "the same cases, so the paired interval would be narrower."))
    # with several model families (models), one row per site and family: each site alone fits every family
    several = any(as_dict(rec.get("families")) for rec in local.values())
    rows = []
    for site, rec in sorted(local.items()):
        if "error" in rec:
            rows.append([site, *([""] if several else []), f"failed: {str(rec['error'])[:160]}", "", ""])
            continue
        for family, fam in (as_dict(rec.get("families")) or {"": rec}).items():
            internal = as_dict(as_dict(fam).get("internal"))
            external = {str(k): as_dict(v) for k, v in as_dict(as_dict(fam).get("external")).items()}
            at = "; ".join(f"{other} {_auc(r.get('auc'))}" for other, r in sorted(external.items())) or "n/a"
            rows.append([site, *([str(family)] if several else []),
                         _auc(internal.get("auc"), as_dict(internal.get("ci")).get("auc")), at,
                         str(len(rec.get("features") or []))])
    blocks.append(Table(["site alone", *(["family"] if several else []), "internal AUC (95% CI)",
                         "AUC at each other site", "features"], rows))
    if several:
        blocks.append(Text("The gain above compares the first listed family's local-only models with the "
                           "federation's leave-one-site-out model."))
    return blocks


def _slope_cell(fit: dict[str, Any]) -> str:
    """A calibration fit as "0.93 (0.61–1.25)", or why there is none."""
    if "slope" in fit:
        return fmt_ci(fit.get("slope"), fit.get("slope_ci"))
    return short(f"not fitted: {fit['error']}" if fit.get("error") else fit.get("skipped") or "n/a", 80)


def _loso_blocks(loso: dict[str, dict[str, Any]], pooled: dict[str, Any]) -> list[Block]:
    ok = [r for r in loso.values() if "error" not in r]
    with_ci = has_ci(ok)
    rows = []
    for name, r in sorted(loso.items()):
        trained = ", ".join(str(s) for s in r.get("trained_on") or []) or "the other sites"
        if "error" in r:
            rows.append([name, trained, "n/a", f"failed: {short(r['error'], 160)}", *([""] * len(SHOWN))])
        else:
            rows.append([name, trained, fmt(r.get("n")), *metric_cells(r, with_ci),
                         _slope_cell(as_dict(r.get("calibration_fit")))])
    blocks: list[Block] = [
        Text("Each row: a model trained from scratch by the other sites (feature agreement, ComBat, moments, feature "
             "selection and training redone without the held-out site), scored on all of the held-out site's "
             "usable cases after that site harmonised itself against the fold's ComBat estimates, as a "
             "late-joining hospital does. Nothing learned from the held-out site enters its fold. Calibration "
             "slope: logistic recalibration of the outcome on the model's logit at the held-out site (1 is ideal; "
             "below 1 the model is too confident there)."),
        Table(["held-out site", "trained on", "cases", *metric_header(with_ci), "calibration slope (95% CI)"], rows)]
    if int(pooled.get("folds") or 0) > 0:
        blocks.append(Text(f"Calibration slope at unseen sites, the {pooled['folds']} held-out sites' slopes pooled "
                           f"by inverse variance: {_slope_cell(pooled)}."))
    curves, _ = curves_of(loso, "roc")
    if curves:
        blocks.append(Figure(plots.roc_png, (curves, "leave-one-site-out ROC (each site unseen in training)",
                                             {n: loso[n].get("auc") for n in curves}),
                             alt="leave-one-site-out ROC points",
                             caption="Operating points at each site of the model trained without it (markers, not "
                             "joined: a few k-anonymous points do not make a curve).",
                             md=f"Leave-one-site-out ROC points of {len(curves)} site(s): figure in report.html."))
    else:
        blocks.append(unavailable("no leave-one-site-out ROC points"))
    return blocks


def _baseline_blocks(baselines: dict[str, Any]) -> list[Block]:
    keys = [k for k in SHOWN if any(k in as_dict(b) for b in baselines.values())]
    keys += sorted({k for b in baselines.values() for k in as_dict(b)} - set(keys) - {"ci"})
    with_ci = has_ci([as_dict(b) for b in baselines.values()])
    labels = dict(zip(SHOWN, metric_header(with_ci), strict=True))
    rows = []
    for name, b in sorted(baselines.items()):
        if not isinstance(b, dict):
            rows.append([str(name), short(b, 160), *([""] * (len(keys) - 1))])
            continue
        ci = as_dict(b.get("ci"))
        rows.append([str(name), *(fmt_ci(b.get(k), ci.get(k)) if k in SHOWN else short(fmt(b.get(k)), 160)
                                  for k in keys)])
    return [Heading("Baselines"), Table(["baseline", *(labels.get(k, k) for k in keys)], rows)]


def validation_section(doc: dict[str, Any]) -> Section:
    validation = as_dict(doc.get("validation"))
    loso = {str(k): as_dict(v) for k, v in as_dict(validation.get("loso")).items()}
    baselines = as_dict(validation.get("baselines"))
    local = local_only_blocks(doc)
    if not loso and not baselines and not local:
        if not rounds_of(doc) and doc.get("status") != "completed":
            return not_available(why_no_rounds(doc))
        return not_available("leave-one-site-out validation was not run")
    pooled_slope = as_dict(validation.get("loso_calibration"))
    blocks = (_loso_blocks(loso, pooled_slope) if loso else []) + local + \
        (_baseline_blocks(baselines) if baselines else [])
    if validation.get("note"):
        blocks.append(Text(str(validation["note"])))
    return Section("validation", "External validation (leave-one-site-out)", blocks)
