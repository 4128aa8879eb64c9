"""Paired comparison of models scored on the same cases, from per-site aggregates (pure numpy).

Site half (``paired_delong``, ``brier_terms``): on its own cases, the AUC of each of f models and their paired
DeLong covariance (DeLong, DeLong & Clarke-Pearson 1988, structural components), and the Brier sums. Server half
(``combine``): per pair (a, b), each site's AUC difference d_s = AUC_a - AUC_b with variance
v_s = C_aa + C_bb - 2 C_ab is pooled by inverse variance over sites (sites are independent), giving the difference,
its 95% interval and two-sided p-value; the Brier difference is exact over all sites' cases, with the normal
interval of a mean of paired per-case differences.
Under cross-validation each repeat is combined so, then ``average_repeats`` takes the mean over the repeats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import erfc, sqrt

import numpy as np

Z95 = 1.959963984540054


def placements(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components of one model: V10 (m,) per positive case, the share of negatives it outranks
    (ties 1/2), and V01 (n,) per negative, the share of positives that outrank it."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    pos, neg = score[y], score[~y]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


def paired_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (f,) of f models scoring the same cases, scores (f, n), labels y (n,) in {0, 1}, and their DeLong
    covariance (f, f) = S10 / m + S01 / n (S the sample covariance, ddof 1, of the components over the m positives
    and n negatives). Its diagonal is each model's DeLong variance (common.metrics.delong_variance)."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    comps = [placements(y, row) for row in scores]
    v10 = np.array([c[0] for c in comps])  # (f, m)
    v01 = np.array([c[1] for c in comps])  # (f, n)
    m, n = v10.shape[1], v01.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"paired DeLong needs >= 2 cases of each class ({m} positive, {n} negative)")
    cov = np.atleast_2d(np.cov(v10, ddof=1)) / m + np.atleast_2d(np.cov(v01, ddof=1)) / n
    return v10.mean(axis=1), cov


def brier_terms(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per model the Brier sum Σ e (f,), e = (score - y)^2 per case, and the cross sums Σ e_a e_b (f, f)."""
    err = (np.atleast_2d(np.asarray(scores, dtype=np.float64)) - np.asarray(y, dtype=np.float64)[None, :]) ** 2
    return err.sum(axis=1), err @ err.T


@dataclass(frozen=True)
class SiteComparison:
    """One site's reply: AUCs (f,), their covariance (f, f), Brier sums (f,) and cross sums (f, f), cases n."""

    auc: np.ndarray
    cov: np.ndarray
    sse: np.ndarray
    cross: np.ndarray
    n: int


def site_comparison(y: np.ndarray, scores: np.ndarray) -> SiteComparison:
    auc, cov = paired_delong(y, scores)
    sse, cross = brier_terms(y, scores)
    return SiteComparison(auc, cov, sse, cross, len(y))


def _p_two_sided(z: float) -> float:
    return erfc(abs(z) / sqrt(2.0))


def combine(sites: Sequence[SiteComparison], names: Sequence[str], reference: int = 0) -> dict[str, dict[str, object]]:
    """Per family other than ``names[reference]``: its AUC difference to the reference (family - reference), pooled
    by inverse variance over sites, with 95% interval and p-value; the Brier difference over all cases with its
    interval. Sites whose difference has no variance (identical rankings) carry no information and are left out."""
    out: dict[str, dict[str, object]] = {}
    total_n = sum(s.n for s in sites)
    for b, name in enumerate(names):
        if b == reference:
            continue
        a = reference
        weights, diffs = [], []
        for s in sites:
            var = float(s.cov[b, b] + s.cov[a, a] - 2.0 * s.cov[a, b])
            if var > 1e-15:
                weights.append(1.0 / var)
                diffs.append(float(s.auc[b] - s.auc[a]))
        if weights:
            w = np.array(weights)
            diff, var = float(np.dot(w, diffs) / w.sum()), float(1.0 / w.sum())
            se = sqrt(var)
            auc_part: dict[str, object] = {"auc_diff": diff, "auc_diff_var": var,
                                           "auc_diff_ci": [diff - Z95 * se, diff + Z95 * se],
                                           "p_value": _p_two_sided(diff / se), "sites": len(weights)}
        else:  # every site ranked the cases identically under both models
            auc_part = {"auc_diff": 0.0, "auc_diff_var": 0.0, "auc_diff_ci": [0.0, 0.0], "p_value": 1.0, "sites": 0}
        # Brier: mean over all cases of e_b - e_a; its variance from the summed squares of the paired differences
        sum_d = sum(float(s.sse[b] - s.sse[a]) for s in sites)
        sum_d2 = sum(float(s.cross[b, b] + s.cross[a, a] - 2.0 * s.cross[a, b]) for s in sites)
        mean_d = sum_d / total_n
        var_d = max(sum_d2 - total_n * mean_d**2, 0.0) / (total_n - 1) / total_n if total_n > 1 else float("nan")
        se_d = sqrt(var_d)
        out[name] = {**auc_part, "reference": names[reference], "brier_diff": mean_d,
                     "brier_diff_ci": [mean_d - Z95 * se_d, mean_d + Z95 * se_d], "n": total_n}
    return out


