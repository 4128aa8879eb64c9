"""Clinical metrics from aggregates (common/clinical.py) against references: scikit-learn and numpy on the pooled
cases, scipy root finding, and a decision curve worked by hand; plus the k rule on every site-side output."""

import numpy as np
import pytest
from scipy.optimize import brentq
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score

from common import clinical, metrics

K = 5


def _site(rng: np.random.Generator, n: int, prevalence: float, shift: float = 0.0,
          separation: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """One site's held-out labels and model probabilities, with at least K cases of each class."""
    y = (rng.random(n) < prevalence).astype(int)
    y[:K], y[K:2 * K] = 1, 0
    eta = shift + separation * (y - 0.5) + rng.normal(0, 1.0, n)
    return y, 1 / (1 + np.exp(-eta))


def _sites(seed: int, count: int = 4, low: int = 12, high: int = 120) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [_site(rng, int(rng.integers(low, high)), float(rng.uniform(0.2, 0.8)), float(rng.normal(0, 0.7)))
            for _ in range(count)]


def _pooled(sites: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([y for y, _ in sites]), np.concatenate([p for _, p in sites])


def _histogram_auc(sites: list[tuple[np.ndarray, np.ndarray]], bins: int, scale: str = "logit") -> dict[str, float]:
    edges = clinical.score_edges(bins, scale)
    return clinical.pooled_auc([clinical.site_score_histograms(y, p, edges, K) for y, p in sites])


# ---------------------------------------------------------------- pooled AUC

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", ["logit", "probability"])
def test_pooled_auc_from_histograms_lies_within_its_bound_of_sklearns_pooled_auc(seed, scale):
    sites = _sites(seed)
    y, p = _pooled(sites)
    result = _histogram_auc(sites, 100, scale)
    exact = roc_auc_score(y, p)
    assert abs(result["auc"] - exact) <= result["bound"] + 1e-12
    assert result["low"] <= exact <= result["high"]
    # groups of >= 5 cases of ~260 leave a wide worst case; the uniform-spread estimate is far closer than that
    assert 0 < result["bound"] < 0.2 and abs(result["auc"] - exact) < 0.05
    assert (result["n_pos"], result["n_neg"]) == (y.sum(), (1 - y).sum())
    # the DeLong variance of the binned pooled data is close to that of the exact scores
    assert result["variance"] == pytest.approx(metrics.delong_variance(y, p), rel=0.15)


def test_pooled_auc_is_the_auc_of_the_pooled_cases_not_the_mean_of_site_aucs():
    rng = np.random.default_rng(7)
    # site case mix confounds the scores: a high-prevalence site that scores everyone higher
    sites = [_site(rng, 800, 0.8, shift=1.5), _site(rng, 800, 0.2, shift=-1.5)]
    y, p = _pooled(sites)
    exact = roc_auc_score(y, p)
    mean_of_sites = np.mean([roc_auc_score(ys, ps) for ys, ps in sites])  # equal n, so the weighted mean
    result = _histogram_auc(sites, 80)
    assert abs(result["auc"] - exact) <= result["bound"] < abs(mean_of_sites - exact)


def test_pooled_auc_converges_to_sklearns_as_bins_get_finer():
    rng = np.random.default_rng(3)
    sites = [_site(rng, 1500, prev, shift) for prev, shift in ((0.3, 0.4), (0.5, -0.3), (0.7, 0.0))]
    y, p = _pooled(sites)
    exact = roc_auc_score(y, p)
    results = [_histogram_auc(sites, bins) for bins in (5, 20, 80, 320, 1280)]  # nested logit grids
    errors = [abs(r["auc"] - exact) for r in results]
    bounds = [r["bound"] for r in results]
    assert all(e <= b + 1e-12 for e, b in zip(errors, bounds, strict=True))
    assert all(later <= earlier for earlier, later in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] > 0.05 and bounds[-1] < 0.01  # the floor: how far the k-merged groups overlap
    assert errors[-1] < 0.001 and errors[-1] < errors[0] / 100


def test_histogram_auc_is_exact_on_shared_bins_and_its_bound_is_the_binned_tie_mass():
    """With every bin of every site holding 0 or >= k cases of each class and each bin one score value, no bin is
    merged: the AUC equals scikit-learn's, B = sum_b n_pos_b n_neg_b / (2 N_pos N_neg) and the variance DeLong's."""
    rng = np.random.default_rng(11)
    edges = clinical.score_edges(10, "probability")
    centres = (edges[:-1] + edges[1:]) / 2
    sites = []
    for _ in range(3):
        per_class = [rng.choice([5, 6, 8, 11], size=10) for _ in range(2)]
        y = np.concatenate([np.full(c.sum(), label) for label, c in enumerate(per_class)])
        p = np.concatenate([np.repeat(centres, c) for c in per_class])
        sites.append((y, p))
    replies = [clinical.site_score_histograms(y, p, edges, K) for y, p in sites]
    for (y, p), reply in zip(sites, replies, strict=True):
        raw = [np.bincount(np.searchsorted(edges, p[y == label]) - 1, minlength=10) for label in (0, 1)]
        np.testing.assert_array_equal(reply["start"], raw)
        np.testing.assert_array_equal(reply["end"], raw)
    result = clinical.pooled_auc(replies)
    y, p = _pooled(sites)
    assert result["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    n_neg_b, n_pos_b = (np.bincount(np.searchsorted(edges, p[y == label]) - 1, minlength=10) for label in (0, 1))
    assert result["bound"] == pytest.approx(n_pos_b @ n_neg_b / (2 * n_pos_b.sum() * n_neg_b.sum()), abs=1e-15)
    assert result["auc"] - result["low"] == pytest.approx(result["bound"], abs=1e-15)
    assert result["variance"] == pytest.approx(metrics.delong_variance(y, p), rel=1e-12)
    # the interval: DeLong's normal interval, widened by the bound on each side
    low, high = clinical.auc_interval(result)
    normal = metrics.intervals({"tp": 1, "fp": 1, "tn": 1, "fn": 1, "auc": result["auc"],
                                "auc_var": result["variance"]})["auc"]
    assert (low, high) == pytest.approx((normal[0] - result["bound"], normal[1] + result["bound"]), abs=1e-12)
    assert low < normal[0] - 0.005  # the bound is not negligible here: the widening is seen


@pytest.mark.parametrize("seed", range(8))
def test_site_histograms_are_k_anonymous_and_count_the_right_cases(seed):
    rng = np.random.default_rng(100 + seed)
    y, p = _site(rng, int(rng.integers(10, 60)), float(rng.uniform(0.2, 0.8)), separation=3.0)
    edges = clinical.score_edges(int(rng.integers(5, 200)), "logit")
    reply = clinical.site_score_histograms(y, p, edges, K)
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    for key in ("start", "end"):
        assert reply[key].shape == (2, len(edges) - 1)
        assert np.all((reply[key] == 0) | (reply[key] >= K))
    for label in (0, 1):
        mine = bins[y == label]
        starts, ends = np.flatnonzero(reply["start"][label]), np.flatnonzero(reply["end"][label])
        covered = 0
        for lo, hi in zip(starts, ends, strict=True):  # each released count is its group's cases, recounted
            inside = np.sum((mine >= lo) & (mine <= hi))
            assert reply["start"][label, lo] == reply["end"][label, hi] == inside
            assert np.any(mine == lo) and np.any(mine == hi)  # the range is the group's occupied bins
            covered += inside
        assert covered == len(mine)  # disjoint groups that hold every case of the class


def test_a_remainder_below_k_joins_the_last_group():
    edges = clinical.score_edges(4, "probability")  # bins [0, .25) [.25, .5) [.5, .75) [.75, 1]
    p = np.r_[np.full(5, 0.1), np.full(5, 0.3), np.full(2, 0.9), np.full(5, 0.6)]
    y = np.r_[np.ones(12), np.zeros(5)].astype(int)
    reply = clinical.site_score_histograms(y, p, edges, K)
    np.testing.assert_array_equal(reply["start"], [[0, 0, 5, 0], [5, 7, 0, 0]])
    np.testing.assert_array_equal(reply["end"], [[0, 0, 5, 0], [5, 0, 0, 7]])


def test_site_functions_refuse_a_class_below_k_and_a_k_below_five():
    rng = np.random.default_rng(0)
    p = rng.random(20)
    few_hgg = np.r_[np.ones(3), np.zeros(17)]
    enough = np.r_[np.ones(10), np.zeros(10)]
    calls = [lambda y, k: clinical.site_score_histograms(y, p, clinical.score_edges(10), k),
             lambda y, k: clinical.site_recalibration_terms(y, p, np.array([0.0, 1.0]), k),
             lambda y, k: clinical.site_brier_terms(y, p, k),
             lambda y, k: clinical.site_decision_counts(y, p, np.array([0.2, 0.5]), k)]
    for call in calls:
        with pytest.raises(ValueError, match="fewer than k"):
            call(few_hgg, K)
        with pytest.raises(ValueError, match="below the floor"):
            call(enough, 4)
        call(enough, K)  # and answers otherwise


# ---------------------------------------------------------------- calibration

def _query(sites: list[tuple[np.ndarray, np.ndarray]]):
    return lambda params: [clinical.site_recalibration_terms(y, p, params, K) for y, p in sites]


@pytest.mark.parametrize("seed", range(4))
def test_recalibration_slope_and_intercept_equal_sklearn_on_pooled_logits(seed):
    rng = np.random.default_rng(seed)
    sites = []
    for n in rng.integers(15, 150, 4):
        y, p = _site(rng, int(n), float(rng.uniform(0.3, 0.7)), separation=2.5)
        sites.append((y, 1 / (1 + np.exp(-(0.5 + 1.8 * clinical.logit(p))))))  # an over-confident-looking model
    fit = clinical.fit_recalibration(_query(sites))
    y, p = _pooled(sites)
    x = clinical.logit(p)[:, None]
    # scikit-learn >= 1.8 spells no penalty C=inf (penalty=None is deprecated)
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x, y)
    assert fit["converged"] and fit["rounds"] < 15
    assert fit["intercept"] == pytest.approx(ref.intercept_[0], abs=1e-6)
    assert fit["slope"] == pytest.approx(ref.coef_[0, 0], abs=1e-6)
    assert fit["n"] == len(y)
    # standard errors: the inverse Fisher information at scikit-learn's fit
    mu = ref.predict_proba(x)[:, 1]
    design = np.column_stack([np.ones(len(y)), x[:, 0]])
    cov = np.linalg.inv(design.T @ (design * (mu * (1 - mu))[:, None]))
    assert [fit["intercept_se"], fit["slope_se"]] == pytest.approx(np.sqrt(np.diag(cov)), rel=1e-5)


def test_calibration_in_the_large_solves_the_pooled_score_equation():
    sites = _sites(5)
    fit = clinical.fit_recalibration(_query(sites), fixed_slope=1.0)
    y, p = _pooled(sites)
    x = clinical.logit(p)
    # with the slope fixed at 1, the MLE intercept makes the mean recalibrated probability the observed rate
    ref = brentq(lambda a: np.sum(1 / (1 + np.exp(-(a + x)))) - y.sum(), -10, 10, xtol=1e-14)
    assert fit["converged"] and fit["slope"] == 1.0 and fit["slope_se"] == 0.0
    assert fit["intercept"] == pytest.approx(ref, abs=1e-9)


def test_recalibration_reports_no_convergence_when_the_scores_separate_the_classes():
    rng = np.random.default_rng(2)
    sites = [(np.r_[np.ones(10), np.zeros(10)].astype(int), np.r_[rng.uniform(0.6, 0.9, 10), rng.uniform(0.1, 0.4, 10)])
             for _ in range(2)]
    assert not clinical.fit_recalibration(_query(sites), max_iter=10)["converged"]


# ---------------------------------------------------------------- Brier

@pytest.mark.parametrize("seed", range(3))
def test_pooled_brier_equals_sklearn_on_the_pooled_cases(seed):
    sites = _sites(seed)
    y, p = _pooled(sites)
    replies = [clinical.site_brier_terms(ys, ps, K) for ys, ps in sites]
    assert clinical.pooled_brier(replies) == pytest.approx(brier_score_loss(y, p), rel=1e-13)


# ---------------------------------------------------------------- decision curve

def test_net_benefit_worked_by_hand():
    site_a = (np.r_[np.ones(10), np.zeros(10)].astype(int),
              np.r_[np.full(5, 0.9), np.full(5, 0.6), np.full(5, 0.7), np.full(5, 0.1)])
    site_b = (np.r_[np.ones(10), np.zeros(10)].astype(int),
              np.r_[np.full(5, 0.8), np.full(5, 0.3), np.full(10, 0.2)])
    t = np.array([0.25, 0.5, 0.75])
    replies = [clinical.site_decision_counts(y, p, t, K) for y, p in (site_a, site_b)]
    assert all(r["kept"].all() for r in replies)
    curve = clinical.pooled_net_benefit(replies, t)
    # N = 40. t = .25: TP 20, FP 5, odds 1/3 -> 20/40 - 5/40/3; t = .5: TP 15, FP 5 -> 10/40; t = .75: TP 10, FP 0
    np.testing.assert_allclose(curve["model"], [11 / 24, 1 / 4, 1 / 4], atol=1e-15)
    np.testing.assert_allclose(curve["model_low"], curve["model"], atol=0)
    np.testing.assert_allclose(curve["model_high"], curve["model"], atol=0)
    # treat all: prevalence 1/2 -> 1/2 - 1/2 * odds
    np.testing.assert_allclose(curve["treat_all"], [1 / 3, 0, -1], atol=1e-15)
    np.testing.assert_array_equal(curve["treat_none"], 0)


def test_a_threshold_that_moves_fewer_than_k_cases_is_withheld_and_bounded():
    # HGG: 5 at .15, 2 at .35, 5 at .65; BM: 10 at .1. Above .3: 7 HGG; above .5: 5, a step of 2
    y = np.r_[np.ones(12), np.zeros(10)].astype(int)
    p = np.r_[np.full(5, 0.15), np.full(2, 0.35), np.full(5, 0.65), np.full(10, 0.1)]
    t = np.array([0.3, 0.5])
    np.testing.assert_array_equal(clinical.k_safe_thresholds(y, p, t, K), [True, False])
    reply = clinical.site_decision_counts(y, p, t, K)
    np.testing.assert_array_equal(reply["tp_fp"], [[7, 0], [0, 0]])
    curve = clinical.pooled_net_benefit([reply], t)
    assert curve["model"][0] == pytest.approx(7 / 22) and np.isnan(curve["model"][1])
    truth = 5 / 22  # TP 5, FP 0 at .5
    assert curve["model_low"][1] <= truth <= curve["model_high"][1]
    assert (curve["model_low"][1], curve["model_high"][1]) == pytest.approx((0, 7 / 22))


def _true_net_benefit(y: np.ndarray, p: np.ndarray, t: np.ndarray) -> np.ndarray:
    counts = [metrics.confusion_counts(y, p, float(ti)) for ti in t]
    return np.array([(c["tp"] - c["fp"] * ti / (1 - ti)) / len(y) for c, ti in zip(counts, t, strict=True)])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("per_class", [True, False])
def test_pooled_net_benefit_equals_the_pooled_cases_where_kept_and_brackets_them_elsewhere(seed, per_class):
    sites = _sites(seed, low=40, high=150)
    t = np.round(np.arange(0.05, 0.951, 0.1), 2)
    replies = [clinical.site_decision_counts(y, p, t, K, per_class) for y, p in sites]
    curve = clinical.pooled_net_benefit(replies, t)
    y, p = _pooled(sites)
    truth = _true_net_benefit(y, p, t)
    determined = np.isfinite(curve["model"])
    assert not determined.all()  # some site withholds some threshold
    if not per_class:  # the looser rule keeps most thresholds; the per-class one few in common (see the report)
        assert determined.any()
    np.testing.assert_allclose(curve["model"][determined], truth[determined], atol=1e-12)
    assert np.all(curve["model_low"] <= truth + 1e-12) and np.all(truth <= curve["model_high"] + 1e-12)
    np.testing.assert_array_equal(curve["model_low"][determined], curve["model_high"][determined])
    prevalence = y.mean()
    np.testing.assert_allclose(curve["treat_all"], prevalence - (1 - prevalence) * t / (1 - t), atol=1e-12)


# ---------------------------------------------------------------- the k rule over every site-side output

@pytest.mark.parametrize("seed", range(10))
def test_every_site_side_release_is_zero_or_at_least_k(seed):
    rng = np.random.default_rng(1000 + seed)
    k = int(rng.integers(5, 9))
    while True:  # a site with a class below k refuses (tested above): draw until both classes hold k
        y, p = _site(rng, int(rng.integers(10, 80)), float(rng.uniform(0.15, 0.85)),
                     separation=float(rng.uniform(0, 4)))
        n_pos, n_neg = int(y.sum()), int((1 - y).sum())
        if min(n_pos, n_neg) >= k:
            break
    hist = clinical.site_score_histograms(y, p, clinical.score_edges(int(rng.integers(3, 300))), k)
    for counts in hist.values():
        assert np.all((counts == 0) | (counts >= k))
    assert clinical.site_brier_terms(y, p, k)["n"] >= k
    assert clinical.site_recalibration_terms(y, p, np.array([0.1, 0.9]), k)["n"] >= k
    t = np.round(np.arange(0.05, 0.951, 0.05), 2)
    for per_class in (True, False):
        reply = clinical.site_decision_counts(y, p, t, k, per_class)
        kept = reply["kept"].astype(bool)
        np.testing.assert_array_equal(reply["tp_fp"][~kept], 0)
        # the counts at kept thresholds are the site's true confusion counts ...
        for j in np.flatnonzero(kept):
            c = metrics.confusion_counts(y, p, float(t[j]))
            assert tuple(reply["tp_fp"][j]) == (c["tp"], c["fp"])
        # ... and along the chain total -> kept counts -> 0, every step is 0 or >= k (per class, or in total)
        chain = np.vstack([[n_pos, n_neg], reply["tp_fp"][kept], [0, 0]])
        steps = -np.diff(chain if per_class else chain.sum(axis=1, keepdims=True), axis=0)
        assert np.all((steps == 0) | (steps >= k))
        np.testing.assert_array_equal(reply["n_pos_neg"], [n_pos, n_neg])


def test_recalibration_stops_at_its_round_cap_and_thresholds_are_equal_steps():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    prob = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 60), 0.01, 0.99)
    sent = []

    def query(params: np.ndarray) -> list[dict]:
        sent.append(params.copy())
        return [clinical.site_recalibration_terms(y, prob, params, 5)]

    capped = clinical.fit_recalibration(query, max_rounds=2)
    assert capped["rounds"] == len(sent) == 2 and not capped["converged"]
    sent.clear()
    free = clinical.fit_recalibration(query)
    assert free["converged"] and free["rounds"] == len(sent) > 2
    # no round is spent on a step below the tolerance: the fit stops at the point whose Newton step (from the
    # replies already in hand) is that small, so its last two queries are still a real step apart
    assert np.max(np.abs(sent[-1] - sent[-2])) >= 1e-10
    assert [free["intercept"], free["slope"]] == list(sent[-1])
    np.testing.assert_allclose(clinical.decision_thresholds(4), [0.2, 0.4, 0.6, 0.8])
