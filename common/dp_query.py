"""Differential privacy for the query phases' sums: clip each case's contribution, add Gaussian noise, account.

Pure numpy, no Flower. Wired by the site's handlers (client/app.py, client/compute.py) when the run config sets
``dp-query-noise-multiplier`` (z) > 0, with the clip bound ``dp-query-clip`` (c, in standardised units).

Every per-case contribution is bounded before it is summed, in units the **server** fixed before the release
and sent in the message (a reference the server already holds is known to the attacker anyway, so using it does
not weaken the guarantee; what the reference itself reveals is the business of the phase that produced it):

* ``query.moments``: u = clip((x - loc) / scale, -c, c) per agreed feature, loc/scale from ComBat's pooled grand
  mean and variance. Per class: count, Σu, Σu². A case lies in one class, so adding or removing it changes one
  class's three sums, by at most 1, c√d and c²√d (L2).
* ``query.correlation``: Σ z zᵀ over z = clip((x - pooled mean) / pooled std, -c, c) of the m candidates;
  Frobenius sensitivity c²·m.
* ``query.newton``: the gradient and Hessian of the class-weighted log-likelihood at the server's coefficients,
  over z clipped to [-c, c]. Per case: gradient w·(p - y)·[1, z], L2 ≤ w·√(1 + c²·s); Hessian w·p(1-p)·[1, z][1, z]ᵀ,
  Frobenius ≤ w·(1 + c²·s)/4, with w = max(pos-weight, 1) (the server's, in the message). The summed loss is
  not bounded and is not sent.

Each sum gets noise of std z × its own sensitivity, so each is a Gaussian mechanism of zCDP cost 1/(2z²) for one
case added or removed (Bun & Steinke 2016); one release costs ``MECHANISMS[type]`` of them. For one case
*changed* (the unit the site's budget ledger books, as for model updates) the cost is at most 4× that (a change
is a removal and an addition: group privacy of zCDP for 2 cases multiplies ρ by 2²).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.dp import compose, zcdp_to_epsilon, zcdp_to_epsilon_cks
from common.protocol import CORRELATION, MOMENTS, NEWTON

NOISE_KEY = "dp-query-noise-multiplier"
CLIP_KEY = "dp-query-clip"

# Gaussian mechanisms one case takes part in, per release (each at std z x its sensitivity: rho = 1/(2z^2) each)
MECHANISMS: dict[str, int] = {MOMENTS: 3, CORRELATION: 1, NEWTON: 2}
CHANGE_FACTOR = 4.0  # one case changed vs. added or removed (group privacy of zCDP, k = 2: rho x k^2)
CLASSES = (("hgg", 1), ("bm", 0))


def rho_per_release(message_type: str, noise_multiplier: float, changed: bool = False) -> float:
    """zCDP cost of one noised release of ``message_type``: MECHANISMS / (2z²) (× 4 for one case changed)."""
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise ValueError(f"{NOISE_KEY} = {noise_multiplier}: a noised release needs a positive multiplier")
    rho = MECHANISMS[message_type] / (2.0 * noise_multiplier ** 2)
    return CHANGE_FACTOR * rho if changed else rho


# ---------------------------------------------------------------------------------------------------
# Site side: clip, sum, noise


def reference(grand_mean: np.ndarray, var_pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(loc, scale) per feature from ComBat's pooled estimates; a zero or bad variance gets scale 1."""
    loc = np.asarray(grand_mean, dtype=np.float64)
    var = np.asarray(var_pooled, dtype=np.float64)
    ok = np.isfinite(var) & (var > 0)
    return loc, np.where(ok, np.sqrt(np.where(ok, var, 1.0)), 1.0)


def clip_standardised(x: np.ndarray, loc: np.ndarray, scale: np.ndarray, clip: float) -> np.ndarray:
    """clip((x - loc) / scale, -c, c): every entry of a case bounded, whatever its raw value."""
    if not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"{CLIP_KEY} = {clip}: it must be a positive number")
    u = (np.asarray(x, dtype=np.float64) - loc) / scale
    if not np.all(np.isfinite(u)):
        raise ValueError("features must be finite before clipping")
    return np.clip(u, -clip, clip)


