"""Distributed ComBat against the reference: neuroCombat 0.2.12 run on the pooled data.

"Max abs difference" below is always measured on the standardised scale: |ours - neuroCombat| divided by
the feature's pooled standard deviation, maximised over all cases and features. The features span 1e-2 to
1e6, so raw differences are only comparable after this scaling.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat
from neuroCombat.neuroCombat import make_design_matrix

from common import combat

SIZES = (9, 23, 15, 40)  # unequal on purpose: neuroCombat weights the grand mean by site size
N_FEATURES = 25
TOLERANCE = 1e-6


def make_sites(seed: int = 0, sizes: tuple[int, ...] = SIZES, d: int = N_FEATURES) -> dict:
    """Per-site data (n_i, d) with site shifts and scales, and covariates age, sex, grade that affect it."""
    rng = np.random.default_rng(seed)
    scale = np.logspace(-2, 6, d)  # features from 1e-2 to 1e6
    loc = rng.normal(0, 5, d) * scale
    age_effect, sex_effect, grade_effect = rng.normal(0, 0.5, (3, d))
    sites, age, sex, grade = [], [], [], []
    for n in sizes:
        shift, spread = rng.normal(0, 1, d), rng.uniform(0.5, 2.0, d)
        # neuroCombat casts continuous covariates to float32: use float32-representable ages.
        a = np.float32(np.round(rng.uniform(20, 80, n), 1)).astype(np.float64)
        s = rng.choice(["F", "M"], n)
        g = rng.choice(["I", "II", "III"], n)
        z = (shift + spread * rng.normal(size=(n, d)) + np.outer((a - 50) / 10, age_effect)
             + np.outer(s == "M", sex_effect) + np.outer(g != "I", grade_effect))
        sites.append(loc + scale * z)
        age.append(a), sex.append(s), grade.append(g)
    return {"y": sites, "age": age, "sex": sex, "grade": grade}


def federated_covariates(data: dict, kind: str | None) -> list[np.ndarray] | None:
    """Covariates coded as neuroCombat's design: categorical indicators (first level dropped), then continuous."""
    if kind is None:
        return None
    if kind == "age":
        return [a[:, None] for a in data["age"]]
    return [np.column_stack([s == "M", g == "II", g == "III", a]).astype(np.float64)
            for s, g, a in zip(data["sex"], data["grade"], data["age"], strict=True)]


def reference(data: dict, kind: str | None, **options) -> tuple[np.ndarray, dict]:
    """neuroCombat on the pooled data: adjusted (n, d) and its estimates."""
    pooled = np.vstack(data["y"])
    batch = np.repeat(np.arange(len(data["y"])), [len(y) for y in data["y"]])
    covars = pd.DataFrame({"batch": batch, "age": np.concatenate(data["age"]), "sex": np.concatenate(data["sex"]),
                           "grade": np.concatenate(data["grade"])})
    categorical = ["sex", "grade"] if kind == "categorical" else None
    continuous = ["age"] if kind is not None else None
    with contextlib.redirect_stdout(io.StringIO()):
        out = neuroCombat(dat=pooled.T.copy(), covars=covars, batch_col="batch", categorical_cols=categorical,
                          continuous_cols=continuous, **options)
    return out["data"].T, out["estimates"]


def standardised_diff(ours: np.ndarray, ref: np.ndarray, pooled: np.ndarray) -> float:
    """max |ours - ref| / (the feature's pooled std), over the entries where the reference is finite."""
    diff = np.abs(ours - ref) / pooled.std(axis=0)
    return float(diff[np.isfinite(ref)].max())


def run_protocol(data: dict, kind: str | None, **options):
    covs = federated_covariates(data, kind)
    adjusted, params = combat.federated_combat(data["y"], covs, **options)
    return np.vstack(adjusted), params


CASES = {
    "parametric": ({}, None),
    "no-eb": ({"eb": False}, None),
    "mean-only": ({"mean_only": True}, None),
    "mean-only-no-eb": ({"mean_only": True, "eb": False}, None),
    "age": ({}, "age"),
    "sex-grade-age": ({}, "categorical"),
    "non-parametric": ({"parametric": False}, None),
    "non-parametric-mean-only": ({"parametric": False, "mean_only": True}, "categorical"),
}


