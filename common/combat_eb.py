"""ComBat's per-site location/scale estimates: neuroCombat's ``fit_LS_model_and_find_priors`` and its
adjustments (``it_sol`` parametric, ``int_eprior`` non-parametric) for one batch, on that site's standardised
data. Used by ``common.combat.fit_site`` / ``join_site``; checked with them against neuroCombat (tests/test_combat.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

# neuroCombat's it_sol stopping tolerance; the cap only guards against a fit that never settles.
_IT_SOL_CONV = 1e-4
_IT_SOL_MAX_ITER = 10_000
# Rows of the (d, d) likelihood matrix handled at once in non-parametric EB (bounds memory for large d).
_EPRIOR_BLOCK = 256




def location_scale(s: np.ndarray, *, parametric: bool, eb: bool, mean_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """gamma_star, delta_star (d,) of one site from its standardised data s (n, d)."""
    n, d = s.shape
    gamma_hat = s.mean(axis=0)
    delta_hat = np.ones(d) if mean_only else s.var(axis=0, ddof=1)
    if eb and not parametric:
        _check_features(d)
        gamma_star, delta_star = _int_eprior(s, gamma_hat, delta_hat)
        return gamma_star, np.ones(d) if mean_only else delta_star
    return _parametric(n, gamma_hat, delta_hat, lambda g: ((s - g) ** 2).sum(axis=0), eb=eb, mean_only=mean_only)


def location_scale_from_moments(n: int, gamma_hat: np.ndarray, m2: np.ndarray, *, eb: bool,
                                mean_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """``location_scale`` (parametric) from the standardised data's moments alone: n cases, their mean gamma_hat
    (d,) and centred sum of squares m2 (d,); Σ (s − g)² = m2 + n (gamma_hat − g)² in each EB iteration."""
    delta_hat = np.ones(len(gamma_hat)) if mean_only else m2 / (n - 1)
    return _parametric(n, gamma_hat, delta_hat, lambda g: m2 + n * (gamma_hat - g) ** 2, eb=eb, mean_only=mean_only)


def _check_features(d: int) -> None:
    if d < 2:
        raise ValueError(f"empirical Bayes pools across features, but only {d} feature(s) can be estimated at "
                         "this site; use eb=False")


def _parametric(n: int, gamma_hat: np.ndarray, delta_hat: np.ndarray, sumsq: Callable[[np.ndarray], np.ndarray], *,
                eb: bool, mean_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Parametric EB from the site's estimates; ``sumsq(g)`` = Σ over its cases of (s − g)² per feature."""
    d = len(gamma_hat)
    if not eb:
        return gamma_hat, delta_hat
    _check_features(d)
    gamma_bar, t2 = gamma_hat.mean(), gamma_hat.var(ddof=1)
    if mean_only:
        # neuroCombat (like R's sva) uses n = 1 and d_star = 1 here.
        return _postmean(gamma_hat, gamma_bar, 1, 1.0, t2), np.ones(d)
    m, s2 = delta_hat.mean(), delta_hat.var(ddof=1)
    if not s2 > 0:
        raise ValueError("the inverse-gamma prior is undefined: the site's feature variances are all equal; "
                         "use eb=False")
    a_prior, b_prior = (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2
    return _it_sol(n, sumsq, gamma_hat, delta_hat, gamma_bar, t2, a_prior, b_prior)


def _postmean(g_hat: np.ndarray, g_bar: float, n: float, d_star: np.ndarray | float, t2: float) -> np.ndarray:
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def _it_sol(n: int, sumsq: Callable[[np.ndarray], np.ndarray], g_hat: np.ndarray, d_hat: np.ndarray, g_bar: float,
            t2: float, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """neuroCombat's it_sol: alternate posterior mean and variance until the relative change < 1e-4."""
    g_old, d_old = g_hat, d_hat
    for _ in range(_IT_SOL_MAX_ITER):
        g_new = _postmean(g_hat, g_bar, n, d_old, t2)
        d_new = (0.5 * sumsq(g_new) + b) / (n / 2.0 + a - 1.0)
        # Same stopping rule as the reference, signed denominator included (it decides the iteration count,
        # and so the last digits of the result).
        with np.errstate(divide="ignore", invalid="ignore"):
            change = max((np.abs(g_new - g_old) / g_old).max(), (np.abs(d_new - d_old) / d_old).max())
        g_old, d_old = g_new, d_new
        if not change > _IT_SOL_CONV:
            return g_new, d_new
    warnings.warn(f"ComBat EB did not converge in {_IT_SOL_MAX_ITER} iterations", RuntimeWarning, stacklevel=3)
    return g_new, d_new


def _int_eprior(s: np.ndarray, g_hat: np.ndarray, d_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """neuroCombat's int_eprior on s (n, d), in log space.

    For feature i, gamma*/delta* are the averages of the other features' (gamma_hat, delta_hat) weighted by the
    likelihood of feature i's data under N(gamma_hat_k, delta_hat_k). The reference multiplies n densities and
    underflows to 0/0; log-sum-exp gives the same weights without it.
    """
    n, d = s.shape
    # Σ_j (s_ij - g_k)² = Σ_j (s_ij - mean_i)² + n (mean_i - g_k)²: O(d²) memory instead of O(n d²).
    ss = ((s - g_hat) ** 2).sum(axis=0)
    log_norm = -0.5 * n * np.log(2 * np.pi * d_hat)
    gamma_star, delta_star = np.empty(d), np.empty(d)
    for start in range(0, d, _EPRIOR_BLOCK):
        rows = np.arange(start, min(start + _EPRIOR_BLOCK, d))
        sum2 = ss[rows, None] + n * (g_hat[rows, None] - g_hat[None, :]) ** 2
        log_lh = log_norm - sum2 / (2 * d_hat)
        log_lh[np.arange(rows.size), rows] = -np.inf  # a feature's own estimate is left out
        w = np.exp(log_lh - log_lh.max(axis=1, keepdims=True))
        total = w.sum(axis=1)
        gamma_star[rows] = w @ g_hat / total
        delta_star[rows] = w @ d_hat / total
    return gamma_star, delta_star
