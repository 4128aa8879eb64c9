"""Cross-validated internal validation (internal-validation = "cv"): folds of whole release blocks, every case
scored by a model refitted without its fold, checked against the pooled fit computed in one process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from federation_helpers import K, events, run_federation_in
from scipy.stats import norm
from test_delong import _brute_force

from client.steps import load_site_data, plan_reply, site_matrix
from common import exact, metrics, moments
from common.release import assign_folds
from common.split import parse_cv_tag
from radfed import synth
from radfed.launch import app_run_config
from server.report_families import difference_rows


def test_folds_are_whole_blocks_dealt_in_turn_by_a_keyed_order():
    blocks = [f"b{i}" for i in range(7)]
    folds = assign_folds(b"secret", blocks, 3, seed=4)
    assert sorted(folds) == blocks and sorted(np.bincount(list(folds.values()))) == [2, 2, 3]
    assert assign_folds(b"secret", blocks, 3, seed=4) == folds  # the same secret and seed: the same folds
    assert assign_folds(b"secret", blocks, 3, seed=5) != folds  # the seed the site approves moves whole blocks
    assert assign_folds(b"other", blocks, 3, seed=4) != folds  # and the coordinator cannot aim without the secret


def test_a_site_with_fewer_blocks_than_folds_says_so_at_the_plan(tmp_path):
    [spec] = synth.tiny_sites(1, 12)  # 12 per class: two release blocks of k = 5 each
    site = synth.write_site(tmp_path, spec, seed=3)
    config = app_run_config({"data-root": str(tmp_path), "internal-validation": "cv", "cv-folds": 3,
                             "min-cases-per-class": K})
    reply, _ = plan_reply(site, config)
    assert reply["status"] == "ineligible" and "lower cv-folds" in reply["reason"]
    reply, _ = plan_reply(site, {**config, "cv-folds": 2})
    assert reply["status"] == "ok", reply["reason"]


FAMILIES = {"logistic-l2": 0.0, "logistic-l1": 4.0}  # family -> its L1 penalty (model-l1): rankings differ


def test_every_case_is_scored_out_of_fold_by_the_pooled_fit_without_its_fold(tmp_path):
    """Two families (exact L2 and L1 logistic): every case's out-of-fold score per family and repeat reproduced by
    the pooled fit without its fold; the run's metrics, its choice of model and the families' paired comparison
    under cross-validation all follow from those scores."""
    root = tmp_path / "data"
    for i, spec in enumerate(synth.tiny_sites(2, 12)):
        synth.write_site(root, spec, seed=800 + i)
    config = {"training": "exact", "harmonization": "none", "select-features": 3, "external-validation": "none",
              "local-only": "none", "internal-validation": "cv", "cv-folds": 2, "cv-repeats": 2,
              "models": ",".join(FAMILIES), "model-l1": FAMILIES["logistic-l1"]}
    folder = run_federation_in(tmp_path / "cv", root, 2, **config)
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    names = sorted(doc["sites"])
    full = app_run_config({**config, "data-root": str(root), "min-cases-per-class": K})
    data = {n: load_site_data(root / n, full) for n in names}
    agreed = sorted(set.intersection(*(
        {f for f, ok in zip(d.table.names, np.all(np.isfinite(d.table.values), 0), strict=True) if ok}
        for d in data.values())))
    folds = {e["data"]["fold"]: e["data"] for e in events(folder) if e["event"] == "cross-validation"}
    assert sorted(folds) == ["cv:0:0", "cv:0:1", "cv:1:0", "cv:1:1"]
    # per family and site, (repeat, case): the score of the pooled fit without the case's fold
    oof = {f: {n: np.full((2, len(d.table.case_ids)), np.nan) for n, d in data.items()} for f in FAMILIES}
    for tag, entry in folds.items():
        (r, v), chosen = parse_cv_tag(tag), entry["features"]
        views = {n: d.fold_view(tag) for n, d in data.items()}
        train = [site_matrix(views[n], agreed, held_out=False, names=chosen) for n in names]
        mean, std = moments.pooled_mean_std(*zip(*(moments.site_moments(x) for x, _ in train), strict=True))
        y = np.concatenate([t[1] for t in train])
        for family, l1 in FAMILIES.items():
            fit = exact.fit_exact([((x - mean) / std, yy) for x, yy in train],
                                  float(np.sum(y == 0) / np.sum(y == 1)), l2=1.0, l1=l1)
            for n in names:
                assert views[n].held_out.sum() > 0 and np.all(views[n].held_out == (data[n].cv_fold[r] == v))
                x_test, _ = site_matrix(views[n], agreed, held_out=True, names=chosen)
                oof[family][n][r, views[n].held_out] = 1 / (1 + np.exp(-((x_test - mean) / std @ fit.coef[1:]
                                                                         + fit.coef[0])))
    assert any(np.any(data[n].cv_fold[0] != data[n].cv_fold[1]) for n in names)  # the repeats deal blocks anew
    for family in FAMILIES:  # every usable case got a score from each repeat's fold that held it out
        assert not any(np.isnan(oof[family][n]).any() for n in names)
    mean_oof = {f: {n: oof[f][n].mean(axis=0) for n in names} for f in FAMILIES}  # the site evaluates their mean

    # the model choice (internal-auc) under cross-validation is the out-of-fold AUC: n-weighted over the sites
    fam = doc["families"]
    internal = {f: np.average([metrics.roc_auc(data[n].table.labels, mean_oof[f][n]) for n in names],
                              weights=[len(data[n].table.case_ids) for n in names]) for f in FAMILIES}
    for f in FAMILIES:
        assert fam["rows"][f]["internal"]["auc"] == pytest.approx(internal[f], abs=1e-9)
    best = max(FAMILIES, key=lambda f: (internal[f], -list(FAMILIES).index(f)))
    assert fam["chosen"] == best and fam["internal_validation"] == "cv"
    for n in names:  # the run's internal metrics are the chosen family's out-of-fold ones
        site = doc["final"]["sites"][n]
        assert site["n"] == len(data[n].table.case_ids) == doc["sites"][n]["split"]["n-cases"]
        assert site["auc"] == pytest.approx(metrics.roc_auc(data[n].table.labels, mean_oof[best][n]), abs=1e-9)
    assert "cross-validation" in doc["notes"]["internal_validation"]

    # the paired comparison under cross-validation: per repeat, DeLong on each site's out-of-fold scores (computed
    # here in one place), sites pooled by inverse variance; then the repeats' mean difference and mean std error
    cv_pairs = fam["comparison"]["cv"]
    assert fam["comparison"]["internal"] == {} and cv_pairs["reference"] == "logistic-l2"
    diffs, ses, briers = [], [], []
    for r in range(2):
        d_sites, w_sites = [], []
        for n in names:
            y_n = data[n].table.labels
            aucs, cov = _brute_force(y_n, np.array([oof[f][n][r] for f in FAMILIES]))
            per_site = dict(zip(FAMILIES, aucs, strict=True))
            assert cv_pairs["repeats"][r]["sites"][n] == pytest.approx(per_site, abs=1e-10)
            var = cov[1, 1] + cov[0, 0] - 2 * cov[0, 1]
            if var > 1e-15:  # a site ranking every case alike under both carries no information (as the server)
                d_sites.append(aucs[1] - aucs[0])
                w_sites.append(1 / var)
        assert w_sites, f"repeat {r}: no site told the two families apart; choose a model-l1 that does"
        w = np.array(w_sites)
        diffs.append(np.dot(w, d_sites) / w.sum())
        ses.append(np.sqrt(1 / w.sum()))
        e = {f: np.concatenate([(oof[f][n][r] - data[n].table.labels) ** 2 for n in names]) for f in FAMILIES}
        briers.append(np.mean(e["logistic-l1"] - e["logistic-l2"]))
    got, diff, se = cv_pairs["pairs"]["logistic-l1"], np.mean(diffs), np.mean(ses)
    assert got["auc_diff"] == pytest.approx(diff, abs=1e-10) and got["repeats"] == 2
    np.testing.assert_allclose(got["auc_diff_ci"], [diff - 1.959963984540054 * se, diff + 1.959963984540054 * se],
                               atol=1e-10)
    assert got["p_value"] == pytest.approx(2 * norm.sf(abs(diff / se)), abs=1e-10)
    assert got["brier_diff"] == pytest.approx(np.mean(briers), abs=1e-8)
    compared = [e["data"] for e in events(folder) if e["event"] == "family-comparison"]
    # one comparison per repeat over every case; none per fold (its result would go unused)
    assert [(c["split"], c["repeat"]) for c in compared] == [("out-of-fold", 0), ("out-of-fold", 1)]
    [row] = difference_rows(fam)  # the report's difference table and forest plot: this one line
    assert row[:2] == ("logistic-l1", "internal (CV)") and row[2] == pytest.approx(diff, abs=1e-10)
    report = (folder / "report.md").read_text(encoding="utf-8")
    assert f"{row[2]:+.3f} ({row[3]:+.3f} to {row[4]:+.3f})" in report.split("## Model families", 1)[1]

    # the pooled clinical metrics cover the out-of-fold scores of every case: the exact pooled AUC lies in the
    # stated range, the Brier score is exact
    from sklearn.metrics import brier_score_loss, roc_auc_score

    y_all = np.concatenate([data[n].table.labels for n in names])
    p_all = np.concatenate([mean_oof[best][n] for n in names])
    pooled = doc["final"]["pooled"]
    assert pooled["n"] == len(y_all) and pooled["sites"] == names
    assert pooled["auc_low"] - 1e-12 <= roc_auc_score(y_all, p_all) <= pooled["auc_high"] + 1e-12
    assert pooled["brier"] == pytest.approx(brier_score_loss(y_all, p_all), rel=1e-9)
    assert "skipped" in pooled["calibration"]
    # the final model trained on every case: the main run's Newton terms covered all of each site's cases
    final_round = max(r["round"] for r in doc["rounds"])
    assert {s: r["n"] for s, r in doc["rounds"][-1]["train"]["sites"].items()} == {
        n: len(data[n].table.case_ids) for n in names} and doc["final"]["round"] == final_round