def from_reply(arrays: Mapping[str, np.ndarray], n: int) -> SiteComparison:
    """A site's ``query.compare`` reply as a SiteComparison."""
    return SiteComparison(np.asarray(arrays["auc"]), np.asarray(arrays["auc-cov"]), np.asarray(arrays["sse"]),
                          np.asarray(arrays["sse-cross"]), n)


def pool_differences(pairs: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """Inverse-variance pooling of independent AUC differences (each ``auc_diff``, ``auc_diff_var``: e.g. one per
    leave-one-site-out fold), with 95% interval and p-value; the Brier differences by their case counts."""
    usable = [(float(p["auc_diff"]), float(p["auc_diff_var"])) for p in pairs  # type: ignore[arg-type]
              if float(p.get("auc_diff_var", 0.0)) > 1e-15]  # type: ignore[arg-type]
    if not usable:
        return {"auc_diff": float("nan"), "auc_diff_ci": [float("nan")] * 2, "p_value": float("nan"), "folds": 0}
    w = np.array([1.0 / v for _, v in usable])
    diff = float(np.dot(w, [d for d, _ in usable]) / w.sum())
    se = sqrt(1.0 / w.sum())
    n = sum(int(p.get("n", 0)) for p in pairs)  # type: ignore[call-overload]
    brier = (sum(float(p["brier_diff"]) * int(p.get("n", 0)) for p in pairs) / n  # type: ignore[arg-type, call-overload]
             if n else float("nan"))
    return {"auc_diff": diff, "auc_diff_var": se**2, "auc_diff_ci": [diff - Z95 * se, diff + Z95 * se],
            "p_value": _p_two_sided(diff / se), "folds": len(usable), "brier_diff": brier}


def average_repeats(repeats: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """One family's paired difference over the repeats of cross-validation, each repeat's ``combine`` result (sites
    pooled by inverse variance): the mean AUC difference and the mean Brier difference, each with the mean of the
    repeats' standard errors as its own.

    Repeats deal the same cases anew, so their differences are positively correlated, not independent: inverse-
    variance pooling (or se / sqrt(repeats)) would overstate the evidence. The standard error of a mean of R
    correlated estimates is at most the mean of their standard errors (equal when they are perfectly correlated),
    so this interval is conservative; with one repeat it is that repeat's. A repeat in which every site ranked the
    cases alike under both families (``combine``'s 0-variance case) enters with its exact difference 0 and 0."""
    if not repeats:
        return {"auc_diff": float("nan"), "auc_diff_ci": [float("nan")] * 2, "p_value": float("nan"), "repeats": 0}
    diff = float(np.mean([float(r["auc_diff"]) for r in repeats]))  # type: ignore[arg-type]
    se = float(np.mean([sqrt(float(r["auc_diff_var"])) for r in repeats]))  # type: ignore[arg-type]
    brier = float(np.mean([float(r["brier_diff"]) for r in repeats]))  # type: ignore[arg-type]
    brier_half = float(np.mean([(float(r["brier_diff_ci"][1]) - float(r["brier_diff_ci"][0])) / 2  # type: ignore[index]
                                for r in repeats]))
    # every repeat ranked the cases identically under both models at every site (combine's 0-variance case)
    p = _p_two_sided(diff / se) if se > 0 else 1.0
    return {"auc_diff": diff, "auc_diff_var": se**2, "auc_diff_ci": [diff - Z95 * se, diff + Z95 * se],
            "p_value": p, "repeats": len(repeats), "brier_diff": brier,
            "brier_diff_ci": [brier - brier_half, brier + brier_half], "reference": repeats[0].get("reference"),
            "n": repeats[0].get("n")}
