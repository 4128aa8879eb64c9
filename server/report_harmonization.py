"""The report's harmonisation section: how much of each feature's variation lies between sites, before and after
ComBat (``harmonization.site_share``: exact, from sums the sites sent anyway), and before/after histograms of a
few model features."""

from __future__ import annotations

from typing import Any

import numpy as np

from server import plots
from server.report_blocks import (
    Block,
    Figure,
    Section,
    Table,
    Text,
    as_dict,
    finite_number,
    md_code,
    not_available,
    rounds_of,
    why_no_rounds,
)

HISTOGRAM_FEATURES = 4  # at most this many harmonisation figures
STRONG = 0.1  # a feature whose site share is above this lets the site be read off it


def _values(share: dict[str, Any], key: str) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in share.get(key) or []], dtype=np.float64)


def site_share_blocks(doc: dict[str, Any]) -> list[Block]:
    """The numbers saying whether harmonisation helped: the median share of a feature's variation that lies between
    sites, and how many features carry a strong site signal, before and after; [] without them."""
    share = as_dict(as_dict(doc.get("harmonization")).get("site_share"))
    names = [str(n) for n in share.get("features") or []]
    after, before = _values(share, "after"), _values(share, "before")
    if not names or len(after) != len(names):
        return []
    combat = len(before) == len(names)

    def summary(values: np.ndarray) -> str:
        ok = values[np.isfinite(values)]
        return (f"median {np.median(ok):.3f}; {int(np.sum(ok > STRONG))} of {len(ok)} features above {STRONG}"
                if len(ok) else "n/a")

    if combat:
        text = ("How much of each feature's variation lies between sites (R² of the feature on the site; 0: the "
                "site cannot be told from it, 1: the site fixes it), from the sums the sites sent for ComBat and "
                f"for the moments. Before ComBat: {summary(before)}. After: {summary(after)}.")
    else:
        text = ("No harmonisation: how much of each feature's variation lies between sites (R² of the feature on "
                f"the site; 0: the site cannot be told from it, 1: the site fixes it): {summary(after)}.")
    blocks: list[Block] = [Text(text)]
    selected = [n for n in as_dict(as_dict(doc.get("features")).get("selected")) if n in names]
    if selected:
        index = {n: i for i, n in enumerate(names)}

        def cell(values: np.ndarray, name: str) -> str:
            v = finite_number(float(values[index[name]])) if len(values) else None
            return "n/a" if v is None else f"{v:.3f}"

        rows = [[n, cell(before, n), cell(after, n)] if combat else [n, cell(after, n)] for n in selected]
        header = ["model feature", "between sites, before", "after"] if combat else ["model feature", "between sites"]
        blocks.append(Table(header, rows, code_first=True, fold="share between sites of each model feature"))
    return blocks


def harmonization_section(doc: dict[str, Any]) -> Section:
    cfg = as_dict(doc.get("config"))
    features = as_dict(as_dict(doc.get("harmonization")).get("features"))
    share = site_share_blocks(doc)
    if not features and share:  # noised runs and runs without ComBat still say how much the site explains
        return Section("harmonization", "Harmonisation before/after", share)
    if not features:
        if str(cfg.get("harmonization", "")) == "none":
            return not_available('harmonisation was off in this run (harmonization = "none")')
        if finite_number(cfg.get("dp-query-noise-multiplier")):
            return not_available("withheld: the query phases were noised (dp-query-noise-multiplier), and per-bin "
                                 "counts of single features have no useful noised form at these sizes")
        if not rounds_of(doc):
            return not_available(why_no_rounds(doc))
        return not_available("this run's metrics carry no before/after histograms (runs before they were reported)")
    shown = list(features)[:HISTOGRAM_FEATURES]
    blocks: list[Block] = [Text("Distributions of model features per site before and after harmonisation, aggregated "
                                "at each site: every bin count is 0 or at least k cases (neighbouring bins merged "
                                "where needed), so steps can be uneven. Densities are per site, so sites of "
                                "different sizes compare.", only="html")]
    for name in shown:
        f = as_dict(features[name])
        blocks.append(Figure(plots.harmonization_png, (name, f.get("edges") or [], as_dict(f.get("sites"))),
                             alt=f"{name} before and after harmonisation", caption=name, fallback=name, tight=True,
                             md=f"- {md_code(name)}: {len(as_dict(f.get('sites')))} site(s), figure in report.html"))
    if len(features) > len(shown):
        blocks.append(Text(f"showing {len(shown)} of {len(features)} features", "item", tight=True))
    return Section("harmonization", "Harmonisation before/after", share + blocks)
