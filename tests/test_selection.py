"""Federated selection statistics equal the same statistics on pooled data."""

import numpy as np
import pytest
from scipy import stats

from common import moments, selection


def _sites(seed=0, sizes=(9, 23, 15, 40), d=12):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        y = np.arange(n) % 2
        x = rng.normal(0, 1, (n, d)) * (1 + i) + y[:, None] * np.linspace(0, 2, d) + 1e4 * (i == 2)
        x[:, 5] = x[:, 4] * 0.98 + rng.normal(0, 0.05, n)  # near-duplicate of feature 4
        out.append((x, y))
    return out


def test_welch_t_from_classwise_aggregates_equals_scipy_on_pooled_data():
    sites = _sites()
    classwise = [{c: moments.site_moments(x[y == c]) for c in (0, 1)} for x, y in sites]
    pooled = selection.pool_classwise(classwise)
    t = selection.welch_t(pooled[1], pooled[0])
    x = np.vstack([x for x, _ in sites])
    y = np.concatenate([y for _, y in sites])
    reference = stats.ttest_ind(x[y == 1], x[y == 0], equal_var=False).statistic
    np.testing.assert_allclose(t, reference, rtol=1e-10, atol=1e-12)


def test_pooled_correlation_from_crossproducts_equals_numpy():
    sites = _sites(1)
    xs = [x for x, _ in sites]
    mean, std = moments.pooled_mean_std(*zip(*(moments.site_moments(x) for x in xs), strict=True))
    corr = selection.pooled_correlation([selection.site_crossproducts(x, mean, std) for x in xs],
                                        sum(len(x) for x in xs))
    np.testing.assert_allclose(corr, np.corrcoef(np.vstack(xs), rowvar=False), atol=1e-10)
    assert corr.shape == (12, 12)  # whatever the number of cases


def test_greedy_decorrelation_keeps_the_better_of_a_correlated_pair():
    corr = np.eye(4)
    corr[0, 1] = corr[1, 0] = 0.95
    assert selection.greedy_decorrelate([1, 0, 2, 3], corr, 0.9, 10) == [1, 2, 3]
    assert selection.greedy_decorrelate([1, 0, 2, 3], corr, 0.96, 2) == [1, 0]


def test_constant_features_and_degenerate_classes():
    assert selection.near_constant(np.array([0.0, 1e-12, 1.0]), np.array([5.0, 1e6, 1.0])).tolist() == [
        True, True, False]
    flat = (5, np.zeros(3), np.zeros(3))
    assert selection.welch_t(flat, flat).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="two cases per class"):
        selection.welch_t((1, np.zeros(3), np.zeros(3)), flat)
