"""The report's ROC and calibration sections (held-out cases, final model), from metrics.json alone.

The ROC figure draws one line only, the pooled curve of all sites' cases (``final.pooled.roc``), whose area is
the pooled AUC printed beside it; each site's k-anonymous operating points are markers, never joined, so no
drawn area contradicts an AUC in the legend.
"""

from __future__ import annotations

from typing import Any

from server import plots
from server.report_blocks import (
    Block,
    Figure,
    Section,
    Table,
    Text,
    as_dict,
    final_of,
    final_sites,
    finite_number,
    fmt,
    not_available,
    why_no_rounds,
)


def curves_of(records: dict[str, dict[str, Any]], key: str) -> tuple[dict[str, Any], list[str]]:
    have = {name: r[key] for name, r in records.items() if isinstance(r.get(key), dict)}
    return have, sorted(set(records) - set(have))


def not_sent(missing: list[str], what: str) -> list[Block]:
    return [Text(f"not available for {', '.join(missing)}: no {what} sent", "na", tight=True)] if missing else []


def _pooled_curve(doc: dict[str, Any]) -> tuple[dict[str, Any] | None, float | None]:
    pooled = as_dict(final_of(doc).get("pooled"))
    roc, auc = as_dict(pooled.get("roc")), finite_number(pooled.get("auc"))
    return (roc, auc) if len(roc.get("fpr") or []) >= 2 and auc is not None else (None, None)


def roc_section(doc: dict[str, Any]) -> Section:
    sites = final_sites(doc)
    if not sites:
        return not_available(why_no_rounds(doc))
    points, missing = curves_of(sites, "roc")
    pooled, pooled_auc = _pooled_curve(doc)
    if not points and pooled is None:
        return not_available("the sites sent no ROC points (runs before curves were reported)")
    caption = ("Markers: each site's operating points (thresholds where every step covers at least k held-out "
               "cases); two or three points do not make a curve, so none is drawn through them.")
    if pooled is not None:
        caption = ("Line: all sites' held-out cases pooled, from the k-anonymous score counts each site sent; its "
                   f"area is the pooled AUC {pooled_auc:.3f} (cases spread evenly within their score groups; the "
                   "clinical section gives the range the exact value lies in). " + caption)
    figure = Figure(plots.roc_png, (points, "held-out ROC (final model)", {n: sites[n].get("auc") for n in points}),
                    alt="ROC: pooled curve and each site's points", caption=caption,
                    md=f"ROC of the pooled cases and operating points of {len(points)} site(s): figure in report.html.",
                    options={"pooled": pooled, "pooled_auc": pooled_auc})
    return Section("roc", "ROC curves (held-out, final model)", [figure, *not_sent(missing, "ROC points")])


def calibration_section(doc: dict[str, Any]) -> Section:
    sites = final_sites(doc)
    if not sites:
        return not_available(why_no_rounds(doc))
    bins, missing = curves_of(sites, "calibration")
    if not bins:
        return not_available("the sites sent no calibration bins (runs before curves were reported)")
    caption = ("Mean predicted probability of HGG against the observed HGG rate, per bin of at least k held-out "
               "cases (marker area: cases). Points on the diagonal are well calibrated.")
    figure = Figure(plots.calibration_png, (bins, "reliability diagram (held-out, final model)"),
                    alt="calibration per site", caption=caption)
    rows = []
    for name in sorted(bins):
        b = bins[name]
        for i, (p, o, n) in enumerate(zip(b.get("predicted") or [], b.get("observed") or [], b.get("n") or [],
                                          strict=False), start=1):
            rows.append([name, str(i), fmt(finite_number(p)), fmt(finite_number(o)), fmt(n)])
    table = Table(["site", "bin", "mean predicted", "observed HGG rate", "cases"], rows, only="md")
    return Section("calibration", "Calibration (held-out, final model)",
                   [figure, table, *not_sent(missing, "calibration bins")])