def test_design_equals_neurocombat_column_for_column():
    data = make_sites()
    covs = federated_covariates(data, "categorical")
    ours = np.vstack([combat.design_matrix(len(y), i, len(SIZES), c)
                      for i, (y, c) in enumerate(zip(data["y"], covs, strict=True))])
    batch = np.repeat(np.arange(len(SIZES)), SIZES)
    table = np.column_stack([batch, np.concatenate(data["age"]), np.concatenate(data["sex"]),
                             np.concatenate(data["grade"])]).astype(object)
    table[:, 0], table[:, 1] = batch, np.concatenate(data["age"])
    theirs = make_design_matrix(table, 0, [2, 3], [1], None)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("case", CASES)
def test_federated_equals_pooled_neurocombat(case):
    options, kind = CASES[case]
    data = make_sites()
    ours, params = run_protocol(data, kind, **options)
    ref, estimates = reference(data, kind, **options)
    pooled = np.vstack(data["y"])
    assert np.isfinite(ours).all()
    diff = standardised_diff(ours, ref, pooled)
    print(f"{case}: max abs diff (standardised) {diff:.2e}")
    assert diff <= TOLERANCE
    # The estimates too: pooled variance, grand mean, and each site's gamma*/delta* (standardised scale).
    var_pooled = estimates["var.pooled"][:, 0]
    np.testing.assert_allclose(params[0].var_pooled, var_pooled, rtol=1e-9)
    assert np.abs((params[0].grand_mean - estimates["stand.mean"][:, 0]) / pooled.std(axis=0)).max() <= 1e-9
    for i, p in enumerate(params):
        np.testing.assert_allclose(p.gamma_star, estimates["gamma.star"][i], atol=TOLERANCE)
        np.testing.assert_allclose(p.delta_star, estimates["delta.star"][i], rtol=TOLERANCE)
        assert not p.unadjusted.any()


def test_non_parametric_stays_finite_where_neurocombat_underflows():
    data = make_sites(seed=3, sizes=(900, 30), d=8)
    ours, params = run_protocol(data, None, parametric=False)
    with np.errstate(all="ignore"):
        ref, est = reference(data, None, parametric=False)
    gamma_ref, delta_ref = np.asarray(est["gamma.star"]), np.asarray(est["delta.star"])
    # neuroCombat multiplies 900 Gaussian densities per feature: 0/0 at the big site. Its adjustment then
    # multiplies every site by all sites' gamma* (0 * NaN), so the NaN reaches every output row.
    assert np.isnan(gamma_ref[0]).all() and np.isnan(ref).all()
    assert np.isfinite(ours).all()
    # Where the reference is finite (the small site's estimates), they agree, and so does the output they give.
    assert np.isfinite(gamma_ref[1]).all() and np.isfinite(delta_ref[1]).all()
    np.testing.assert_allclose(params[1].gamma_star, gamma_ref[1], atol=TOLERANCE)
    np.testing.assert_allclose(params[1].delta_star, delta_ref[1], rtol=TOLERANCE)
    sd, mean = np.sqrt(est["var.pooled"][:, 0]), est["stand.mean"][:, 0]
    y = data["y"][1]
    expected = ((y - mean) / sd - gamma_ref[1]) / np.sqrt(delta_ref[1]) * sd + mean
    diff = standardised_diff(ours[900:], expected, np.vstack(data["y"]))
    print(f"non-parametric, 900-case site: max abs diff where the reference is finite {diff:.2e}")
    assert diff <= TOLERANCE


def test_messages_have_no_per_case_dimension():
    data = make_sites()
    covs = federated_covariates(data, "age")
    small, large = 0, 3  # 9 and 40 cases
    r, d = 1 + 1, N_FEATURES  # the site's own indicator column and age
    moments = [combat.site_moments(data["y"][i], i, len(SIZES), covs[i]) for i in range(len(SIZES))]
    for i in (small, large):
        assert moments[i].xtx.shape == (r, r) and moments[i].xty.shape == (r, d)
    means = combat.pool_moments(moments)
    for i in (small, large):
        assert combat.site_residuals(data["y"][i], means, i, covs[i]).ss.shape == (d,)


