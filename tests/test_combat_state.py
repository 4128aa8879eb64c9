"""The site's kept ComBat parameters (client.combat_state): packed as float64 bytes, not JSON, they come back to
the bit, so every fold harmonises exactly as before (issue 20: the JSON cost ~28 ms per fold at every site)."""

import json

import numpy as np
import pytest

from client import combat_state
from client.site import SiteError
from common import combat


def _params(p: int, site: int | None) -> combat.SiteCombat:
    rng = np.random.default_rng(3 + p)
    d = 7
    return combat.SiteCombat(site=site, n=23, parametric=True, eb=p == 0, mean_only=False,
                             grand_mean=rng.normal(size=d) * 1e3, beta_cov=rng.normal(size=(p, d)) / 7.0,
                             var_pooled=rng.random(d) + 1e-300, gamma_star=rng.normal(size=d) * np.pi,
                             delta_star=rng.random(d) + 0.5, unadjusted=np.array([1, 0, 0, 1, 0, 0, 0], dtype=bool))


@pytest.mark.parametrize("p, site", [(0, 4), (2, None)])
def test_packed_parameters_come_back_to_the_bit_and_harmonise_as_the_json_did(p, site):
    params = _params(p, site)
    back = combat_state.unpack(combat_state.pack(params))
    assert back.to_dict() == params.to_dict()
    via_json = combat.SiteCombat.from_dict(json.loads(json.dumps(params.to_dict())))  # what the state held before
    rng = np.random.default_rng(11)
    y, c = rng.normal(size=(9, 7)) * 50.0, rng.normal(size=(9, p)) if p else None
    assert np.array_equal(back.apply(y, c), via_json.apply(y, c))


def test_damaged_state_is_refused_in_words():
    blob = combat_state.pack(_params(1, 0))
    with pytest.raises(ValueError, match="restart the run"):
        combat_state.unpack(blob[:-8])


@pytest.mark.parametrize("p", [0, 2])
def test_adjusting_only_the_wanted_columns_gives_the_numbers_of_adjusting_all(p):
    params = _params(p, 1)
    harmonize = combat_state.Harmonizer(combat_state.pack(params))
    rng = np.random.default_rng(5)
    y, c = rng.normal(size=(9, 7)) * 50.0, rng.normal(size=(9, p)) if p else None
    cols = (5, 0, 3)  # a model's inputs, in its order (3 is passed through unadjusted at this site)
    assert np.array_equal(harmonize(y, c), params.apply(y, c))
    np.testing.assert_allclose(harmonize.restrict(cols)(y[:, list(cols)], c), params.apply(y, c)[:, list(cols)],
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("p", [0, 2])
def test_a_folds_model_columns_are_picked_from_the_bytes_without_unpacking_every_column(p):
    """A site's process serves ~2,300 folds' parameters, more than unpack keeps: a fold's few model columns are read
    from the kept bytes, the same numbers (to the bit) as unpacking all and picking them, and unpack stays unused."""
    params = _params(p, 1)
    blob = combat_state.pack(params)
    columns = (5, 0, 3)
    combat_state.unpack.cache_clear()
    combat_state._columns.cache_clear()
    picked = combat_state.Harmonizer(blob).restrict(columns)
    assert combat_state.unpack.cache_info().misses == 0  # nothing unpacked whole
    rng = np.random.default_rng(5)
    y, c = rng.normal(size=(6, 3)) * 40.0, rng.normal(size=(6, p)) if p else None
    full = combat_state.unpack(blob)
    cols = list(columns)
    expected = combat.SiteCombat(site=1, n=23, parametric=True, eb=p == 0, mean_only=False,
                                 grand_mean=full.grand_mean[cols], beta_cov=full.beta_cov[:, cols],
                                 var_pooled=full.var_pooled[cols], gamma_star=full.gamma_star[cols],
                                 delta_star=full.delta_star[cols], unadjusted=full.unadjusted[cols])
    assert combat_state._columns(blob, columns).to_dict() == expected.to_dict()
    assert np.array_equal(picked(y, c), expected.apply(y, c))
    with pytest.raises(ValueError, match="restart the run"):
        combat_state._columns(blob[:-8], columns)


@pytest.mark.parametrize("p", [0, 2])
def test_parameters_kept_for_a_folds_columns_alone_harmonise_those_to_the_bit_and_refuse_the_rest(p):
    """A leave-one-site-out fold's keep (query.combat_keep ``columns``) holds only the features the fold harmonises at
    the site: a fraction of the bytes, the same numbers for those columns in any order, and a clear refusal for a
    column or a whole-list request it does not hold."""
    params = _params(p, 1)
    whole, kept = combat_state.pack(params), combat_state.pack(params, [5, 0, 3])
    assert combat_state._layout(kept)[1].shape == (5 + p, 3)  # three columns' numbers, not seven
    rng = np.random.default_rng(8)
    y, c = rng.normal(size=(6, 2)) * 40.0, rng.normal(size=(6, p)) if p else None
    for columns in ((0, 5), (3, 0)):
        assert np.array_equal(combat_state.Harmonizer(kept).restrict(columns)(y, c),
                              combat_state.Harmonizer(whole).restrict(columns)(y, c))
    with pytest.raises(SiteError, match="restart the run"):
        combat_state.Harmonizer(kept).restrict((5, 1))
    with pytest.raises(SiteError, match="needs them all"):
        combat_state.Harmonizer(kept)(rng.normal(size=(6, 7)), c)
