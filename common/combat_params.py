"""The distributed-ComBat protocol's messages and a site's fitted parameters, with their checks.

The dataclasses that travel (or are kept) between the steps of ``common.combat``: a site's design cross-products
(:class:`SiteMoments`), the pooled fit sent back (:class:`PooledMeans`), a site's residual sums
(:class:`SiteResiduals`), the pooled estimates (:class:`PooledEstimates`, also what a late joiner is harmonised
against) and the parameters a site keeps (:class:`SiteCombat`, which harmonises its cases). Arrays are
samples x features, as in ``common.combat``; ``common.combat`` re-exports every name, so callers use
``combat.SiteCombat`` and so on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class SiteMoments:
    """Round 1, site -> server: design cross-products over the site's n cases, its block of them.

    Attributes:
        site: the sender's site index in [0, n_sites).
        n_sites: S, as the server announced it.
        n: the site's number of cases.
        xtx: XᵀX restricted to the site's own indicator column and the p covariate columns, (1 + p, 1 + p); the
            rest of its (S + p, S + p) XᵀX is structurally zero (``common.combat.site_moments``).
        xty: XᵀY on the same rows, (1 + p, d).
    """

    site: int
    n_sites: int
    n: int
    xtx: np.ndarray
    xty: np.ndarray


@dataclass(frozen=True, eq=False)
class PooledMeans:
    """Server -> sites after round 1: the pooled least-squares fit.

    Attributes:
        n_sites: S.
        n: total cases over all sites.
        beta: B_hat = (ΣXᵀX)⁻¹ ΣXᵀY, (q, d); rows 0..S-1 are site intercepts, rows S.. covariate effects.
        grand_mean: Σ_i (n_i / n) B_hat[i], (d,) (neuroCombat weights the sites by their sizes).
        fitted_ms: mean over all cases of (X B_hat)², (d,); the server uses it to recognise zero pooled variance
            relative to a feature's magnitude (computed from ΣXᵀX and B_hat, no new data).
    """

    n_sites: int
    n: int
    beta: np.ndarray
    grand_mean: np.ndarray
    fitted_ms: np.ndarray


@dataclass(frozen=True, eq=False)
class SiteResiduals:
    """Round 2, site -> server.

    Attributes:
        site: the sender's site index.
        n: the site's number of cases.
        ss: per-feature Σ_j (Y_j - X_j B_hat)² over the site's cases, (d,).
    """

    site: int
    n: int
    ss: np.ndarray


@dataclass(frozen=True, eq=False)
class PooledEstimates:
    """Server -> sites after round 2; also what a late-joining site is harmonised against.

    Attributes:
        n_sites: S.
        n: total cases over all sites.
        beta: B_hat, (q, d).
        grand_mean: (d,).
        var_pooled: Σ_i ss_i / n (ddof 0, as neuroCombat), (d,).
        zero_variance: (d,) bool, features whose pooled residual variance is zero (to rounding); every site
            leaves them unadjusted.
    """

    n_sites: int
    n: int
    beta: np.ndarray
    grand_mean: np.ndarray
    var_pooled: np.ndarray
    zero_variance: np.ndarray

    @property
    def beta_cov(self) -> np.ndarray:
        """Covariate effects B_hat[S:], (p, d)."""
        return self.beta[self.n_sites:]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of plain lists and numbers."""
        return {"n_sites": self.n_sites, "n": self.n, "beta": self.beta.tolist(),
                "grand_mean": self.grand_mean.tolist(), "var_pooled": self.var_pooled.tolist(),
                "zero_variance": self.zero_variance.tolist()}

    @classmethod
    def for_joiner(cls, n_sites: int, n: int, grand_mean: Any, var_pooled: Any, beta_cov: Any,
                   zero_variance: Any) -> PooledEstimates:
        """What a site outside the pooled fit is harmonised against: no site's intercept row (zeros), only the
        grand mean, pooled variance and covariate effects beta_cov (p, d)."""
        grand_mean = as_vector(grand_mean, "grand_mean")
        d = grand_mean.shape[0]
        beta_cov = np.asarray(beta_cov, dtype=np.float64).reshape(-1, d)
        return cls(n_sites=int(n_sites), n=int(n), beta=np.vstack([np.zeros((int(n_sites), d)), beta_cov]),
                   grand_mean=grand_mean, var_pooled=as_vector(var_pooled, "var_pooled", d),
                   zero_variance=as_vector(zero_variance, "zero_variance", d) > 0.5)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PooledEstimates:
        grand_mean = as_vector(data["grand_mean"], "grand_mean")
        d = grand_mean.shape[0]
        return cls(n_sites=int(data["n_sites"]), n=int(data["n"]),
                   beta=np.asarray(data["beta"], dtype=np.float64).reshape(-1, d), grand_mean=grand_mean,
                   var_pooled=as_vector(data["var_pooled"], "var_pooled", d),
                   zero_variance=as_vector(data["zero_variance"], "zero_variance", d, dtype=bool))


