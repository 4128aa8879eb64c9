"""The report's figures: pure functions from a run's numbers to PNG bytes (matplotlib, Agg, no pyplot).

Each function takes plain data (lists and dicts as they appear in metrics.json), draws one small figure
and returns PNG bytes; ``data_uri`` turns those into an ``<img src>`` that needs nothing outside the file.
Malformed data raises ``ValueError``; the report turns that into a "not available" line.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
FEDERATION_COLOUR = "#222222"
POOLED_COLOUR = "#6a3d9a"  # the pooled cases of all sites: no site's colour
# matplotlib's tab10, in order: site colours stay the same across every figure of a report
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
LABEL_CHARS = 40
FONT = 9  # points; at 100 dpi about 12 px on a desktop screen


def site_colours(names: Iterable[str]) -> dict[str, str]:
    """A fixed colour per site name (sorted order), cycling through the palette beyond ten sites."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(set(names)))}


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def label(text: object, limit: int = LABEL_CHARS) -> str:
    """Text safe for matplotlib: no mathtext (``$``), not hidden from legends (leading ``_``), shortened."""
    s = " ".join(str(text).split())
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    s = s.replace("$", r"\$")
    return " " + s if s.startswith("_") else s


def _floats(values: Any, what: str) -> np.ndarray:
    """A 1-D float array (None -> NaN); ValueError if ``values`` is not a flat list of numbers."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ValueError(f"{what}: expected a list of numbers, got {type(values).__name__}")
    try:
        arr = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not a list of numbers") from exc
    return arr


def _figure(width: float, height: float, ncols: int = 1, top: float = 0.92, **kwargs: Any) -> tuple[Figure, list[Axes]]:
    """A figure with fixed margins (a layout engine would triple the drawing time)."""
    # here, not at the top: matplotlib takes ~1 s to import, and only the report's outputs draw
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=top,
                        wspace=0.25 if ncols > 1 else None)
    axes = fig.subplots(1, ncols, squeeze=False, **kwargs)[0]
    return fig, list(axes)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


LEGEND_MAX = 20  # beyond this many sites a legend hides the plot (and matplotlib's "best" spot takes minutes)


def _legend(ax: Axes, n_entries: int) -> None:
    if 0 < n_entries <= LEGEND_MAX:
        ax.legend(loc="best", fontsize=FONT, frameon=True, framealpha=0.85, ncols=1 if n_entries <= 6 else 2)


def _unit_square(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    ax.grid(alpha=0.3, linewidth=0.5)


def _roc_points(curve: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(curve, Mapping):
        raise ValueError(f"ROC of {name}: expected {{fpr, tpr}}")
    fpr, tpr = _floats(curve.get("fpr"), f"ROC fpr of {name}"), _floats(curve.get("tpr"), f"ROC tpr of {name}")
    if len(fpr) != len(tpr) or len(fpr) < 2:
        raise ValueError(f"ROC of {name}: fpr and tpr must be equally long lists of 2 or more points")
    return fpr, tpr


def _auc_label(name: str, auc: Any) -> str:
    return label(name) + (f" (AUC {auc:.2f})" if isinstance(auc, int | float) and math.isfinite(auc) else "")


def roc_png(points: Mapping[str, Mapping[str, Any]], title: str, aucs: Mapping[str, Any] | None = None,
            colours: Mapping[str, str] | None = None, pooled: Mapping[str, Any] | None = None,
            pooled_auc: float | None = None) -> bytes:
    """Each site's ROC operating points as markers (``{"fpr": [...], "tpr": [...]}``; the corners (0, 0) and (1, 1)
    are left out), with the chance diagonal, and ``pooled`` (the curve of all sites' cases) as the only line.

    No line joins a site's points: two or three k-anonymous points do not make a curve, and a line through them
    would enclose an area other than the site's AUC printed in the legend. The pooled curve's area is
    ``pooled_auc`` (``common.clinical.pooled_roc``).
    """
    fig, (ax,) = _figure(5.0, 5.0)
    draw_roc(ax, points, title, aucs, colours, pooled, pooled_auc)
    return _png(fig)


def draw_roc(ax: Axes, points: Mapping[str, Mapping[str, Any]], title: str, aucs: Mapping[str, Any] | None = None,
             colours: Mapping[str, str] | None = None, pooled: Mapping[str, Any] | None = None,
             pooled_auc: float | None = None) -> None:
    """What :func:`roc_png` draws, on ``ax``."""
    if not points and pooled is None:
        raise ValueError("no ROC points")
    colours = colours or site_colours(points)
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=0.8, label="chance")
    entries = 1
    if pooled is not None:
        fpr, tpr = _roc_points(pooled, "the pooled cases")
        ax.plot(fpr, tpr, linewidth=2.0, color=POOLED_COLOUR, label=_auc_label("all sites pooled", pooled_auc))
        entries += 1
    for name in sorted(points):
        fpr, tpr = _roc_points(points[name], name)
        inner = ~(((fpr == 0) & (tpr == 0)) | ((fpr == 1) & (tpr == 1)))
        ax.plot(fpr[inner], tpr[inner], linestyle="none", marker="o", markersize=6, color=colours.get(name),
                label=_auc_label(name, (aucs or {}).get(name)))
        entries += 1
    _unit_square(ax, "1 − specificity (false positive rate)", "sensitivity (true positive rate)")
    ax.set_title(label(title, 60), fontsize=FONT)
    ax.legend(loc="lower right", fontsize=FONT, frameon=True, framealpha=0.85, ncols=1 if entries <= 7 else 2)


def calibration_png(bins: Mapping[str, Mapping[str, Any]], title: str,
                    colours: Mapping[str, str] | None = None) -> bytes:
    """Reliability diagram: per site, observed HGG rate against mean predicted probability per bin,
    marker area growing with the bin's cases; the diagonal is perfect calibration."""
    if not bins:
        raise ValueError("no calibration bins")
    colours = colours or site_colours(bins)
    fig, (ax,) = _figure(4.4, 4.2)
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=0.8, label="perfect calibration")
    for name in sorted(bins):
        b = bins[name]
        if not isinstance(b, Mapping):
            raise ValueError(f"calibration of {name}: expected {{predicted, observed, n}}")
        pred = _floats(b.get("predicted"), f"calibration predicted of {name}")
        obs = _floats(b.get("observed"), f"calibration observed of {name}")
        n = _floats(b.get("n", [1] * len(pred)), f"calibration n of {name}")
        if not (len(pred) == len(obs) == len(n)) or not len(pred):
            raise ValueError(f"calibration of {name}: predicted, observed and n must be equally long, non-empty")
        size = 12 + 60 * np.sqrt(np.nan_to_num(n, nan=0.0) / max(float(np.nanmax(n)), 1.0))
        colour = colours.get(name)
        ax.plot(pred, obs, linewidth=1.0, color=colour, alpha=0.8)
        ax.scatter(pred, obs, s=size, color=colour, alpha=0.8, edgecolors="white", linewidths=0.5,
                   label=f"{label(name)} ({int(np.nansum(n))} cases)")
    _unit_square(ax, "mean predicted probability of HGG", "observed HGG rate")
    ax.set_title(label(title, 60), fontsize=FONT)
    _legend(ax, len(bins) + 1)
    return _png(fig)


