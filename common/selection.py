"""Federated feature selection from aggregates only (pure numpy).

1. Drop features that are near-constant over the pooled training data.
2. Rank by Welch's t from class-wise moments (n, mean, m2 per class, pooled over sites).
3. Take the top candidates, pool their correlation from per-site cross-products of standardised
   values, and keep features greedily by |t|, skipping any correlated above a threshold with one
   already kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from common.moments import pool_moments


def near_constant(std: np.ndarray, mean: np.ndarray, rel_tol: float = 1e-9) -> np.ndarray:
    """(d,) bool: std is negligible against the feature's magnitude."""
    return std <= rel_tol * np.maximum(1.0, np.abs(mean))


def welch_t(pos: tuple[int, np.ndarray, np.ndarray], neg: tuple[int, np.ndarray, np.ndarray]) -> np.ndarray:
    """Welch's t (d,) of class 1 vs class 0 from pooled (n, mean (d,), m2 (d,)) per class.

    Features with zero variance in both classes get t = 0.
    """
    n1, mean1, m2_1 = pos
    n0, mean0, m2_0 = neg
    if n1 < 2 or n0 < 2:
        raise ValueError(f"Welch's t needs two cases per class, got {n1} and {n0}")
    se = np.sqrt(m2_1 / (n1 - 1) / n1 + m2_0 / (n0 - 1) / n0)
    diff = mean1 - mean0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(se > 0, diff / np.where(se > 0, se, 1.0), 0.0)


def pool_classwise(sites: Sequence[dict[int, tuple[int, np.ndarray, np.ndarray]]]) -> dict[int, tuple]:
    """Pool per-site class-wise moments: ``[{1: (n, mean, m2), 0: (...)}, ...]`` -> ``{1: (...), 0: (...)}``."""
    return {cls: pool_moments(*zip(*(s[cls] for s in sites), strict=True)) for cls in (0, 1)}


def site_crossproducts(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(m, m) sum over the site's cases of z zᵀ, z = (x - pooled mean) / pooled std; x is (n, m)."""
    z = (np.asarray(x, float) - mean) / std
    return z.T @ z


def pooled_correlation(crossproducts: Sequence[np.ndarray], n_total: int) -> np.ndarray:
    """(m, m) correlation matrix of the pooled data from the sites' cross-product sums.

    With z standardised by the pooled mean and std (ddof 1), sum z zᵀ / (n - 1) is the correlation.
    """
    corr = np.sum(crossproducts, axis=0) / (n_total - 1)
    return np.clip((corr + corr.T) / 2.0, -1.0, 1.0)


def greedy_decorrelate(order: Sequence[int], corr: np.ndarray, threshold: float, max_features: int) -> list[int]:
    """Walk ``order`` (indices into corr, best first); keep an index unless |r| > threshold with a kept one."""
    kept: list[int] = []
    for i in order:
        if all(abs(corr[i, j]) <= threshold for j in kept):
            kept.append(int(i))
            if len(kept) == max_features:
                break
    return kept


@dataclass
class Selection:
    """The chosen features and why, for the report and the audit log."""

    names: list[str]
    t: list[float]
    dropped_constant: int
    candidates: int
    dropped_correlated: int
    threshold: float
    dropped_l1: int = 0  # by the optional LASSO step (server.training.select_l1)
    l1: float = 0.0
    # the pooled correlation of the candidates the decorrelation read (names, matrix): exact training's start
    # (common.newton_start) takes the chosen features' block; None without it (selection off, noised)
    correlation: tuple[tuple[str, ...], np.ndarray] | None = field(default=None, repr=False, compare=False)
    # each site's cross-products before ComBat (None unless asked for): the main run's, for the leave-one-site-out
    # folds' correlation (server.derived_moments)
    raw: RawCrossproducts | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class RawCrossproducts:
    """What the sites sent for a correlation query's candidates (names, (m,)) before ComBat: by site name, its
    training cases n and Σ (x − x̄)(x − x̄)ᵀ (m, m), x̄ their mean."""

    names: tuple[str, ...]
    sites: dict[str, tuple[int, np.ndarray]]


def first_ask(n_candidates: int, n_keep: int) -> int:
    """How many of the best-ranked candidates the correlation query asks for first: enough that the greedy walk
    (``greedy_decorrelate``) usually keeps ``n_keep`` among them, at most every candidate. The walk examined 3 to 4
    for 3 kept on the bench's sites (10 cases per class), 12 to 56 for 8 kept in the tiny cohorts of
    tests/test_federation.py (6 cases per class); the walk is the same either way, and one that runs out asks for all
    (one more round for that cohort). 48 of 200 for 8 kept: 18 kB of cross-products per site and cohort, not 320."""
    return min(n_candidates, 4 * n_keep + 16)
