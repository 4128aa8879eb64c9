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
