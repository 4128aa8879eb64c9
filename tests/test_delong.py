"""Paired DeLong from per-site aggregates (common/delong.py) against brute force, an independent rank-based
implementation (scipy), and the same comparison computed in one place from every site's scores."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from scipy.stats import norm, rankdata

from client import compute
from client.guard import PrivacyError, check_reply
from common import delong, metrics, protocol


def _site(rng: np.random.Generator, n: int, f: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    y = np.r_[np.ones(n // 2), np.zeros(n - n // 2)]
    base = y + rng.normal(0, 1.2, n)
    scores = np.array([1 / (1 + np.exp(-(base * (0.5 + 0.4 * j) + rng.normal(0, 0.7, n)))) for j in range(f)])
    return y, np.round(scores, 1) if ties else scores


def _brute_force(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components by explicit loops over every (positive, negative) pair."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    f = len(scores)
    v10, v01 = np.zeros((f, len(pos))), np.zeros((f, len(neg)))
    for r in range(f):
        for a, i in enumerate(pos):
            for b, j in enumerate(neg):
                psi = 1.0 if scores[r, i] > scores[r, j] else 0.5 if scores[r, i] == scores[r, j] else 0.0
                v10[r, a] += psi / len(neg)
                v01[r, b] += psi / len(pos)
    cov = np.zeros((f, f))
    for r in range(f):
        for s in range(f):
            s10 = np.sum((v10[r] - v10[r].mean()) * (v10[s] - v10[s].mean())) / (len(pos) - 1)
            s01 = np.sum((v01[r] - v01[r].mean()) * (v01[s] - v01[s].mean())) / (len(neg) - 1)
            cov[r, s] = s10 / len(pos) + s01 / len(neg)
    return v10.mean(axis=1), cov


def _fast_delong_scipy(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sun & Xu (2014) fast DeLong with scipy's mid-ranks: components from ranks, no pairwise comparison."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx = np.array([rankdata(r) for r in pos])
    ty = np.array([rankdata(r) for r in neg])
    tz = np.array([rankdata(r) for r in np.hstack([pos, neg])])
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v01 = (tz[:, :m] - tx) / n
    v10 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return aucs, cov


@pytest.mark.parametrize("ties", [False, True])
def test_paired_covariance_equals_brute_force_and_a_rank_based_implementation(ties):
    rng = np.random.default_rng(11)
    y, scores = _site(rng, 37, 3, ties)
    aucs, cov = delong.paired_delong(y, scores)
    brute_aucs, brute_cov = _brute_force(y, scores)
    np.testing.assert_allclose(aucs, brute_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, brute_cov, atol=1e-12)
    fast_aucs, fast_cov = _fast_delong_scipy(y, scores)
    np.testing.assert_allclose(aucs, fast_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, fast_cov, atol=1e-12)
    for r in range(3):  # each diagonal entry is the single-model DeLong variance a site already sends
        assert cov[r, r] == pytest.approx(metrics.delong_variance(y, scores[r]), abs=1e-14)
        assert aucs[r] == pytest.approx(metrics.roc_auc(y, scores[r]), abs=1e-14)


def test_federated_comparison_equals_the_same_comparison_in_one_place():
    """Each site's reply (client.compute.compare_reply, through the guard) combined by the server equals the
    comparison computed from every site's scores in one place: per site the brute-force DeLong, inverse-variance
    pooled; the Brier difference over all cases pooled together."""
    rng = np.random.default_rng(5)
    sites = [_site(rng, n, 3) for n in (24, 40, 31)]
    names = ["logistic-l2", "svm", "mlp"]
    replies = []
    for y, scores in sites:
        arrays, counts = compute.compare_reply(y, scores, k=5)
        reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                            "metrics": MetricRecord(counts)})
        check_reply(protocol.COMPARE, reply, k=5, sizes={"f": 3})
        replies.append(delong.from_reply({k: v.numpy() for k, v in reply["arrays"].items()},
                                         int(counts["num-examples"])))
    federated = delong.combine(replies, names)

    y_all = np.concatenate([y for y, _ in sites])
    s_all = np.hstack([s for _, s in sites])
    for b, name in enumerate(names[1:], start=1):
        diffs, variances = [], []
        for y, scores in sites:
            aucs, cov = _brute_force(y, scores)
            diffs.append(aucs[b] - aucs[0])
            variances.append(cov[b, b] + cov[0, 0] - 2 * cov[0, b])
        w = 1 / np.array(variances)
        diff, se = np.dot(w, diffs) / w.sum(), np.sqrt(1 / w.sum())
        got = federated[name]
        assert got["auc_diff"] == pytest.approx(diff, abs=1e-10)
        np.testing.assert_allclose(got["auc_diff_ci"], [diff - 1.959963984540054 * se, diff + 1.959963984540054 * se],
                                   atol=1e-10)
        assert got["p_value"] == pytest.approx(2 * norm.sf(abs(diff / se)), abs=1e-10)
        d = (s_all[b] - y_all) ** 2 - (s_all[0] - y_all) ** 2
        assert got["brier_diff"] == pytest.approx(d.mean(), abs=1e-12)
        half = 1.959963984540054 * d.std(ddof=1) / np.sqrt(len(d))
        np.testing.assert_allclose(got["brier_diff_ci"], [d.mean() - half, d.mean() + half], atol=1e-10)
        assert got["reference"] == "logistic-l2" and got["n"] == len(y_all)


def test_a_site_refuses_a_comparison_over_a_class_of_fewer_than_k_cases_and_the_guard_holds_the_shapes():
    rng = np.random.default_rng(6)
    y, scores = _site(rng, 9, 2)  # 4 HGG
    with pytest.raises(Exception, match="needs >= k = 5"):
        compute.compare_reply(y, scores, k=5)
    y, scores = _site(rng, 12, 2)
    arrays, counts = compute.compare_reply(y, scores, k=5)
    reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                        "metrics": MetricRecord(counts)})
    with pytest.raises(PrivacyError, match="auc"):  # the run lists 3 families, the reply holds 2
        check_reply(protocol.COMPARE, reply, k=5, sizes={"f": 3})
    counts_small = {**counts, "n-bm": 4}
    reply["metrics"] = MetricRecord(counts_small)
    with pytest.raises(PrivacyError, match="'n-bm' = 4"):
        check_reply(protocol.COMPARE, reply, k=5, sizes={"f": 2})
