"""The claim bench/bench_value.py rests on: its in-process pipeline (bench/inprocess.py) computes what a real
federation with exact training computes, fold by fold and baseline by baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from federation_helpers import K, run_federation_in

from bench import inprocess
from client.extract import FeatureTable
from client.steps import load_site_data, run_config
from common import exact
from radfed import synth
from radfed.launch import app_run_config


def _tables(seed: int, sizes: tuple[int, ...], d: int = 60) -> dict[str, FeatureTable]:
    """Correlated features, 8 informative, a scanner shift and gain per site."""
    rng = np.random.default_rng(seed)
    mixing = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    effect = np.r_[np.full(8, 0.8), np.zeros(d - 8)]
    tables = {}
    for s, n in enumerate(sizes):
        y = (np.arange(n) % 2 == 0).astype(np.int64)
        x = (rng.normal(size=(n, d)) @ mixing + np.outer(y, effect)) * rng.uniform(0.8, 1.2, d) + rng.normal(0, 1, d)
        tables[f"site-{s}"] = FeatureTable([f"c{i}" for i in range(n)], y, [f"f{j:02d}" for j in range(d)], x + 10)
    return tables


def test_inprocess_fit_is_the_pooled_fit_on_the_concatenated_data():
    tables = _tables(0, (30, 36, 44))
    run = run_config(app_run_config({"training": "exact", "select-features": 8, "select-candidates": 40}))
    federated, pooled = inprocess.fit(tables, run), inprocess.pooled_centralised(tables, run)
    # selection from aggregates = scipy's Welch t + numpy's correlation on the pooled data; exact = scikit-learn
    assert federated.names == pooled.names and len(federated.names) == 8
    np.testing.assert_allclose(federated.mean, pooled.mean, rtol=1e-12)
    np.testing.assert_allclose(federated.scale, pooled.scale, rtol=1e-12)
    np.testing.assert_allclose(federated.coef, pooled.coef, atol=1e-6)
    held = _tables(1, (40,))["site-0"]
    np.testing.assert_allclose(federated.predict(held), pooled.predict(held), atol=1e-6)

    # with two sites, a leave-one-site-out fold is the other site's own model: the same AUC at the held-out site
    two = {s: tables[s] for s in ("site-0", "site-1")}
    loso, local = inprocess.leave_one_site_out(two, run), inprocess.local_only(two, run)
    assert loso["site-0"]["auc"] == local["site-1"]["external"]["site-0"]["auc"]

    # the feature budget per site is exact training's limit, no more
    most = inprocess.max_features(30, run)
    exact.check_dimensions(30, most, min_cases_per_parameter=run.exact_min_cases_per_coefficient)
    with pytest.raises(ValueError, match="too few"):
        exact.check_dimensions(30, most + 1, min_cases_per_parameter=run.exact_min_cases_per_coefficient)


def test_inprocess_numbers_equal_a_real_federations(tmp_path):
    """Every leave-one-site-out AUC and every local-only model's AUC at each other site, exact training with
    ComBat: the real run's metrics.json against bench/inprocess.py on the same cases."""
    root = tmp_path / "data"
    for i, spec in enumerate(synth.tiny_sites(2, 12)):
        synth.write_site(root, spec, seed=500 + i)
    # 3 features: the main run's cross-validation folds train on one of two blocks per class (>= 10 cases)
    config = {"training": "exact", "harmonization": "combat", "select-features": 3, "external-validation": "loso",
              "local-only": "own-pipeline", "internal-validation": "cv", "cv-folds": 2}
    folder = run_federation_in(tmp_path / "run", root, 2, **config)
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    run = app_run_config({**config, "data-root": str(root), "min-cases-per-class": K})
    tables = {d.name: load_site_data(d, run).table for d in sorted(root.iterdir()) if (d / "manifest.csv").exists()}
    parsed = run_config(run)
    loso, local = inprocess.leave_one_site_out(tables, parsed), inprocess.local_only(tables, parsed)
    for h, record in loso.items():
        assert doc["validation"]["loso"][h]["n"] == record["n"]
        assert doc["validation"]["loso"][h]["auc"] == pytest.approx(record["auc"], abs=1e-9)
        assert doc["validation"]["loso"][h]["features"] == inprocess.fit(
            {s: t for s, t in tables.items() if s != h}, parsed).names
    for s, record in local.items():
        for h, scored in record["external"].items():
            assert doc["validation"]["local_only"][s]["external"][h]["auc"] == pytest.approx(scored["auc"], abs=1e-9)