@dataclass(frozen=True, eq=False)
class SiteCombat:
    """One site's ComBat parameters, kept at the site; harmonises its training cases and any later ones.

    Attributes:
        site: the site index (None for a site that joined after the pooled fit).
        n: cases the site's gamma/delta were estimated from.
        parametric, eb, mean_only: the options the parameters were fitted with.
        grand_mean: (d,).
        beta_cov: covariate effects B_hat[S:], (p, d).
        var_pooled: (d,).
        gamma_star: the site's additive batch effect on the standardised scale, (d,).
        delta_star: the site's multiplicative batch effect (a variance ratio), (d,).
        unadjusted: (d,) bool, features passed through unchanged at this site (zero pooled variance or constant
            at the site); their gamma_star is 0 and delta_star 1.
    """

    site: int | None
    n: int
    parametric: bool
    eb: bool
    mean_only: bool
    grand_mean: np.ndarray
    beta_cov: np.ndarray
    var_pooled: np.ndarray
    gamma_star: np.ndarray
    delta_star: np.ndarray
    unadjusted: np.ndarray

    def apply(self, y: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        """Harmonise cases of this site: y (n, d), covariates (n, p) -> (n, d).

        adjusted = (s - gamma_star) / sqrt(delta_star) * sqrt(var_pooled) + stand_mean, with
        s = (y - stand_mean) / sqrt(var_pooled); features in ``unadjusted`` are returned as given.
        """
        y = as_data(y, self.grand_mean.shape[0], min_cases=0)
        stand_mean = self.grand_mean + as_covariates(covariates, y.shape[0], self.beta_cov.shape[0]) @ self.beta_cov
        sd = np.sqrt(safe_var(self.var_pooled, self.unadjusted))
        s = (y - stand_mean) / sd
        adjusted = (s - self.gamma_star) / np.sqrt(self.delta_star) * sd + stand_mean
        return np.where(self.unadjusted, y, adjusted)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of plain lists and numbers (float64 survives a JSON round trip exactly)."""
        return {"site": self.site, "n": self.n, "parametric": self.parametric, "eb": self.eb,
                "mean_only": self.mean_only, "grand_mean": self.grand_mean.tolist(),
                "beta_cov": self.beta_cov.tolist(), "var_pooled": self.var_pooled.tolist(),
                "gamma_star": self.gamma_star.tolist(), "delta_star": self.delta_star.tolist(),
                "unadjusted": self.unadjusted.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteCombat:
        grand_mean = as_vector(data["grand_mean"], "grand_mean")
        d = grand_mean.shape[0]
        return cls(site=None if data["site"] is None else int(data["site"]), n=int(data["n"]),
                   parametric=bool(data["parametric"]), eb=bool(data["eb"]), mean_only=bool(data["mean_only"]),
                   grand_mean=grand_mean,
                   beta_cov=np.asarray(data["beta_cov"], dtype=np.float64).reshape(-1, d),
                   var_pooled=as_vector(data["var_pooled"], "var_pooled", d),
                   gamma_star=as_vector(data["gamma_star"], "gamma_star", d),
                   delta_star=as_vector(data["delta_star"], "delta_star", d),
                   unadjusted=as_vector(data["unadjusted"], "unadjusted", d, dtype=bool))


# ----------------------------------------------------------------------------------------------------------
# Input checks every ComBat step shares: each raises ValueError naming what is wrong
# ----------------------------------------------------------------------------------------------------------


def as_data(y: np.ndarray, d: int | None = None, min_cases: int = 2, who: str = "a site") -> np.ndarray:
    """A site's data as (n, d) float64: finite, ``d`` features when given, at least ``min_cases`` cases."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"data must be (cases, features), got shape {y.shape}")
    if d is not None and y.shape[1] != d:
        raise ValueError(f"data has {y.shape[1]} features, the pooled fit {d}")
    if y.shape[0] < min_cases:
        raise ValueError(f"{who} has {y.shape[0]} case(s), fewer than {min_cases} cases; ComBat needs at least "
                         f"{min_cases} per site to estimate the site's variance")
    if not np.isfinite(y).all():
        raise ValueError("data contain NaN or inf; ComBat needs complete, finite features")
    return y


def as_covariates(c: np.ndarray | None, n: int, p: int | None = None) -> np.ndarray:
    """Covariates as (n, p) float64, finite (None -> (n, 0)); ``p`` columns when given."""
    c = np.zeros((n, 0)) if c is None else np.asarray(c, dtype=np.float64)
    if c.ndim == 1:
        c = c.reshape(-1, 1)
    if c.ndim != 2 or c.shape[0] != n:
        raise ValueError(f"covariates must be ({n}, p), got shape {c.shape}")
    if p is not None and c.shape[1] != p:
        raise ValueError(f"{c.shape[1]} covariate column(s) given, the pooled fit has {p}")
    if not np.isfinite(c).all():
        raise ValueError("covariates contain NaN or inf")
    return c


def safe_var(var_pooled: np.ndarray, unadjusted: np.ndarray) -> np.ndarray:
    # Unadjusted features are overwritten later; 1 keeps their arithmetic finite.
    return np.where(unadjusted, 1.0, var_pooled)


def as_vector(values: Any, name: str, d: int | None = None, dtype: type = np.float64) -> np.ndarray:
    """``values`` as a 1-D array of ``dtype`` (of length ``d`` when given)."""
    v = np.asarray(values, dtype=dtype)
    if v.ndim != 1 or (d is not None and v.shape[0] != d):
        raise ValueError(f"{name} must be a list of {d if d is not None else 'd'} values, got shape {v.shape}")
    return v