def _full_design_block(y: np.ndarray, site: int, n_sites: int, c: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """The block as sites computed it before: the (n, S + p) design's XᵀX and XᵀY, restricted to the site's column
    and the covariates'."""
    x = combat.design_matrix(len(y), site, n_sites, c)
    idx = np.r_[site, np.arange(n_sites, x.shape[1])]
    return (x.T @ x)[np.ix_(idx, idx)], (x.T @ y)[idx]


@pytest.mark.parametrize("covariates", ["none", "age", "categorical"])
def test_a_site_sends_only_its_block_of_the_design_and_the_pooled_fit_is_unchanged(covariates):
    # what travels: the site's own indicator column and the covariates' (1 + p), never the sites x sites matrix;
    # every entry left out is a structural zero, so the server adds each block where it lies in the pooled design
    data = make_sites(seed=2)
    covs = federated_covariates(data, covariates) if covariates != "none" else [None] * len(SIZES)
    n_sites, d = len(SIZES), N_FEATURES
    sent = [combat.site_moments(data["y"][i], i, n_sites, covs[i]) for i in range(n_sites)]
    p = 0 if covs[0] is None else covs[0].shape[1]
    for i, m in enumerate(sent):
        xtx, xty = combat.site_block(m)
        assert xtx.shape == (1 + p, 1 + p) and xty.shape == (1 + p, d)
        # the same numbers as the full design's block (its sums in another order: <= 1e-13 relative)
        for ours, full in zip((xtx, xty), _full_design_block(data["y"][i], i, n_sites, covs[i]), strict=True):
            np.testing.assert_allclose(ours, full, rtol=1e-13, atol=0)
    received = [combat.from_block(i, n_sites, m.n, *combat.site_block(m)) for i, m in enumerate(sent)]
    pooled = combat.pool_moments(iter(received))  # a generator pools too
    # the pooled design's cross-products, solved
    x = np.vstack([combat.design_matrix(len(y), i, n_sites, c) for i, (y, c) in enumerate(zip(data["y"], covs,
                                                                                              strict=True))])
    beta = np.linalg.solve(x.T @ x, x.T @ np.vstack(data["y"]))
    np.testing.assert_allclose(pooled.beta, beta, rtol=1e-9, atol=1e-9 * np.abs(beta).max())
    with pytest.raises(ValueError, match="expected one message from each of sites"):
        combat.pool_moments(received[:-1])
    with pytest.raises(ValueError, match="design blocks of shapes"):
        combat.from_block(0, n_sites, 9, np.zeros((2, 3)), np.zeros((2, d)))
    with pytest.raises(ValueError, match="outside"):
        combat.pool_moments([combat.from_block(n_sites, n_sites, 9, *combat.site_block(sent[0]))])


def test_a_sites_work_does_not_grow_with_the_number_of_sites():
    """At S sites a site computed the (n, S) design and its (S, S) XᵀX (8 MB at 1,000 sites), and the server
    expanded every site's block into a (S + p, S + p) matrix: now a site's memory is its own (n, 1 + p) columns,
    whatever S, and what the server keeps of a site is the block it sent."""
    import tracemalloc

    rng = np.random.default_rng(0)
    y, c = rng.normal(size=(30, 20)), rng.normal(size=(30, 2))
    n_sites = 3000  # (S, S) float64: 72 MB
    means = combat.PooledMeans(n_sites=n_sites, n=0, beta=rng.normal(size=(n_sites + 2, 20)),
                               grand_mean=np.zeros(20), fitted_ms=np.zeros(20))
    tracemalloc.start()
    try:
        m = combat.site_moments(y, 7, n_sites, c)
        combat.site_residuals(y, means, 7, c)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000, f"a site allocated {peak} bytes at {n_sites} sites"
    received = combat.from_block(7, n_sites, m.n, *combat.site_block(m))
    assert received.xtx.shape == (3, 3) and received.xty.shape == (3, 20)


def test_stored_parameters_reproduce_training_output_and_harmonise_new_cases():
    data = make_sites(seed=1)
    covs = federated_covariates(data, "categorical")
    adjusted, params = combat.federated_combat(data["y"], covs)
    for y, c, out, p in zip(data["y"], covs, adjusted, params, strict=True):
        stored = combat.SiteCombat.from_dict(json.loads(json.dumps(p.to_dict())))
        np.testing.assert_array_equal(stored.apply(y, c), out)
        # Cases are adjusted one by one: a subset (a new patient, a held-out split) gets the same values.
        np.testing.assert_allclose(stored.apply(y[:1], c[:1]), out[:1], rtol=1e-14, atol=0)
        np.testing.assert_allclose(stored.apply(y[::2], c[::2]), out[::2], rtol=1e-14, atol=0)


def test_new_cases_match_neurocombat_estimates():
    # Held-out cases (not part of the fit) against the formula applied with neuroCombat's own estimates.
    data = make_sites(seed=2)
    train = {key: [v[:-3] for v in values] for key, values in data.items()}
    _, params = run_protocol(train, None)
    _, est = reference(train, None)
    sd, mean = np.sqrt(est["var.pooled"][:, 0]), est["stand.mean"][:, 0]
    for i, p in enumerate(params):
        new = data["y"][i][-3:]
        expected = ((new - mean) / sd - est["gamma.star"][i]) / np.sqrt(est["delta.star"][i]) * sd + mean
        assert standardised_diff(p.apply(new), expected, np.vstack(train["y"])) <= TOLERANCE


def test_late_joining_site_is_harmonised_against_stored_estimates():
    data = make_sites(seed=4)
    early = data["y"][:3]
    means = combat.pool_moments([combat.site_moments(y, i, 3) for i, y in enumerate(early)])
    pooled = combat.pool_residuals(means, [combat.site_residuals(y, means, i) for i, y in enumerate(early)])
    stored = combat.PooledEstimates.from_dict(json.loads(json.dumps(pooled.to_dict())))
    sd = np.sqrt(stored.var_pooled)
    # The newcomer: 4 pooled SDs off and twice as spread.
    rng = np.random.default_rng(5)
    late = stored.grand_mean + sd * (4.0 + 2.0 * rng.normal(size=(40, N_FEATURES)))
    adjusted, params = combat.join_site(late, stored)
    assert np.isfinite(adjusted).all() and params.site is None
    assert np.abs((late.mean(axis=0) - stored.grand_mean) / sd).min() > 2.5
    # EB shrinks each feature's shift towards the site's average shift, so a little is left on outliers.
    residual_shift = np.abs((adjusted.mean(axis=0) - stored.grand_mean) / sd)
    assert residual_shift.max() < 0.5 and np.median(residual_shift) < 0.1
    assert np.all(np.abs(adjusted.std(axis=0, ddof=1) / sd - 1) < 0.2)
    # Joining uses only the stored pooled values: an original site "joining" gets its federated result.
    federated, _ = combat.federated_combat(early)
    np.testing.assert_array_equal(combat.join_site(early[1], stored)[0], federated[1])


def test_zero_variance_features_pass_through_and_are_reported():
    data = make_sites(seed=6)
    sites = [y.copy() for y in data["y"]]
    constant_at_site, constant_everywhere = 3, 5
    sites[1][:, constant_at_site] = 0.1  # constant at site 1 only
    for y in sites:
        y[:, constant_everywhere] = 1234.5  # zero pooled variance
    adjusted, params = combat.federated_combat(sites)
    assert all(np.isfinite(a).all() for a in adjusted)
    for i, (y, out, p) in enumerate(zip(sites, adjusted, params, strict=True)):
        assert p.unadjusted[constant_everywhere]
        np.testing.assert_array_equal(out[:, constant_everywhere], y[:, constant_everywhere])
        assert p.unadjusted[constant_at_site] == (i == 1)
        assert p.unadjusted.sum() == 1 + (i == 1)
    np.testing.assert_array_equal(adjusted[1][:, constant_at_site], sites[1][:, constant_at_site])
    # Elsewhere nothing changes: the other sites equal neuroCombat on the features it can handle.
    keep = np.arange(N_FEATURES) != constant_everywhere
    ref, _ = reference({**data, "y": [y[:, keep] for y in sites]}, None)
    others = np.concatenate([np.full(n, i != 1) for i, n in enumerate(SIZES)])
    ours = np.vstack(adjusted)[:, keep]
    assert standardised_diff(ours[others], ref[others], np.vstack(sites)[:, keep]) <= TOLERANCE


def test_too_few_cases_at_a_site():
    sites = make_sites()["y"]
    sites[2] = sites[2][:1]
    with pytest.raises(ValueError, match="fewer than 2 cases"):
        combat.federated_combat(sites)


@pytest.mark.parametrize("coding", ["constant", "all-levels"])
def test_singular_design_names_the_cause(coding):
    data = make_sites()
    if coding == "constant":  # e.g. every case scanned at the same field strength
        covs = [np.full((len(y), 1), 3.0) for y in data["y"]]
        cause = "constant over all sites"
    else:  # sex coded with both levels: F + M = the sum of the site indicators
        covs = [np.column_stack([s == "F", s == "M"]).astype(float) for s in data["sex"]]
        cause = "all its levels"
    with pytest.raises(ValueError, match=cause):
        combat.federated_combat(data["y"], covs)
