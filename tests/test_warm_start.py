"""Warm-started exact training (issue 20, ``loso-warm-start``): a leave-one-site-out fold's Newton rounds start from
the main run's model re-expressed in the fold's standardisation; the fit stops at the same optimum as from zero, in
fewer rounds."""

import numpy as np
import pytest

from common import exact, moments

L2 = 1.0


def _raw_sites(seed: int, sizes=(40, 55, 35, 60), d: int = 4):
    """Sites with shifted feature distributions and a logistic signal: (x, y) per site, raw features."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(0.0, 1.0, d)
    out = []
    for k, n in enumerate(sizes):
        x = rng.normal(0.0, 1.0, (n, d)) * (1.0 + 0.2 * k) + 0.4 * k + 5.0 * np.arange(d)
        signal = ((x - 5.0 * np.arange(d)) / (1.0 + 0.2 * k)) @ beta
        out.append((x, (rng.random(n) < 1.0 / (1.0 + np.exp(-signal))).astype(float)))
    return out


def _fit(raw, start_from=None):
    """The exact fit on ``raw`` sites standardised with their pooled moments, from zero or from ``start_from``
    (coef, mean, scale of another fit on the same inputs): (coef, mean, scale, rounds)."""
    mean, scale = moments.pooled_mean_std(*zip(*(moments.site_moments(x) for x, _ in raw), strict=True))
    names = [f"f{j}" for j in range(len(mean))]
    start = None if start_from is None else exact.restandardise(start_from[0], names, start_from[1], start_from[2],
                                                                names, mean, scale)
    newton = exact.ExactNewton(len(mean), l2=L2, tol=1e-10, start=start)
    while not newton.done:
        total = exact.sum_terms(exact.site_terms((x - mean) / scale, y, newton.coef, 1.0) for x, y in raw)
        newton.update(total)
    assert newton.converged
    return newton.coef, mean, scale, newton.rounds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_fold_from_the_main_model_reaches_the_cold_optimum_in_fewer_rounds(seed):
    raw = _raw_sites(seed)
    main = _fit(raw)[:3]
    saved = 0
    for held in range(len(raw)):
        fold = [s for k, s in enumerate(raw) if k != held]
        cold, warm = _fit(fold), _fit(fold, start_from=main)
        np.testing.assert_allclose(warm[0], cold[0], rtol=0, atol=1e-8)  # same optimum, to the fit's tolerance
        assert warm[3] <= cold[3]
        saved += cold[3] - warm[3]
    assert saved >= len(raw)  # at least one round per fold


def test_restandardise_keeps_the_logit_of_every_case_on_the_shared_inputs():
    rng = np.random.default_rng(7)
    x = rng.normal(3.0, 2.0, (30, 3))
    coef, mean, scale = np.array([0.3, 1.5, -0.7, 0.2]), np.array([3.1, 2.9, 3.3]), np.array([2.0, 1.7, 2.2])
    new_mean, new_scale = np.array([2.5, 3.0, 0.0]), np.array([1.1, 2.5, 1.0])
    # the new list reorders the inputs and holds one the old model did not take (its weight starts at 0)
    new_names, new_x = ["b", "a", "new"], np.column_stack([x[:, 1], x[:, 0], rng.normal(size=30)])
    out = exact.restandardise(coef, ["a", "b", "c"], mean, scale, new_names, new_mean, new_scale)
    assert out[3] == 0.0
    shared = coef[0] + ((x[:, :2] - mean[:2]) / scale[:2]) @ coef[1:3]  # "c" left at its mean: adds nothing
    np.testing.assert_allclose(out[0] + ((new_x - new_mean) / new_scale) @ out[1:], shared, rtol=1e-12, atol=1e-12)


def test_a_start_of_the_wrong_size_is_refused_naming_the_size():
    with pytest.raises(ValueError, match="needs 4 finite coefficients"):
        exact.ExactNewton(3, l2=1.0, start=np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        exact.ExactNewton(1, l2=1.0, start=np.array([0.0, np.nan]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_fit_stopped_on_the_predicted_step_is_within_tol_and_saves_the_confirming_round(seed):
    raw = _raw_sites(seed)
    mean, scale = moments.pooled_mean_std(*zip(*(moments.site_moments(x) for x, _ in raw), strict=True))
    sites = [((x - mean) / scale, y) for x, y in raw]
    fit = exact.fit_exact(sites, 1.0, L2, tol=1e-10)
    assert fit.converged
    # the round it did not send: the step from the point kept is within tol, as the stop predicted
    total = exact.sum_terms(exact.site_terms(z, y, fit.coef, 1.0) for z, y in sites)
    step = np.abs(exact.newton_update(total.grad, total.hess, fit.coef, L2)[1].step_norm)
    assert step <= 1e-10 * max(1.0, float(np.abs(fit.coef).max()))
    # and one round fewer than waiting for a step below tol: the last step taken was above it
    assert fit.history[-1].info.step_norm > 1e-10 * max(1.0, float(np.abs(fit.coef).max()))