def moment_sums(u: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Exact per-class sums of clipped u (n, d): {"n-hgg": (), "sum-hgg": (d,), "sumsq-hgg": (d,), ... bm}."""
    out: dict[str, np.ndarray] = {}
    for tag, label in CLASSES:
        rows = u[np.asarray(y) == label]
        out[f"n-{tag}"] = np.array(float(len(rows)))
        out[f"sum-{tag}"], out[f"sumsq-{tag}"] = rows.sum(axis=0), (rows ** 2).sum(axis=0)
    return out


def moment_sensitivities(clip: float, d: int) -> dict[str, float]:
    """L2 sensitivity of each of a class's sums to one case added or removed."""
    return {"n": 1.0, "sum": clip * math.sqrt(d), "sumsq": clip ** 2 * math.sqrt(d)}


def crossproducts(z: np.ndarray) -> np.ndarray:
    """Σ z zᵀ (m, m) over clipped z (n, m)."""
    z = np.asarray(z, dtype=np.float64)
    return z.T @ z


def crossproduct_sensitivity(clip: float, m: int) -> float:
    """Frobenius sensitivity of Σ z zᵀ: one case's z zᵀ has Frobenius norm |z|² ≤ c²·m."""
    return clip ** 2 * m


def newton_sensitivities(clip: float, s: int, pos_weight: float) -> tuple[float, float]:
    """(gradient L2, Hessian Frobenius) sensitivity of one case over [1, z], z clipped to [-c, c]^s."""
    w = max(float(pos_weight), 1.0)
    norm2 = 1.0 + clip ** 2 * s
    return w * math.sqrt(norm2), w * norm2 / 4.0


def symmetric_noise(m: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """An (m, m) symmetric matrix with independent N(0, σ²) on and above the diagonal, mirrored below: the noise
    of a Gaussian mechanism on the upper triangle (whose Frobenius norm is at most the full matrix's)."""
    upper = np.triu(rng.normal(0.0, sigma, size=(m, m)))
    return upper + np.triu(upper, 1).T


def noised(value: np.ndarray, sensitivity: float, noise_multiplier: float, rng: np.random.Generator,
           symmetric: bool = False) -> np.ndarray:
    """value + N(0, (z·Δ)²) per entry (symmetric noise for a symmetric matrix)."""
    value = np.asarray(value, dtype=np.float64)
    sigma = noise_multiplier * sensitivity
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"noise std {sigma}: a noised release needs positive noise")
    if symmetric:
        return value + symmetric_noise(value.shape[0], sigma, rng)
    return value + rng.normal(0.0, sigma, size=value.shape)


def private_moments(u: np.ndarray, y: np.ndarray, noise_multiplier: float, clip: float,
                    rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The noised moments reply: arrays {sum-hgg, sumsq-hgg, sum-bm, sumsq-bm} and metrics {n-hgg-noised, ...}."""
    sums = moment_sums(u, y)
    delta = moment_sensitivities(clip, u.shape[1])
    arrays, metrics = {}, {}
    for tag, _ in CLASSES:
        metrics[f"n-{tag}-noised"] = float(noised(sums[f"n-{tag}"], delta["n"], noise_multiplier, rng))
        for kind in ("sum", "sumsq"):
            arrays[f"{kind}-{tag}"] = noised(sums[f"{kind}-{tag}"], delta[kind], noise_multiplier, rng)
    return arrays, metrics


def private_crossproducts(z: np.ndarray, noise_multiplier: float, clip: float,
                          rng: np.random.Generator) -> np.ndarray:
    return noised(crossproducts(z), crossproduct_sensitivity(clip, z.shape[1]), noise_multiplier, rng,
                  symmetric=True)


def private_newton(grad: np.ndarray, hess: np.ndarray, s: int, pos_weight: float, noise_multiplier: float,
                   clip: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The noised gradient and Hessian of terms computed over clipped z (``common.exact.site_terms``)."""
    d_grad, d_hess = newton_sensitivities(clip, s, pos_weight)
    return (noised(grad, d_grad, noise_multiplier, rng),
            noised((hess + hess.T) / 2.0, d_hess, noise_multiplier, rng, symmetric=True))


# ---------------------------------------------------------------------------------------------------
# Server side: turn the noised sums back into what the next phase needs (post-processing: costs nothing)


@dataclass(frozen=True)
class NoisedMoments:
    """Pooled over sites, in the data's units: n, mean (d,), std (d,), classwise {label: (n, mean, m2)}."""

    n: int
    mean: np.ndarray
    std: np.ndarray
    classwise: dict[int, tuple[int, np.ndarray, np.ndarray]]


def pool_noised_moments(sites: Sequence[Mapping[str, np.ndarray | float]], loc: np.ndarray, scale: np.ndarray,
                        zero_variance: np.ndarray, min_count: int) -> NoisedMoments:
    """The sites' noised class sums, summed, back to means and centred sums of squares.

    Counts are floored at ``min_count`` (each site's true class count is at least k, which is public), variances
    of u at ``VAR_FLOOR`` (a noisy Σu² − (Σu)²/n can be negative, and a near-zero one would blow up Welch's t);
    features ComBat found to have zero pooled variance
    keep std 0 (they are constant, whatever the noise says).
    """
    pooled: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
    s1_all = s2_all = None
    n_all = 0.0
    for tag, label in CLASSES:
        n = max(sum(float(s[f"n-{tag}-noised"]) for s in sites), float(min_count))  # type: ignore[arg-type]
        s1 = np.sum([np.asarray(s[f"sum-{tag}"], dtype=np.float64) for s in sites], axis=0)
        s2 = np.sum([np.asarray(s[f"sumsq-{tag}"], dtype=np.float64) for s in sites], axis=0)
        mean_u, m2_u = _mean_m2(n, s1, s2)
        pooled[label] = (int(round(n)), loc + scale * mean_u, scale ** 2 * m2_u)
        s1_all = s1 if s1_all is None else s1_all + s1
        s2_all = s2 if s2_all is None else s2_all + s2
        n_all += n
    mean_u, m2_u = _mean_m2(n_all, s1_all, s2_all)  # type: ignore[arg-type]
    std = scale * np.sqrt(m2_u / max(n_all - 1.0, 1.0))
    std = np.where(np.asarray(zero_variance, dtype=bool), 0.0, std)
    return NoisedMoments(int(round(n_all)), loc + scale * mean_u, std, pooled)


VAR_FLOOR = 0.01  # variance of u below which a noised estimate is not believed: u's reference scale is the pooled sd


def _mean_m2(n: float, s1: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = s1 / n
    return mean, np.maximum(s2 - s1 * mean, VAR_FLOOR * max(n - 1.0, 1.0))


def noised_correlation(crossproducts_per_site: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Correlation from noised Σ z zᵀ and the case count of the noised moments (an earlier release: reusing it
    costs nothing): Σ z zᵀ / (n - 1), clipped to [-1, 1], with 1 on the diagonal. The count, not the noised
    diagonal, divides: a noised diagonal can come out near zero."""
    total = np.sum([np.asarray(c, dtype=np.float64) for c in crossproducts_per_site], axis=0)
    corr = (total + total.T) / (2.0 * max(n - 1, 1))
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)


def psd(hess: np.ndarray) -> np.ndarray:
    """The nearest positive semi-definite matrix (eigenvalues floored at 0): a noised Hessian can be indefinite."""
    values, vectors = np.linalg.eigh((hess + hess.T) / 2.0)
    return (vectors * np.maximum(values, 0.0)) @ vectors.T


# ---------------------------------------------------------------------------------------------------
# Accounting (the server's view of one run; each site keeps its own ledger across runs, client/dp.py)


@dataclass
class QueryAccount:
    """Noised query releases per site and phase in one run, and their zCDP cost, for the audit log."""

    noise_multiplier: float
    clip: float
    delta: float
    releases: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, message_type: str, sites: Iterable[str]) -> None:
        for site in sites:
            per_site = self.releases.setdefault(site, {})
            per_site[message_type] = per_site.get(message_type, 0) + 1

    def rho(self, site: str, changed: bool = False) -> float:
        return compose(rho_per_release(t, self.noise_multiplier, changed) * n
                       for t, n in self.releases.get(site, {}).items())

    def to_dict(self) -> dict[str, object]:
        per_site = {}
        for site in sorted(self.releases):
            rho, rho_changed = self.rho(site), self.rho(site, changed=True)
            per_site[site] = {"releases": dict(sorted(self.releases[site].items())), "rho": rho,
                              "epsilon": zcdp_to_epsilon(rho, self.delta),
                              "epsilon_cks": zcdp_to_epsilon_cks(rho, self.delta),
                              "rho_any_change": rho_changed,
                              "epsilon_any_change": zcdp_to_epsilon(rho_changed, self.delta)}
        worst = max(per_site.values(), key=lambda v: v["rho"], default=None)  # type: ignore[arg-type,return-value]
        return {
            "mechanism": "gaussian: each site clips every case's contribution (standardised with the server's "
                         "reference, clipped to [-c, c]) and adds noise of std z x sensitivity before it leaves",
            "unit": "one case added or removed; *_any_change: one case changed",
            "covers": sorted(MECHANISMS),
            "not_covered": "plan and feature lists, ComBat sums (combat_fit, combat_residuals), counts of "
                           "combat_join, evaluate, out_of_fold and recalibrate replies, FedAvg updates unless "
                           "dp-noise-multiplier > 0",
            "withheld": ["query.histograms"],
            "noise_multiplier": self.noise_multiplier, "clip": self.clip, "delta": self.delta,
            "rho_per_release": {t: rho_per_release(t, self.noise_multiplier) for t in sorted(MECHANISMS)},
            "epsilon": worst["epsilon"] if worst else 0.0,  # type: ignore[index]
            "epsilon_any_change": worst["epsilon_any_change"] if worst else 0.0,  # type: ignore[index]
            "per_site": per_site,
        }
