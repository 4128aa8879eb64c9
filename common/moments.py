"""Federated feature moments: per-site (count, mean, centred sum of squares) -> pooled mean and variance.

Sites send ``n``, the per-feature mean and M2 = sum of squared deviations from the site mean, all
aggregates over the site's n cases. Chan et al.'s pairwise update combines them exactly and without
the cancellation that raw sums of squares suffer on features like energy (~1e9).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def site_moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mean (d,), m2 (d,)) of an (n, d) matrix."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty (n, d) matrix, got shape {x.shape}")
    mean = x.mean(axis=0)
    return int(x.shape[0]), mean, ((x - mean) ** 2).sum(axis=0)


def pool_moments(counts: Sequence[int], means: Sequence[np.ndarray],
                 m2s: Sequence[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """Combine per-site moments into (n, mean (d,), m2 (d,)) of the pooled data."""
    if not counts:
        raise ValueError("no site moments to pool")
    n, mean, m2 = int(counts[0]), np.asarray(means[0], float), np.asarray(m2s[0], float)
    for n_b, mean_b, m2_b in zip(counts[1:], means[1:], m2s[1:], strict=True):
        mean_b, m2_b = np.asarray(mean_b, float), np.asarray(m2_b, float)
        total = n + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta**2 * (n * n_b / total)
        n = total
    return n, mean, m2


def pooled_mean_std(counts: Sequence[int], means: Sequence[np.ndarray], m2s: Sequence[np.ndarray],
                    ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pooled mean (d,) and standard deviation (d,) with ``ddof`` (sample std by default)."""
    n, mean, m2 = pool_moments(counts, means, m2s)
    if n - ddof <= 0:
        raise ValueError(f"{n} cases are too few for ddof={ddof}")
    return mean, np.sqrt(np.maximum(m2, 0.0) / (n - ddof))


def site_share(counts: Sequence[int], means: Sequence[np.ndarray], m2s: Sequence[np.ndarray]) -> np.ndarray:
    """(d,) share of each feature's pooled variation that lies between sites: (total M2 − Σ site M2) / total M2,
    the R² of the feature regressed on site indicators (eta²). 0 when every site has the same mean, 1 when the
    site alone fixes the value; NaN where the pooled data do not vary. How predictable the site is from the
    feature: what scanner harmonisation should bring down."""
    _, _, total = pool_moments(counts, means, m2s)
    within = np.sum([np.asarray(m, float) for m in m2s], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, (total - within) / total, np.nan)
    return np.clip(share, 0.0, 1.0)  # rounding can put a constant-mean feature a hair below 0
