"""The robustness filter's ICC (common.icc): the federated value from per-site sums equals the pooled value computed
on all cases in one place, and both equal textbook one-way ANOVA computed independently (scipy, least squares)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from common import icc
from common.profile import ProfileError, load_profile, profile_from_dict


def _federation(seed: int, sites: int = 3, m: int = 4, d: int = 6) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-site (n_s, m, d) values: case effects of varied size, measurement noise, and a site shift and scale."""
    rng = np.random.default_rng(seed)
    blocks = []
    for s in range(sites):
        n = int(rng.integers(7, 20))
        case = rng.normal(size=(n, 1, d)) * rng.uniform(0.2, 3.0, size=d)
        noise = rng.normal(size=(n, m, d))
        blocks.append((case + noise) * rng.uniform(0.5, 2.0) + rng.normal(0, 10, size=d) + 5 * s)
    labels = np.concatenate([np.full(len(b), s) for s, b in enumerate(blocks)])
    return blocks, labels


@pytest.mark.parametrize("seed", range(5))
def test_federated_icc_equals_pooled(seed: int) -> None:
    blocks, labels = _federation(seed)
    federated = icc.icc_from_sums([icc.site_icc_sums(b) for b in blocks], m=blocks[0].shape[1])
    pooled = icc.pooled_icc(np.concatenate(blocks), labels)
    assert np.all(np.isfinite(federated))
    np.testing.assert_allclose(federated, pooled, rtol=0, atol=1e-10)


def test_one_site_equals_textbook_icc11() -> None:
    """One site: ICC(1,1) of Shrout & Fleiss, through scipy's one-way ANOVA F (cases as groups):
    ICC(1,1) = (F - 1) / (F + m - 1)."""
    blocks, _ = _federation(11, sites=1, m=5)
    x = blocks[0]
    ours = icc.icc_from_sums([icc.site_icc_sums(x)], m=5)
    for j in range(x.shape[2]):
        f = stats.f_oneway(*[x[i, :, j] for i in range(len(x))]).statistic
        assert ours[j] == pytest.approx((f - 1) / (f + 5 - 1), abs=1e-10)


def test_pooled_equals_nested_anova_by_least_squares() -> None:
    """Cases nested in sites, site fixed: the between-case (within-site) and within-case sums of squares from
    the residuals of two dummy regressions (site only; case), with N - S and N (m - 1) degrees of freedom."""
    blocks, labels = _federation(3, sites=4, m=3, d=4)
    x = np.concatenate(blocks)
    n_cases, m, d = x.shape
    n_sites = len(np.unique(labels))
    rows_site = np.repeat(labels, m)
    rows_case = np.repeat(np.arange(n_cases), m)
    by_site = (rows_site[:, None] == np.unique(labels)[None, :]).astype(float)
    by_case = (rows_case[:, None] == np.arange(n_cases)[None, :]).astype(float)
    expected = []
    for j in range(d):
        y = x[:, :, j].ravel()
        rss_site = np.sum((y - by_site @ np.linalg.lstsq(by_site, y, rcond=None)[0]) ** 2)
        rss_case = np.sum((y - by_case @ np.linalg.lstsq(by_case, y, rcond=None)[0]) ** 2)
        msb = (rss_site - rss_case) / (n_cases - n_sites)
        msw = rss_case / (n_cases * (m - 1))
        expected.append((msb - msw) / (msb + (m - 1) * msw))
    np.testing.assert_allclose(icc.pooled_icc(x, labels), expected, atol=1e-10)


def test_site_shifts_do_not_make_a_feature_robust() -> None:
    """Pure measurement noise within each site (true ICC 0) with large site offsets: treating the federation as
    one site calls it robust; centring each site on its own mean does not."""
    rng = np.random.default_rng(5)
    blocks = [rng.normal(size=(15, 4, 1)) + 50.0 * s for s in range(3)]
    labels = np.repeat(np.arange(3), 15)
    naive = icc.icc_from_sums([icc.site_icc_sums(np.concatenate(blocks))], m=4)
    centred = icc.icc_from_sums([icc.site_icc_sums(b) for b in blocks], m=4)
    assert naive[0] > 0.95
    assert abs(centred[0]) < 0.3
    assert centred[0] == pytest.approx(icc.pooled_icc(np.concatenate(blocks), labels)[0], abs=1e-12)


def test_constant_feature_has_no_icc() -> None:
    x = np.ones((6, 3, 2))
    x[:, :, 1] = np.arange(6)[:, None]  # perfectly repeatable: ICC 1
    values = icc.icc_from_sums([icc.site_icc_sums(x)], m=3)
    assert np.isnan(values[0]) and values[1] == pytest.approx(1.0)


def _doc(robustness: object) -> dict[str, object]:
    return {"radfed": {"name": "t", "version": "1", "sequences": ["t1c"], "regions": {"tumour": 1}},
            "imageType": {"Original": {}}, "featureClass": {"firstorder": None}, "robustness": robustness}


@pytest.mark.parametrize(("block", "named"), [
    ({"perturbations": [{"kind": "blur", "sigma": 1}]}, "kind 'blur'"),
    ({"perturbations": [{"kind": "noise", "mm": 1}]}, "'sigma: <number>'"),
    ({"perturbations": [{"kind": "mask", "dilate": 1, "erode": 1}]}, "exactly one of"),
    ({"perturbations": [{"kind": "mask", "erode": 0.5}]}, "positive whole number"),
    ({"perturbations": []}, "non-empty list"),
    ({"perturbations": [{"kind": "rotate", "degrees": 5}], "repeats": 0}, "'robustness.repeats'"),
])
def test_bad_robustness_block_is_named(block: dict[str, object], named: str) -> None:
    with pytest.raises(ProfileError, match="robustness") as err:
        profile_from_dict(_doc(block))
    assert named in str(err.value)


def test_robustness_block_is_hashed_and_counted() -> None:
    base = _doc({"perturbations": [{"kind": "noise", "sigma": 0.1}, {"kind": "mask", "erode": 1}], "repeats": 3})
    one = profile_from_dict(base)
    other = profile_from_dict({**base, "robustness": {**base["robustness"], "seed": 1}})  # type: ignore[dict-item]
    assert one.sha256 != other.sha256
    assert one.robustness is not None and one.robustness.measurements == 1 + 3 + 1  # mask ops drawn once
    assert load_profile("default").robustness is not None


def test_filter_on_with_a_profile_without_perturbations_is_refused_in_words() -> None:
    from server.federation import RunRefused
    from server.robustness import require_perturbations

    bare = profile_from_dict({k: v for k, v in _doc(None).items() if k != "robustness"})
    with pytest.raises(RunRefused, match="robustness-min-icc = 0.8 but profile t v1 declares no perturbations"):
        require_perturbations(0.8, bare)
    assert require_perturbations(0.8, load_profile("default")).measurements == 6
