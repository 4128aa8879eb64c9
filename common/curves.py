"""Curves a site can send without revealing any case: ROC points, calibration bins and histograms
whose every step covers either no case or at least k cases (pure numpy).

A site sorts its held-out scores, cuts them into at most ``points`` groups of at least k cases
each, and sends only per-group counts; arrays always have ``points`` rows (padded), so their size
never depends on the number of cases.
"""

from __future__ import annotations

import numpy as np


def rank_groups(n: int, k: int, points: int) -> list[slice]:
    """Contiguous groups over ``n`` sorted items: min(points, n // k) groups of near-equal size, each >= k."""
    groups = min(points, n // max(k, 1))
    if groups <= 0:
        return []
    bounds = np.linspace(0, n, groups + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def roc_points(y: np.ndarray, score: np.ndarray, k: int, points: int) -> np.ndarray:
    """(points, 2) cumulative [true positives, false positives] after each group of cases, highest scores
    first. Each step adds >= k cases; the last real row is repeated to pad (a repeated point adds nothing).
    Ties across a group boundary are split in score order (mergesort), as any threshold sweep must."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    out = np.zeros((points, 2))
    cum = np.zeros(2)
    for i, g in enumerate(rank_groups(len(y), k, points)):
        pos = int(y[order[g]].sum())
        cum = cum + [pos, (g.stop - g.start) - pos]
        out[i] = cum
    filled = len(rank_groups(len(y), k, points))
    out[filled:] = cum
    return out


def calibration_groups(y: np.ndarray, prob: np.ndarray, k: int, points: int) -> np.ndarray:
    """(points, 3) per group of >= k cases by predicted probability: [cases, sum of predicted probability,
    HGG cases]; unused rows are zero."""
    y = np.asarray(y).astype(bool)
    prob = np.asarray(prob, dtype=np.float64)
    order = np.argsort(prob, kind="mergesort")
    out = np.zeros((points, 3))
    for i, g in enumerate(rank_groups(len(y), k, points)):
        idx = order[g]
        out[i] = [len(idx), prob[idx].sum(), y[idx].sum()]
    return out


def roc_curve(points: np.ndarray) -> tuple[list[float], list[float]]:
    """False and true positive rates from (0, 0) through every distinct cumulative point of ``roc_points``."""
    pts = np.vstack([[0.0, 0.0], np.asarray(points, dtype=np.float64)])
    n_pos, n_neg = pts[-1]
    keep = np.r_[True, np.any(np.diff(pts, axis=0) != 0, axis=1)]
    pts = pts[keep]
    tpr = pts[:, 0] / n_pos if n_pos else np.zeros(len(pts))
    fpr = pts[:, 1] / n_neg if n_neg else np.zeros(len(pts))
    return fpr.tolist(), tpr.tolist()


def calibration_curve(groups: np.ndarray) -> dict[str, list[float]]:
    """Mean predicted probability, observed HGG rate and cases per non-empty group."""
    g = np.asarray(groups, dtype=np.float64)
    g = g[g[:, 0] > 0]
    return {"predicted": (g[:, 1] / g[:, 0]).tolist(), "observed": (g[:, 2] / g[:, 0]).tolist(),
            "n": g[:, 0].astype(int).tolist()}


def k_histogram(values: np.ndarray, edges: np.ndarray, k: int) -> np.ndarray:
    """(b,) counts of ``values`` over the b bins of ``edges`` (b + 1,), each count 0 or >= k.

    Values beyond the edges go to the end bins. Adjacent bins are merged left to right until a group
    holds >= k cases; the group's count is placed in its middle bin (so the count is never split into
    pieces below k); a last group below k joins the one before it. With fewer than k values, all zero.
    """
    values = np.asarray(values, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    b = len(edges) - 1
    idx = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, b - 1)
    raw = np.bincount(idx, minlength=b)
    out = np.zeros(b)
    if raw.sum() < k:
        return out
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in range(b):
        current.append(i)
        total += int(raw[i])
        if total >= k:
            groups.append(current)
            current, total = [], 0
    if current:  # a remainder below k (possibly empty of cases) joins the last full group
        groups[-1].extend(current)
    for group in groups:
        count = int(raw[group].sum())
        # the middle of the group's occupied bins, so the mass stays near where the cases are
        occupied = [i for i in group if raw[i] > 0]
        out[occupied[len(occupied) // 2]] = count
    return out
