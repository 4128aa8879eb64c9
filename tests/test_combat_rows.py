"""The pooled ComBat estimates a site is sent (issue 20): only its own row of B_hat and the covariate effects, not the
(sites + p, d) matrix with the other sites' rows zeroed; the site rebuilds exactly that matrix."""

import numpy as np
import pytest

from common import combat


@pytest.mark.parametrize("n_sites, p, site", [(1, 0, 0), (5, 0, 3), (6, 2, 0), (6, 2, 5)])
def test_a_site_gets_its_rows_and_rebuilds_the_masked_matrix(n_sites, p, site):
    beta = np.random.default_rng(n_sites + p).normal(size=(n_sites + p, 9))
    masked = beta.copy()
    masked[[i for i in range(n_sites) if i != site]] = 0.0  # what every site was sent before
    rows = combat.site_rows(beta, n_sites, site)
    assert rows.shape == (1 + p, 9)  # no other site's mean travels, and the size no longer grows with the sites
    assert np.array_equal(combat.full_beta(rows, site, n_sites), masked)


def test_rows_of_a_wrong_shape_are_refused_in_words():
    with pytest.raises(ValueError, match="expected \\(1 \\+ covariate columns, d\\)"):
        combat.full_beta(np.zeros(4), 0, 3)


def test_what_a_site_sends_in_rounds_1_and_2_is_the_same_in_every_cohort_without_covariates():
    """Why a leave-one-site-out fold may pool the sums its sites sent for the main run (server.phases
    harmonization_phase ``reuse``): a site's round-1 block and, without covariates, its round-2 residual sums do not
    depend on which other sites are in the cohort; with covariates round 2 does (B_hat's covariate rows are pooled)."""
    rng = np.random.default_rng(4)
    ys = [rng.normal(loc=k, scale=1 + k / 3, size=(8 + k, 6)) for k in range(5)]
    cs = [rng.normal(size=(8 + k, 1)) for k in range(5)]
    cohorts = {"main": [0, 1, 2, 3, 4], "fold": [0, 1, 3, 4]}  # the fold holds site 2 out

    def sent(members, covariates):
        blocks = {k: combat.site_moments(ys[k], i, len(members), cs[k] if covariates else None)
                  for i, k in enumerate(members)}
        means = combat.pool_moments(blocks.values())
        return ({k: combat.site_block(m) for k, m in blocks.items()},
                {k: combat.site_residuals(ys[k], means, i, cs[k] if covariates else None).ss
                 for i, k in enumerate(members)})

    for covariates in (False, True):
        (main_blocks, main_ss), (fold_blocks, fold_ss) = sent(cohorts["main"], covariates), sent(cohorts["fold"],
                                                                                               covariates)
        for k in cohorts["fold"]:
            assert all(np.array_equal(a, b) for a, b in zip(main_blocks[k], fold_blocks[k], strict=True))
            assert np.allclose(main_ss[k], fold_ss[k], rtol=1e-13) != covariates


@pytest.mark.parametrize("p", [0, 2])
def test_a_sites_own_fit_from_its_rows_equals_the_fit_against_the_masked_matrix(p):
    """client.compute.combat_site_fit fits the site's location/scale from the rows it is sent, without rebuilding the
    (sites + p, d) matrix for every fold: the same parameters, bit for bit, and a wrong site index is refused."""
    from client import compute
    from client.site import SiteError
    from common.runconfig import parse
    from radfed.launch import app_run_config

    run = parse(app_run_config({}))  # the defaults: parametric empirical Bayes
    rng = np.random.default_rng(11 + p)
    n_sites, d = 7, 30
    for site in range(n_sites):
        x = rng.normal(loc=1.0, scale=3.0, size=(15, d))
        covariates = rng.normal(size=(15, p)) if p else None
        arrays = {"beta": rng.normal(size=(1 + p, d)), "grand-mean": rng.normal(size=d),
                  "var-pooled": rng.uniform(0.5, 2.0, d), "zero-variance": (rng.random(d) > 0.9).astype(float)}
        got = compute.combat_site_fit(x, arrays, site, n_sites, 100, run, covariates)
        pooled = combat.PooledEstimates(n_sites=n_sites, n=100, beta=combat.full_beta(arrays["beta"], site, n_sites),
                                        grand_mean=arrays["grand-mean"], var_pooled=arrays["var-pooled"],
                                        zero_variance=arrays["zero-variance"] > 0.5)
        want = combat.fit_site(x, pooled, covariates, site=site, **compute.combat_options(run))
        for key in ("grand_mean", "var_pooled", "gamma_star", "delta_star", "unadjusted", "beta_cov"):
            assert np.array_equal(getattr(got, key), getattr(want, key)), key
        assert (got.site, got.n) == (want.site, want.n)
    with pytest.raises(SiteError, match="an index below 7"):
        compute.combat_site_fit(x, arrays, 7, n_sites, 100, run, covariates)