Series = Mapping[str, Sequence[tuple[Any, Any]]]


def _series(ax: Axes, series: Series, colours: Mapping[str, str], what: str) -> int:
    drawn = 0
    for name in sorted(series):
        points = [(r, v) for r, v in series[name] if r is not None]
        if not points:
            continue
        rounds = _floats([r for r, _ in points], f"{what} rounds of {name}")
        values = _floats([v for _, v in points], f"{what} of {name}")
        ax.plot(rounds, values, marker="o", markersize=2.5, linewidth=1.2, color=colours.get(name), label=label(name))
        drawn += 1
    return drawn


def training_png(loss: Series, auc: Series, federation_auc: Sequence[tuple[Any, Any]],
                 colours: Mapping[str, str] | None = None) -> bytes:
    """Two panels over rounds: each site's training loss; each site's held-out AUC and the federation's.

    ``loss`` and ``auc`` map site -> [(round, value)], values may be None (drawn as gaps)."""
    if not any(loss.values()) and not any(auc.values()) and not federation_auc:
        raise ValueError("no rounds")
    colours = colours or site_colours([*loss, *auc])
    fig, (left, right) = _figure(8.6, 3.2, ncols=2)
    drawn = _series(left, loss, colours, "training loss")
    left.set_title("training loss per site (local epochs)", fontsize=FONT)
    left.set_ylabel("loss", fontsize=FONT)
    _legend(left, drawn)
    drawn = _series(right, auc, colours, "held-out AUC")
    if federation_auc:
        drawn += _series(right, {"federation": federation_auc}, {"federation": FEDERATION_COLOUR}, "federation AUC")
        right.lines[-1].set_linewidth(2.2)
    right.set_title("held-out AUC per site and federation", fontsize=FONT)
    right.set_ylabel("AUC", fontsize=FONT)
    right.axhline(0.5, linestyle="--", color="#999999", linewidth=0.8)
    _legend(right, drawn)
    for ax in (left, right):
        ax.set_xlabel("round", fontsize=FONT)
        ax.tick_params(labelsize=FONT - 1)
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def _densities(edges: np.ndarray, counts: Any, what: str) -> np.ndarray:
    c = _floats(counts, what)
    if len(c) != len(edges) - 1:
        raise ValueError(f"{what}: {len(c)} counts for {len(edges) - 1} bins")
    total = float(np.nansum(c))
    return np.nan_to_num(c, nan=0.0) / (total * np.diff(edges)) if total > 0 else np.zeros(len(c))


