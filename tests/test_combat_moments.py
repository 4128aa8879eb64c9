"""A site's ComBat and its harmonised moments from its moments alone (common.combat_moments) equal what
common.combat computes from its cases: the fitted parameters (combat.fit_site) and the moments of the harmonised
cases (SiteCombat.apply), on features of very different scales, a feature constant at one site, a feature with
zero pooled variance, and every EB option the derivation is used with."""

from __future__ import annotations

import numpy as np
import pytest

from common import combat, combat_moments, selection


def _sites(seed: int = 3) -> list[np.ndarray]:
    """Three sites, 9 features: scanner shifts and scales, one feature near 1e9, one constant at site 1 only,
    one constant everywhere (zero pooled variance)."""
    rng = np.random.default_rng(seed)
    scale = np.array([1.0, 5.0, 0.01, 2.0, 1e9, 3.0, 0.5, 7.0, 1.0])
    out = []
    for i, n in enumerate((14, 9, 21)):
        y = rng.normal(loc=10.0 + i, scale=1.0 + 0.4 * i, size=(n, 9)) * scale + 2.0 * i * scale
        y[:, 8] = 4.25  # the same value at every case of every site
        if i == 1:
            y[:, 5] = 6.5  # constant here, varying elsewhere
        out.append(y)
    return out


def _moments(y: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    mean = y.mean(axis=0)
    return len(y), mean, ((y - mean) ** 2).sum(axis=0)


@pytest.mark.parametrize("options", [{"eb": True, "mean_only": False}, {"eb": False, "mean_only": False},
                                     {"eb": True, "mean_only": True}])
def test_fit_and_harmonised_moments_from_sums_equal_the_cases(options):
    sites = _sites()
    _, params = combat.federated_combat(sites, **options)
    means = combat.pool_moments([combat.site_moments(y, i, 3) for i, y in enumerate(sites)])
    pooled = combat.pool_residuals(means, [combat.site_residuals(y, means, i) for i, y in enumerate(sites)])
    assert pooled.zero_variance[8] and not pooled.zero_variance[5]
    for y, kept in zip(sites, params, strict=True):
        n, mean, m2 = _moments(y)
        fit = combat_moments.fit_from_sums(n, mean, m2, pooled.grand_mean, pooled.var_pooled, pooled.zero_variance,
                                           **options)
        np.testing.assert_array_equal(fit.unadjusted, kept.unadjusted)
        np.testing.assert_allclose(fit.gamma_star, kept.gamma_star, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fit.delta_star, kept.delta_star, rtol=1e-10)

        # the harmonised cases' moments, overall and over a subset (a class), from the raw ones
        harmonised = kept.apply(y)
        for rows in (slice(None), slice(0, 5)):
            want_mean, want_m2 = _moments(harmonised[rows])[1:]
            got_mean, got_m2 = combat_moments.harmonise(fit, *_moments(y[rows])[1:])
            np.testing.assert_allclose(got_mean, want_mean, rtol=1e-12)
            np.testing.assert_allclose(got_m2, want_m2, rtol=1e-9, atol=1e-9 * want_m2.max())
    # site 1's constant feature is left alone there, and harmonised at the others
    assert params[1].unadjusted[5] and not params[0].unadjusted[5]


def test_a_site_of_one_case_is_refused():
    y = _sites()[0]
    with pytest.raises(ValueError, match="at least 2 cases"):
        combat_moments.fit_from_sums(1, y[0], np.zeros(9), y.mean(axis=0), np.ones(9), np.zeros(9, dtype=bool))


def test_correlation_replies_follow_from_the_cross_products_before_combat():
    """What a site sends for a correlation query (Σ z zᵀ of its harmonised cases standardised with pooled values)
    under any cohort's ComBat, from its count, raw means and centred cross-products before ComBat and its ComBat's
    affine map (server.derived_moments): for a cohort of every site and one without site 2, a feature constant at
    site 1 (unadjusted there) and one near 1e9 among the candidates."""
    sites = _sites()
    cols = [0, 1, 2, 3, 4, 5, 7]  # candidates: every feature that varies in the pooled data
    spread = np.concatenate(sites)[:, cols].std(axis=0)
    rng = np.random.default_rng(8)
    for cohort in (sites, sites[:2]):
        pooled = combat.pool_residuals(*_pooled(cohort))
        for y in (sites[0], sites[1]):  # site 1 last: its fit is checked below
            n, mean, m2 = _moments(y)
            fit = combat_moments.fit_from_sums(n, mean, m2, pooled.grand_mean, pooled.var_pooled, pooled.zero_variance)
            a, b = (v[cols] for v in combat_moments.affine(fit))
            harmonised = combat.fit_site(y, pooled).apply(y)[:, cols]
            np.testing.assert_allclose(y[:, cols] * a + b, harmonised, rtol=1e-12)
            mean_p = harmonised.mean(axis=0) + spread * rng.normal(size=len(cols))  # any pooled mean and std
            std_p = spread * rng.uniform(0.5, 2.0, size=len(cols))
            want = selection.site_crossproducts(harmonised, mean_p, std_p)
            centred = y[:, cols] - mean[cols]
            got = combat_moments.crossproducts(centred.T @ centred, n, mean[cols], a, b, mean_p, std_p)
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
        # site 1's constant feature (index 5 of the candidates) is left alone there: the identity map
        assert fit.unadjusted[5] and (a[5], b[5]) == (1.0, 0.0)


def _pooled(sites: list[np.ndarray]) -> tuple[combat.PooledMeans, list[combat.SiteResiduals]]:
    means = combat.pool_moments([combat.site_moments(y, i, len(sites)) for i, y in enumerate(sites)])
    return means, [combat.site_residuals(y, means, i) for i, y in enumerate(sites)]
