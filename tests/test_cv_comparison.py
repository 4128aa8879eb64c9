"""Cross-validation's paired comparison of model families (internal-validation = "cv"): each site compares the
families over one repeat's out-of-fold scores of all its usable cases (client.outoffold, through the guard); the
server pools sites by inverse variance and averages the repeats (common.delong). Checked against DeLong computed in
one place on the same out-of-fold scores, and the site's refusal of a class of fewer than k cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from scipy.stats import norm
from test_delong import _brute_force

from client import outoffold
from client.guard import PrivacyError, check_reply
from client.nodestate import NodeState
from client.site import SiteError
from common import delong, protocol

NAMES = ["logistic-l2", "logistic-l1", "mlp"]
Z = 1.959963984540054


def _site(rng: np.random.Generator, n: int, repeats: int, folder: Path,
          folds: int = 3) -> tuple[list[str], np.ndarray, NodeState, np.ndarray]:
    """One site: case ids, labels, and its node state after every cross-validation fold scored its held-out cases
    with every family (each repeat deals the cases to folds anew); also the scores (repeats, families, n)."""
    ids = [f"case-{i:03d}" for i in range(n)]
    y = (rng.random(n) < 0.5).astype(np.int64)
    y[:2], y[2:4] = 1, 0
    state = NodeState(RecordDict(), folder)  # the scores' chunks in the site's run folder (client.nodestate)
    every = np.zeros((repeats, len(NAMES), n))
    for r in range(repeats):
        fold = rng.permutation(np.arange(n) % folds)
        for v in range(folds):
            held = fold == v
            for j, family in enumerate(NAMES):  # a fold model's scores: signal, plus noise of its own
                prob = 1 / (1 + np.exp(-((y[held] - 0.5) * (1 + 0.5 * j) + rng.normal(0, 1.0, held.sum()))))
                every[r, j, held] = prob
                outoffold.keep(state, family, r, [c for c, h in zip(ids, held, strict=True) if h], prob)
    return ids, y, state, every


def _reply(state: NodeState, ids: list[str], y: np.ndarray, repeat: int, k: int = 5) -> RecordDict:
    """The site's reply as it leaves: computed by client.outoffold, checked by the real guard."""
    arrays, counts = outoffold.compare_reply(state, NAMES, ids, y, repeat, k)
    reply = RecordDict({"arrays": ArrayRecord({key: Array(v) for key, v in arrays.items()}),
                        "metrics": MetricRecord(counts)})
    check_reply(protocol.COMPARE_OUT_OF_FOLD, reply, k=k, sizes={"f": len(NAMES)})
    return reply


@pytest.mark.parametrize("repeats", [1, 3])
def test_out_of_fold_comparison_equals_delong_on_the_out_of_fold_scores_in_one_place(repeats, tmp_path):
    rng = np.random.default_rng(19)
    sites = [_site(rng, n, repeats, tmp_path / str(n)) for n in (30, 44, 37)]
    federated_repeats = []
    for r in range(repeats):
        replies = []
        for ids, y, state, every in sites:
            reply = _reply(state, ids, y, r)
            arrays = {key: v.numpy() for key, v in reply["arrays"].items()}
            aucs, cov = _brute_force(y, every[r])  # per site: DeLong on its out-of-fold scores, in one place
            np.testing.assert_allclose(arrays["auc"], aucs, atol=1e-10)
            np.testing.assert_allclose(arrays["auc-cov"], cov, atol=1e-10)
            replies.append(delong.from_reply(arrays, int(reply["metrics"]["num-examples"])))
        federated_repeats.append(delong.combine(replies, NAMES))  # the server's pooling over sites

    for b, name in enumerate(NAMES[1:], start=1):
        got = delong.average_repeats([rep[name] for rep in federated_repeats])
        diffs, ses, briers, brier_halves = [], [], [], []
        for r in range(repeats):  # in one place: inverse-variance pooled sites per repeat, then the repeats' mean
            d_sites, w_sites = [], []
            for _, y, _, every in sites:
                aucs, cov = _brute_force(y, every[r])
                d_sites.append(aucs[b] - aucs[0])
                w_sites.append(1 / (cov[b, b] + cov[0, 0] - 2 * cov[0, b]))
            w = np.array(w_sites)
            diffs.append(np.dot(w, d_sites) / w.sum())
            ses.append(np.sqrt(1 / w.sum()))
            y_all = np.concatenate([s[1] for s in sites])
            e = np.hstack([(s[3][r] - s[1]) ** 2 for s in sites])
            d = e[b] - e[0]
            briers.append(d.mean())
            brier_halves.append(Z * d.std(ddof=1) / np.sqrt(len(y_all)))
        diff, se = np.mean(diffs), np.mean(ses)
        assert got["auc_diff"] == pytest.approx(diff, abs=1e-10)
        np.testing.assert_allclose(got["auc_diff_ci"], [diff - Z * se, diff + Z * se], atol=1e-10)
        assert got["p_value"] == pytest.approx(2 * norm.sf(abs(diff / se)), abs=1e-10)
        assert got["brier_diff"] == pytest.approx(np.mean(briers), abs=1e-12)
        half = np.mean(brier_halves)
        np.testing.assert_allclose(got["brier_diff_ci"], [np.mean(briers) - half, np.mean(briers) + half],
                                   atol=1e-10)
        assert got["repeats"] == repeats and got["reference"] == NAMES[0]
        if repeats == 1:  # one repeat: exactly that repeat's pooled comparison
            assert got["auc_diff_ci"] == pytest.approx(federated_repeats[0][name]["auc_diff_ci"], abs=1e-15)


def test_a_site_refuses_an_out_of_fold_comparison_over_a_class_of_fewer_than_k_cases(tmp_path):
    rng = np.random.default_rng(3)
    ids, y, state, _ = _site(rng, 30, 1, tmp_path)
    # the run's k above the site's class size: 4 BM cases in its whole out-of-fold set
    few = np.flatnonzero(y == 0)[:4]
    keep = np.r_[np.flatnonzero(y == 1), few]
    sub_ids, sub_y = [ids[i] for i in keep], y[keep]
    with pytest.raises(SiteError, match=r"needs >= k = 5 .* 4 BM"):
        outoffold.compare_reply(state, NAMES, sub_ids, sub_y, 0, k=5)
    # and had the site sent it, the guard would have stopped the reply: n-bm below k
    reply = _reply(state, ids, y, 0)
    reply["metrics"] = MetricRecord({**dict(reply["metrics"]), "n-bm": 4})
    with pytest.raises(PrivacyError, match="'n-bm' = 4"):
        check_reply(protocol.COMPARE_OUT_OF_FOLD, reply, k=5, sizes={"f": len(NAMES)})


def test_a_site_missing_an_out_of_fold_score_refuses_and_names_the_family(tmp_path):
    rng = np.random.default_rng(4)
    ids, y, state, _ = _site(rng, 20, 2, tmp_path)
    with pytest.raises(SiteError, match="out-of-fold score"):  # repeat 2 was never scored
        outoffold.compare_reply(state, NAMES, ids, y, 2, k=5)
    for family in ("logistic-l2", "mlp"):  # a case the logistic-l1 models of repeat 0 never scored
        outoffold.keep(state, family, 0, ["case-new"], np.array([0.5]))
    with pytest.raises(SiteError, match=r"1 out-of-fold score\(s\) of logistic-l1 are missing"):
        outoffold.compare_reply(state, NAMES, [*ids, "case-new"], np.r_[y, 1], 0, k=5)
