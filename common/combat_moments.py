"""A site's ComBat location/scale and its harmonised moments from the site's moments alone (no covariates).

``common.combat.fit_site`` reads a site's cases; without covariates and with parametric ComBat everything it
computes is a function of the site's count n, per-feature mean and centred sum of squares m2 over the same cases:
the standardised data's mean and variance, the empirical-Bayes priors across features, and each iteration of
``it_sol`` (Σ (s − g)² = m2_s + n (mean_s − g)²). Harmonising is then an affine map per feature, so the moments of
the harmonised cases follow from the raw ones. server/derived_moments.py works a leave-one-site-out fold's moments
out with this; a site keeps its own fold ComBat with it (client/compute.py ``combat_fit_from_moments``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.combat import _CONSTANT_RTOL
from common.combat_eb import location_scale_from_moments
from common.combat_params import safe_var


@dataclass(frozen=True)
class SiteFit:
    """What ``combat.fit_site`` fits at one site, without covariates: gamma_star, delta_star (d,), unadjusted (d,)
    bool, and the pooled grand_mean (d,) and sd = sqrt(safe pooled variance) (d,) it standardises with."""

    gamma_star: np.ndarray
    delta_star: np.ndarray
    unadjusted: np.ndarray
    grand_mean: np.ndarray
    sd: np.ndarray


def fit_from_sums(n: int, mean: np.ndarray, m2: np.ndarray, grand_mean: np.ndarray, var_pooled: np.ndarray,
                  zero_variance: np.ndarray, *, eb: bool = True, mean_only: bool = False) -> SiteFit:
    """``combat.fit_site(y, pooled)`` (parametric, no covariates) from the site's n, mean (d,) and m2 (d,) of y.

    The same ``constant`` rule (the site's variance <= rtol² x mean(y²), mean(y²) = m2/n + mean²) and the same
    empirical Bayes, on the standardised moments mean_s = (mean − grand_mean)/sd, m2_s = m2/sd²."""
    mean, m2 = np.asarray(mean, dtype=np.float64), np.asarray(m2, dtype=np.float64)
    grand_mean, var_pooled = np.asarray(grand_mean, dtype=np.float64), np.asarray(var_pooled, dtype=np.float64)
    if n < 2:
        raise ValueError(f"a site's ComBat needs at least 2 cases, got {n}")
    constant = m2 / (n - 1) <= _CONSTANT_RTOL**2 * (m2 / n + mean**2)
    unadjusted = np.asarray(zero_variance, dtype=bool) | constant
    sd = np.sqrt(safe_var(var_pooled, unadjusted))
    gamma_star, delta_star = np.zeros(mean.shape[0]), np.ones(mean.shape[0])
    ok = ~unadjusted
    if ok.any():
        gamma_star[ok], delta_star[ok] = location_scale_from_moments(
            n, (mean[ok] - grand_mean[ok]) / sd[ok], m2[ok] / sd[ok] ** 2, eb=eb, mean_only=mean_only)
    return SiteFit(gamma_star, delta_star, unadjusted, grand_mean, sd)


def harmonise(fit: SiteFit, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and centred sum of squares (d,) of a site's cases after ``SiteCombat.apply`` from their raw ones:
    x* = (x − grand_mean − sd·gamma*)/sqrt(delta*) + grand_mean per feature; unadjusted features unchanged."""
    mean, m2 = np.asarray(mean, dtype=np.float64), np.asarray(m2, dtype=np.float64)
    root = np.sqrt(fit.delta_star)
    moved = ((mean - fit.grand_mean) / fit.sd - fit.gamma_star) / root * fit.sd + fit.grand_mean
    return np.where(fit.unadjusted, mean, moved), np.where(fit.unadjusted, m2, m2 / fit.delta_star)


def affine(fit: SiteFit) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each (d,): ``SiteCombat.apply`` as x* = a·x + b per feature (``harmonise``'s map; unadjusted: 1, 0)."""
    a = 1.0 / np.sqrt(fit.delta_star)
    b = fit.grand_mean - (fit.grand_mean + fit.sd * fit.gamma_star) * a
    return np.where(fit.unadjusted, 1.0, a), np.where(fit.unadjusted, 0.0, b)


def _standardised(raw_mean: np.ndarray, a: np.ndarray, b: np.ndarray, mean: np.ndarray,
                  std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z = (a·x + b − mean)/std = scale·(x − x̄) + shift per feature, x̄ the raw mean: (scale, shift), each (m,)."""
    return a / std, (a * raw_mean + b - mean) / std


def crossproducts(raw: np.ndarray, n: int, raw_mean: np.ndarray, a: np.ndarray, b: np.ndarray,
                  mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """What the site would send for a correlation query (Σ z zᵀ, (m, m)) under another harmonisation (a, b) and
    pooled mean and std (m,), from its centred cross-products before ComBat ``raw`` (m, m), count n and raw mean
    (m,)."""
    scale, shift = _standardised(raw_mean, a, b, mean, std)
    return np.outer(scale, scale) * raw + n * np.outer(shift, shift)
