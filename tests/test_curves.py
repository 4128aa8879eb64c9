"""k-anonymous curves and the intervals sites and server compute, against direct computations."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from scipy.stats import binomtest
from sklearn.metrics import roc_curve

from client.guard import PrivacyError, check_reply
from common import curves, metrics, protocol


@pytest.mark.parametrize(("n", "k", "points"), [(23, 5, 10), (100, 5, 10), (9, 5, 10), (50, 7, 4)])
def test_groups_cover_every_case_with_at_least_k(n, k, points):
    groups = curves.rank_groups(n, k, points)
    sizes = [g.stop - g.start for g in groups]
    assert sum(sizes) == n and groups[0].start == 0 and groups[-1].stop == n
    assert min(sizes) >= k and len(groups) <= points


def test_roc_points_lie_on_the_exact_roc_curve():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    score = rng.random(60) + 0.3 * y
    pts = curves.roc_points(y, score, k=5, points=10)
    assert pts.shape == (10, 2)
    steps = np.diff(np.r_[0, pts.sum(axis=1)])
    assert np.all((steps == 0) | (steps >= 5))
    fpr, tpr = curves.roc_curve(pts)
    ref_fpr, ref_tpr, _ = roc_curve(y, score, drop_intermediate=False)
    # every sent point is a vertex of the full ROC curve (no ties in continuous scores)
    for f, t in zip(fpr, tpr, strict=True):
        assert np.min(np.hypot(ref_fpr - f, ref_tpr - t)) < 1e-12
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_calibration_groups_are_means_over_k_cases():
    rng = np.random.default_rng(1)
    y, prob = rng.integers(0, 2, 37), rng.random(37)
    groups = curves.calibration_groups(y, prob, k=5, points=10)
    used = groups[groups[:, 0] > 0]
    assert used[:, 0].sum() == 37 and used[:, 0].min() >= 5 and groups.shape == (10, 3)
    assert used[:, 1].sum() == pytest.approx(prob.sum()) and used[:, 2].sum() == y.sum()
    cal = curves.calibration_curve(groups)
    assert cal["predicted"] == sorted(cal["predicted"])


@pytest.mark.parametrize("seed", range(4))
def test_k_histogram_counts_are_zero_or_at_least_k(seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=40) * (seed + 1)
    edges = np.linspace(-3, 3, 17)
    counts = curves.k_histogram(values, edges, k=5)
    assert counts.sum() == 40
    assert np.all((counts == 0) | (counts >= 5))
    assert np.all(curves.k_histogram(values[:4], edges, k=5) == 0)


def test_delong_variance_matches_the_structural_components_and_a_bootstrap():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(30), np.zeros(45)].astype(int)
    score = rng.normal(size=75) + 0.8 * y
    var = metrics.delong_variance(y, score)
    pos, neg = score[y == 1], score[y == 0]
    v10 = np.array([np.mean([(p > q) + 0.5 * (p == q) for q in neg]) for p in pos])
    v01 = np.array([np.mean([(p > q) + 0.5 * (p == q) for p in pos]) for q in neg])
    assert var == pytest.approx(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg), rel=1e-12)
    boot = []
    for _ in range(2000):
        i, j = rng.integers(0, 30, 30), rng.integers(0, 45, 45)
        boot.append(metrics.roc_auc(np.r_[np.ones(30), np.zeros(45)], np.r_[pos[i], neg[j]]))
    assert var == pytest.approx(np.var(boot), rel=0.25)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (17, 20), (20, 20)])
def test_wilson_interval_matches_scipy(k, n):
    ref = binomtest(k, n).proportion_ci(method="wilson")
    assert metrics.wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_intervals_contain_the_estimates_and_combine_over_sites():
    rec = {"tp": 12, "fn": 3, "tn": 20, "fp": 5, "auc": 0.85, "auc_var": 0.003, "n": 40}
    ci = metrics.intervals(rec)
    r = metrics.rates(rec)
    for key, value in (("auc", 0.85), ("sensitivity", r["sensitivity"]), ("specificity", r["specificity"]),
                       ("balanced_accuracy", r["balanced_accuracy"])):
        assert ci[key][0] < value < ci[key][1]
    combined = metrics.combine_sites([rec, {**rec, "n": 120, "auc_var": 0.001}])
    assert combined["auc_var"] == pytest.approx((40 / 160) ** 2 * 0.003 + (120 / 160) ** 2 * 0.001)


def _evaluate_reply(roc: np.ndarray, cal: np.ndarray) -> RecordDict:
    return RecordDict({
        "metrics": MetricRecord({"num-examples": 30, "tp": 1, "fp": 1, "tn": 1, "fn": 1, "auc": 0.5,
                                 "auc-var": 0.01, "loss": 0.7}),
        "arrays": ArrayRecord({"roc": Array(roc), "calibration": Array(cal)})})


def test_guard_refuses_curve_steps_below_k():
    y = np.r_[np.ones(15), np.zeros(15)]
    prob = np.linspace(0, 1, 30)
    good = _evaluate_reply(curves.roc_points(y, prob, 5, 10), curves.calibration_groups(y, prob, 5, 10))
    check_reply(protocol.EVALUATE, good, k=5, sizes={"p": 10})
    fine = curves.roc_points(y, prob, 1, 10)  # groups of 3 cases: each step would reveal < k cases
    with pytest.raises(PrivacyError, match="'roc' holds a count of 3"):
        check_reply(protocol.EVALUATE, _evaluate_reply(fine, curves.calibration_groups(y, prob, 5, 10)), 5,
                    {"p": 10})
    with pytest.raises(PrivacyError, match="'calibration'"):
        check_reply(protocol.EVALUATE, _evaluate_reply(curves.roc_points(y, prob, 5, 10),
                                                       curves.calibration_groups(y, prob, 2, 10)), 5, {"p": 10})
    with pytest.raises(PrivacyError, match="shape"):
        check_reply(protocol.EVALUATE, _evaluate_reply(curves.roc_points(y, prob, 5, 12),
                                                       curves.calibration_groups(y, prob, 5, 10)), 5, {"p": 10})
