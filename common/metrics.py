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
    out = {**totals, "n": int(sum(int(s["n"]) for s in sites)), "auc": auc, **rates(totals)}
    if sites and all("auc_var" in s for s in sites):
        out["auc_var"] = combined_auc_variance(sites)
    return out


Z95 = 1.959963984540054


def delong_variance(y: np.ndarray, score: np.ndarray) -> float:
    """Variance of the AUC estimate (DeLong et al. 1988, structural components); NaN if a class is absent.

    Computed at the site from its own scores; only the scalar leaves.
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    pos, neg = score[y], score[~y]
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        return float("nan")
    # psi(X, Y) = 1 if X > Y, 1/2 if equal: placement values by vectorised comparison (m x n is small)
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion; (NaN, NaN) when n is 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def intervals(record: Mapping[str, float], z: float = Z95) -> dict[str, list[float]]:
    """95% intervals from a site's (or the federation's) counts and AUC variance.

    AUC: normal approximation with the DeLong variance, clipped to [0, 1]; sensitivity and specificity:
    Wilson; balanced accuracy: normal approximation from the two binomial variances.
    """
    tp, fp, tn, fn = (float(record[k]) for k in COUNT_KEYS)
    auc, var = float(record["auc"]), float(record.get("auc_var", float("nan")))
    out = {"auc": [float(np.clip(auc - z * np.sqrt(var), 0, 1)), float(np.clip(auc + z * np.sqrt(var), 0, 1))]
           if np.isfinite(auc) and np.isfinite(var) else [float("nan"), float("nan")],
           "sensitivity": list(wilson_interval(tp, tp + fn, z)),
           "specificity": list(wilson_interval(tn, tn + fp, z))}
    r = rates(record)
    if tp + fn > 0 and tn + fp > 0:
        se = np.sqrt(r["sensitivity"] * (1 - r["sensitivity"]) / (tp + fn)
                     + r["specificity"] * (1 - r["specificity"]) / (tn + fp)) / 2
        ba = r["balanced_accuracy"]
        out["balanced_accuracy"] = [float(max(ba - z * se, 0.0)), float(min(ba + z * se, 1.0))]
    else:
        out["balanced_accuracy"] = [float("nan"), float("nan")]
    return out


def combined_auc_variance(sites: Sequence[Mapping[str, float]]) -> float:
    """Variance of the n-weighted mean of independent site AUCs: sum of (n_i / N)^2 var_i."""
    usable = [(float(s["n"]), float(s["auc_var"])) for s in sites
              if np.isfinite(float(s["auc"])) and np.isfinite(float(s.get("auc_var", float("nan"))))]
    total = sum(n for n, _ in usable)
    return float(sum((n / total) ** 2 * v for n, v in usable)) if total else float("nan")