def harmonization_png(feature: str, edges: Sequence[float], sites: Mapping[str, Mapping[str, Any]],
                      colours: Mapping[str, str] | None = None) -> bytes:
    """One feature's distribution per site before and after harmonisation (two panels), as densities over
    the shared ``edges`` (count / (site total x bin width)), so uneven or merged bins compare fairly."""
    e = _floats(edges, f"edges of {feature}")
    if len(e) < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
        raise ValueError(f"edges of {feature}: need 2 or more increasing finite values")
    if not sites:
        raise ValueError(f"no site histograms for {feature}")
    colours = colours or site_colours(sites)
    fig, axes = _figure(8.6, 2.8, ncols=2, top=0.8, sharex=True, sharey=True)
    for ax, phase in zip(axes, ("before", "after"), strict=True):
        for name in sorted(sites):
            hist = sites[name]
            if not isinstance(hist, Mapping) or phase not in hist:
                raise ValueError(f"histogram of {feature} at {name}: no '{phase}' counts")
            dens = _densities(e, hist[phase], f"{phase} counts of {feature} at {name}")
            ax.stairs(dens, e, color=colours.get(name), linewidth=1.3, label=label(name))
        ax.set_title(f"{phase} harmonisation", fontsize=FONT)
        ax.set_xlabel("feature value", fontsize=FONT)
        ax.tick_params(labelsize=FONT - 1)
        ax.grid(alpha=0.3, linewidth=0.5)
    axes[0].set_ylabel("density", fontsize=FONT)
    _legend(axes[1], len(sites))
    fig.suptitle(label(feature, 90), fontsize=FONT)
    return _png(fig)


def decision_curve_png(curve: Mapping[str, Any], title: str, colours: Mapping[str, str] | None = None) -> bytes:
    """Decision curve of the pooled cases: net benefit of the model against treating all as HGG and treating
    none, over the run's thresholds. Where a site withheld a threshold (too few cases changed there) the model's
    net benefit is only known to lie in a range: shaded, with no point. ``colours`` (sites) is unused: one line."""
    t = _floats(curve.get("threshold"), "decision-curve thresholds")
    model = _floats(curve.get("model"), "net benefit of the model")
    low = _floats(curve.get("model_low", curve.get("model")), "lower net benefit")
    high = _floats(curve.get("model_high", curve.get("model")), "upper net benefit")
    treat_all = _floats(curve.get("treat_all"), "net benefit of treating all")
    if not len(t) or not (len(t) == len(model) == len(low) == len(high) == len(treat_all)):
        raise ValueError("decision curve: threshold, model, model_low, model_high and treat_all must be equally "
                         "long, non-empty lists")
    fig, (ax,) = _figure(4.8, 3.8)
    ax.axhline(0.0, color="#999999", linewidth=0.8, label="treat none")
    ax.plot(t, treat_all, linestyle="--", color="#999999", linewidth=0.8, label="treat all as HGG")
    if np.any(low != high):
        ax.fill_between(t, low, high, color=POOLED_COLOUR, alpha=0.2, linewidth=0,
                        label="model, range where a site withheld the threshold")
        for edge in (low, high):
            ax.plot(t, edge, color=POOLED_COLOUR, linewidth=1.0)
    ax.plot(t, model, marker="o", markersize=3, linewidth=1.8, color=POOLED_COLOUR, label="model (pooled)")
    top = float(np.nanmax(np.r_[high, treat_all, 0.0]))
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(-0.1, max(top, 0.05) * 1.1 + 0.02)
    ax.set_xlabel("threshold probability of HGG", fontsize=FONT)
    ax.set_ylabel("net benefit", fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    ax.grid(alpha=0.3, linewidth=0.5)
    ax.set_title(label(title, 60), fontsize=FONT)
    _legend(ax, 4)
    return _png(fig)


def forest_png(rows: Sequence[tuple[str, str, float, float, float, float]], reference: str, colours: object = None,
               ) -> bytes:
    """Forest plot: one line per (family, validation), the AUC difference to ``reference`` and its 95% interval."""
    if not rows:
        raise ValueError("no finite AUC difference to draw")
    height = 1.0 + 0.35 * len(rows)
    fig, (ax,) = _figure(6.5, height, top=1 - 0.4 / height)
    fig.subplots_adjust(left=2.4 / 6.5)
    ys = np.arange(len(rows))[::-1]
    for y, (_, part, diff, low, high, _p) in zip(ys, rows, strict=True):
        colour = "#1f77b4" if part.startswith("internal") else "#d62728"  # held-out split or cross-validated
        ax.plot([low, high], [y, y], color=colour, lw=1.5)
        ax.plot([diff], [y], "s", color=colour, ms=5)
    ax.axvline(0.0, color="#555", lw=0.8, ls="--")
    ax.set_yticks(ys, [f"{name} ({part})" for name, part, *_ in rows], fontsize=FONT)
    ax.set_xlabel(f"AUC difference to {reference} (95% CI)", fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    return _png(fig)
