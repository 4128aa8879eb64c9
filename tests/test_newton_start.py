"""Exact training's start from the cohort's pooled moments and correlation (common.newton_start): the linear
discriminant of the pooled data, and a Newton walk from it ends at the same optimum as from zero."""

import numpy as np

from common import exact, moments, newton_start, selection


def _cohort(seed, shift, sizes=(40, 55, 30)):
    """Sites of standardised-to-be features with a class shift; returns per-site (x, y)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(4, 4))
    out = []
    for n in sizes:
        y = (np.arange(n) % 3 == 0).astype(float)
        x = np.exp(rng.normal(size=(n, 4)) @ mix * 0.4 + np.outer(y, shift))  # skewed, as radiomics are
        out.append((x, y))
    return out


def _pooled(sites):
    """What the coordinator holds: pooled mean and std, class-wise moments, the pooled correlation (from sums)."""
    mean, std = moments.pooled_mean_std(*zip(*(moments.site_moments(x) for x, _ in sites), strict=True))
    classwise = selection.pool_classwise([{c: moments.site_moments(x[y == c]) for c in (0, 1)} for x, y in sites])
    corr = selection.pooled_correlation([selection.site_crossproducts(x, mean, std) for x, _ in sites],
                                        sum(len(x) for x, _ in sites))
    return mean, std, classwise, corr


def _start(sites):
    mean, std, classwise, corr = _pooled(sites)
    (n1, m1, _), (n0, m0, _) = classwise[1], classwise[0]
    return newton_start.discriminant_start((m1 - mean) / std, (m0 - mean) / std, n1, n0, corr, n0 / n1), mean, std


def _fit(sites, mean, std, start):
    z = [((x - mean) / std, y) for x, y in sites]
    pw = sum((1 - y).sum() for _, y in sites) / sum(y.sum() for _, y in sites)
    newton = exact.ExactNewton(4, l2=1.0, tol=1e-10, start=start)
    while not newton.update(exact.sum_terms(exact.site_terms(zk, yk, newton.coef, pw) for zk, yk in z)):
        pass
    return newton


def test_the_start_is_the_pooled_datas_linear_discriminant():
    sites = _cohort(0, np.array([0.8, -0.5, 0.3, 0.0]))
    start, mean, std = _start(sites)
    z = np.vstack([(x - mean) / std for x, _ in sites])
    y = np.concatenate([y for _, y in sites])
    mu1, mu0 = z[y == 1].mean(0), z[y == 0].mean(0)
    within = ((z[y == 1] - mu1).T @ (z[y == 1] - mu1) + (z[y == 0] - mu0).T @ (z[y == 0] - mu0)) / (len(y) - 2)
    w = np.linalg.solve(within, mu1 - mu0)
    assert np.abs(w).max() < newton_start.CAP  # not capped here
    np.testing.assert_allclose(start[1:], w, rtol=1e-9)
    # class weight n0/n1 balances the classes: the intercept puts the boundary halfway between the class means
    np.testing.assert_allclose(start[0], -w @ (mu1 + mu0) / 2, rtol=1e-9, atol=1e-12)


def test_newton_from_the_start_ends_at_the_same_optimum_in_fewer_rounds():
    rounds = []
    for seed, shift in ((1, [0.8, -0.5, 0.3, 0.0]), (2, [0.3, 0.2, -0.4, 0.6]), (3, [2.5, -2.0, 1.5, 2.0])):
        sites = _cohort(seed, np.array(shift))
        start, mean, std = _start(sites)
        assert start is not None and np.abs(start[1:]).max() <= newton_start.CAP  # the last one is capped
        zero, warm = _fit(sites, mean, std, None), _fit(sites, mean, std, start)
        assert zero.converged and warm.converged
        np.testing.assert_allclose(warm.coef, zero.coef, atol=1e-9)
        rounds.append((zero.rounds, warm.rounds))
    assert all(w <= z for z, w in rounds) and sum(w for _, w in rounds) < sum(z for z, _ in rounds), rounds


def test_no_start_from_a_singular_scatter():
    corr = np.ones((2, 2))  # two identical features
    assert newton_start.discriminant_start(np.array([0.5, 0.5]), np.array([-0.5, -0.5]), 10, 10, corr, 1.0) is None
