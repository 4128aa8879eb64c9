"""Classification metrics from scores at a site and from counts across sites (pure numpy).

A site computes AUC on its own cases and sends it with confusion counts; across sites,
sensitivity/specificity/balanced accuracy come from the summed counts and AUC is a mean
weighted by each site's number of cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

COUNT_KEYS = ("tp", "fp", "tn", "fn")


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN if one class is absent."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score), dtype=np.float64)
    # mid-ranks: every run of equal scores gets the mean of its positions
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mid, counts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion_counts(y: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, int]:
    """tp/fp/tn/fn with ``score >= threshold`` called positive (HGG)."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(score) >= threshold
    return {
        "tp": int(np.sum(pred & y)),
        "fp": int(np.sum(pred & ~y)),
        "tn": int(np.sum(~pred & ~y)),
        "fn": int(np.sum(~pred & y)),
    }


def rates(counts: Mapping[str, float]) -> dict[str, float]:
    """Sensitivity, specificity and balanced accuracy from confusion counts (NaN where undefined)."""
    tp, fp, tn, fn = (float(counts[k]) for k in COUNT_KEYS)
    sens = tp / (tp + fn) if tp + fn > 0 else float("nan")
    spec = tn / (tn + fp) if tn + fp > 0 else float("nan")
    return {"sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2.0}


def combine_sites(sites: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Federation-wide metrics from per-site ``{tp, fp, tn, fn, auc, n}`` records.

    Counts are summed (so rates equal those of the pooled predictions); AUC is the mean of the
    site AUCs weighted by ``n``, sites without a defined AUC left out of that mean.
    """
    totals = {k: int(sum(int(s[k]) for s in sites)) for k in COUNT_KEYS}
    aucs = [(float(s["auc"]), float(s["n"])) for s in sites if np.isfinite(float(s["auc"]))]
    weight = sum(n for _, n in aucs)
    auc = sum(a * n for a, n in aucs) / weight if weight else float("nan")
    return {**totals, "n": int(sum(int(s["n"]) for s in sites)), "auc": auc, **rates(totals)}
