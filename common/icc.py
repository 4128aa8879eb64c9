"""Feature robustness as an intraclass correlation, from sums each site computes over its own cases.

The form is ICC(1,1) (one-way random effects, single measurement; Shrout & Fleiss 1979, the form Zwanenburg
et al. 2019 use for perturbation robustness): each case is measured m times (its original image and m - 1
perturbations of it, the "raters", exchangeable), and

    ICC = (MSB - MSW) / (MSB + (m - 1) MSW).

Sites differ in scanner and protocol, and a site's own mean shift would count as "between-case" variance and
make every feature look robust. So each site centres its values on its own mean (the feature's mean over all its
cases and measurements), and the between-case mean square has N - S degrees of freedom (N cases, S sites): the
one-way ANOVA of cases nested in sites, with site as a fixed effect. Each site sends, per feature, n and

    SSB_s = m sum_i (mean_i - mean_s)^2       SSW_s = sum_i sum_j (x_ij - mean_i)^2

(centred sums of squares over its whole training split, like the moments phase's m2); the server adds them.
``pooled_icc`` computes the same from all cases in one place (the reference the tests compare with).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IccSums:
    """One site's ANOVA sums per feature: n cases, between-case (ssb) and within-case (ssw) sums of squares."""

    n: int
    ssb: np.ndarray
    ssw: np.ndarray


def site_icc_sums(x: np.ndarray) -> IccSums:
    """x (n, m, d): n cases, m measurements each (the original first), d features -> the site's sums (d,)."""
    if x.ndim != 3 or x.shape[1] < 2:
        raise ValueError(f"robustness sums need (cases, measurements >= 2, features) values, got shape {x.shape}")
    case_means = x.mean(axis=1)
    ssb = x.shape[1] * np.sum((case_means - case_means.mean(axis=0)) ** 2, axis=0)
    ssw = np.sum((x - case_means[:, None, :]) ** 2, axis=(0, 1))
    return IccSums(int(x.shape[0]), ssb, ssw)


def icc_from_sums(sums: Sequence[IccSums], m: int) -> np.ndarray:
    """ICC(1,1) per feature (d,) over every site's cases, each site centred on its own mean; NaN where the
    feature does not vary at all (no variance to apportion)."""
    n_total, n_sites = sum(s.n for s in sums), len(sums)
    if m < 2 or n_total - n_sites < 1:
        raise ValueError(f"ICC needs m >= 2 measurements and more cases than sites (got m = {m}, "
                         f"{n_total} cases at {n_sites} sites)")
    msb = sum(s.ssb for s in sums) / (n_total - n_sites)
    msw = sum(s.ssw for s in sums) / (n_total * (m - 1))
    denominator = msb + (m - 1) * msw
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (msb - msw) / np.where(denominator > 0, denominator, 1.0), np.nan)


def pooled_icc(x: np.ndarray, site: np.ndarray) -> np.ndarray:
    """The same ICC computed in one place from every case: x (N, m, d), site (N,) labels.

    Written from the nested ANOVA directly (residuals from site means and from case means over the whole
    matrix), not from per-site sums, so the tests can hold the federated value against it."""
    site = np.asarray(site)
    n_total, m = x.shape[0], x.shape[1]
    levels = np.unique(site)
    site_mean = np.empty((n_total, x.shape[2]))
    for level in levels:
        site_mean[site == level] = x[site == level].reshape(-1, x.shape[2]).mean(axis=0)
    case_mean = x.mean(axis=1)
    msb = m * np.sum((case_mean - site_mean) ** 2, axis=0) / (n_total - len(levels))
    msw = np.sum((x - case_mean[:, None, :]) ** 2, axis=(0, 1)) / (n_total * (m - 1))
    denominator = msb + (m - 1) * msw
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (msb - msw) / np.where(denominator > 0, denominator, 1.0), np.nan)


def quantiles(values: np.ndarray, qs: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> list[float]:
    """Quantiles of the finite values (NaN when there are none), for the report's table."""
    finite = values[np.isfinite(values)]
    return [float(np.quantile(finite, q)) if finite.size else float("nan") for q in qs]
