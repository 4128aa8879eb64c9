"""What the federation gained at unseen sites (common.metrics.federation_gain) and how the report says it."""

from __future__ import annotations

import numpy as np
import pytest

from common import metrics
from server.report_validation import calibration_sentence, gain_sentence, gain_table


def _loso() -> dict:
    return {"a": {"n": 20, "auc": 0.90, "auc_var": 0.004}, "b": {"n": 60, "auc": 0.80, "auc_var": 0.002},
            "c": {"error": "could not score the model"}}


def _local() -> dict:
    return {"a": {"external": {"b": {"n": 60, "auc": 0.70, "auc_var": 0.003},
                               "c": {"n": 10, "auc": 0.5, "auc_var": 0.01}}},
            "b": {"external": {"a": {"n": 20, "auc": 0.60, "auc_var": 0.005},
                               "c": {"n": 10, "auc": 0.6, "auc_var": 0.01}}},
            "c": {"external": {"a": {"n": 20, "auc": 0.80, "auc_var": 0.001},
                               "b": {"n": 60, "auc": float("nan"), "auc_var": float("nan")}}}}


def test_gain_per_unseen_site_and_overall_by_hand():
    gain = metrics.federation_gain(_loso(), _local())
    a, b = gain["sites"]["a"], gain["sites"]["b"]
    assert sorted(gain["sites"]) == ["a", "b"]  # c's fold failed: no federated AUC to compare there
    assert a["local_only_auc"] == pytest.approx((0.60 + 0.80) / 2) and a["local_models"] == 2
    assert a["gain"] == pytest.approx(0.90 - 0.70)
    assert a["gain_var"] == pytest.approx(0.004 + (0.005 + 0.001) / 4)
    assert b["local_only_auc"] == pytest.approx(0.70) and b["local_models"] == 1  # c alone scored NaN at b
    assert b["gain"] == pytest.approx(0.10) and b["gain_var"] == pytest.approx(0.002 + 0.003)
    half = 1.959963984540054 * np.sqrt(b["gain_var"])
    assert b["gain_ci"] == pytest.approx([0.10 - half, 0.10 + half])
    overall = gain["overall"]
    w = np.array([20, 60]) / 80
    assert overall["gain"] == pytest.approx(w @ [0.20, 0.10])
    assert overall["gain_var"] == pytest.approx(w**2 @ [a["gain_var"], b["gain_var"]])
    assert overall["sites"] == 2 and overall["n"] == 80


def test_the_sentence_says_what_the_interval_allows():
    doc = {"validation": {"federation_gain": metrics.federation_gain(_loso(), _local())}}
    text = gain_sentence(doc)
    assert text is not None and "gain +0.125" in text and "the federation helped" in text
    header, rows = gain_table(doc)
    assert [r[0] for r in rows] == ["a", "b"] and rows[0][3].startswith("+0.200 (95% CI")
    doc["validation"]["federation_gain"]["overall"]["gain_ci"] = [-0.05, 0.2]
    assert "too few or too small to tell" in str(gain_sentence(doc))
    doc["validation"]["federation_gain"]["overall"].update(gain=-0.1, gain_ci=[-0.2, -0.01])
    assert "each hospital alone did better" in str(gain_sentence(doc))
    assert gain_sentence({"validation": {}}) is None and gain_table({})[1] == []


def test_the_calibration_at_unseen_sites_says_what_its_interval_allows():
    """The held-out sites' slopes pooled by inverse variance (common.metrics.pool_slopes), read in one sentence."""
    fits = [{"slope": 0.5, "slope_se": 0.1}, {"slope": 0.7, "slope_se": 0.2}, {"error": "did not converge"}]
    doc = {"validation": {"loso_calibration": metrics.pool_slopes(fits)}}
    text = str(calibration_sentence(doc))
    assert "0.54 (95% CI" in text and "over 2 held-out site(s)" in text and "too extreme" in text
    doc["validation"]["loso_calibration"] = metrics.pool_slopes([{"slope": 1.6, "slope_se": 0.2}])
    assert "too timid" in str(calibration_sentence(doc))
    doc["validation"]["loso_calibration"] = metrics.pool_slopes([{"slope": 0.9, "slope_se": 0.2}])
    assert "no miscalibration shown" in str(calibration_sentence(doc))
    assert calibration_sentence({"validation": {"loso_calibration": metrics.pool_slopes([])}}) is None
    assert calibration_sentence({"validation": {}}) is None
