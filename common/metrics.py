"""Classification metrics from scores at a site and from counts across sites (pure numpy).

A site computes AUC on its own cases and sends it with confusion counts; across sites,
sensitivity/specificity/balanced accuracy come from the summed counts and AUC is a mean
weighted by each site's number of cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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


def federation_gain(loso: Mapping[str, Mapping[str, Any]], local: Mapping[str, Mapping[str, Any]],
                    z: float = Z95) -> dict[str, Any]:
    """What the federation gained at sites it never saw, against each hospital alone.

    ``loso[h]``: the model trained by every site but h, scored at h (n, auc, auc_var). ``local[s]["external"][h]``:
    site s's own model (its whole pipeline alone) scored at h. Per held-out site h: the federated AUC, the mean
    AUC at h of the other sites' local-only models, and their difference; overall: the case-weighted means
    over the sites where both exist. The interval of a difference adds the variances as if the AUCs were
    independent: they are computed on the same cases and positively correlated, so the interval is wider
    than the paired one (conservative).
    """
    per_site: dict[str, dict[str, float]] = {}
    for h, fed in sorted(loso.items()):
        if "error" in fed or not np.isfinite(float(fed.get("auc", float("nan")))):
            continue
        at_h = [_dict_of(_dict_of(rec.get("external")).get(h)) for s, rec in local.items() if s != h]
        at_h = [r for r in at_h if np.isfinite(float(r.get("auc", float("nan"))))]
        if not at_h:
            continue
        local_auc = float(np.mean([float(r["auc"]) for r in at_h]))
        local_var = float(sum(float(r.get("auc_var", float("nan"))) for r in at_h)) / len(at_h) ** 2
        gain = float(fed["auc"]) - local_auc
        var = float(fed.get("auc_var", float("nan"))) + local_var
        per_site[h] = {"n": float(fed["n"]), "federated_auc": float(fed["auc"]), "local_only_auc": local_auc,
                       "local_models": float(len(at_h)), "gain": gain, "gain_var": var,
                       "gain_ci": _normal_ci(gain, var, z)}
    out: dict[str, Any] = {"sites": per_site}
    if per_site:
        n = np.array([r["n"] for r in per_site.values()])
        w = n / n.sum()
        mean = {k: float(np.sum(w * [r[k] for r in per_site.values()]))
                for k in ("federated_auc", "local_only_auc", "gain")}
        var = float(np.sum(w**2 * [r["gain_var"] for r in per_site.values()]))
        out["overall"] = {**mean, "gain_var": var, "gain_ci": _normal_ci(mean["gain"], var, z),
                          "sites": len(per_site), "n": float(n.sum())}
    return out


def _normal_ci(value: float, var: float, z: float) -> list[float]:
    if not (np.isfinite(value) and np.isfinite(var)):
        return [float("nan"), float("nan")]
    half = z * float(np.sqrt(max(var, 0.0)))
    return [value - half, value + half]


def _dict_of(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def slope_interval(fit: Mapping[str, Any], z: float = Z95) -> list[float]:
    """Wald 95% interval of a calibration fit's slope (``slope``, ``slope_se`` from common.clinical's Newton fit)."""
    slope, se = float(fit.get("slope", float("nan"))), float(fit.get("slope_se", float("nan")))
    return _normal_ci(slope, se**2, z) if np.isfinite(se) and se > 0 else [float("nan")] * 2


def pool_slopes(fits: Sequence[Mapping[str, Any]], z: float = Z95) -> dict[str, Any]:
    """Calibration slopes of independent fits (one per leave-one-site-out fold's held-out site) pooled by inverse
    variance, with the Wald 95% interval; fits without a finite slope and standard error are left out."""
    usable = [(float(f["slope"]), float(f["slope_se"])) for f in fits
              if np.isfinite(float(f.get("slope", float("nan")))) and float(f.get("slope_se", 0.0)) > 0]
    if not usable:
        return {"slope": float("nan"), "slope_se": float("nan"), "slope_ci": [float("nan")] * 2, "folds": 0}
    w = np.array([1.0 / se**2 for _, se in usable])
    slope, se = float(np.dot(w, [s for s, _ in usable]) / w.sum()), float(np.sqrt(1.0 / w.sum()))
    return {"slope": slope, "slope_se": se, "slope_ci": _normal_ci(slope, se**2, z), "folds": len(usable)}
