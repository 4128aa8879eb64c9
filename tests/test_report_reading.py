"""What a reader of the report sees first and trusts: the result on the first screen at phone and desktop widths,
no element running off the page, a ROC line only where its area is the AUC printed beside it, the model's
features in words with their weights, and the intervals too wide to read named."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure
from report_helpers import make_result, probe_report

from common import clinical as cc
from server import clinical, plots, report
from server.report_headline import TOO_WIDE

K = 5
PHONE, DESKTOP = (390, 844), (1280, 800)


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("demo-data")
    (root / report.DEMO_STAMP).write_text(json.dumps({"seed": 0, "sites": []}))
    result = make_result(tmp_path_factory.mktemp("run"), root)
    result.validation["federation_gain"] = {"overall": {"federated_auc": 0.851, "local_only_auc": 0.767,
                                                        "gain": 0.084, "gain_ci": [0.01, 0.159], "sites": 4}}
    out = json.loads(json.dumps(result.as_json(), allow_nan=False))
    out["final"]["sites"]["hospital-c"]["ci"]["auc"] = [0.25, 0.9]  # a small site's interval, as in the demo
    return out


@pytest.fixture(scope="module")
def page(doc: dict[str, Any]) -> str:
    return report.render_html(doc)


def _text(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def _loso_auc(doc: dict[str, Any]) -> float:
    folds = doc["validation"]["loso"].values()
    return sum(f["auc"] * f["n"] for f in folds) / sum(f["n"] for f in folds)


@pytest.mark.parametrize("width,height", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_the_result_is_on_the_first_screen_and_nothing_runs_off_the_page(page, doc, tmp_path, width, height):
    probe = probe_report(page, tmp_path / "run", width, height)
    assert "error" not in probe, probe
    assert probe["sections"][0] == "headline"
    head = probe["headline"]
    assert head["bottom"] <= height, f"the result ends at {head['bottom']} px, below the first screen ({height})"
    text = " ".join(head["text"].split())
    assert f"AUC {_loso_auc(doc):.3f}" in text  # at unseen hospitals, before any hash or setting
    assert "gain +0.084" in text and f"pooled AUC {doc['final']['pooled']['auc']:.3f}" in text
    assert probe["pageWidth"] <= probe["view"] == width
    assert probe["overflowing"] == [], probe["overflowing"][:10]


def test_a_wide_site_table_would_overflow_a_phone_without_the_narrow_layout(page, tmp_path):
    """The check above can fail: the same page with the narrow-screen rules removed runs off a phone's width."""
    narrow = re.search(r"@media \(max-width:600px\)\{.*?\}\}", page, re.S)
    assert narrow, "the report has no narrow-screen rules"
    probe = probe_report(page.replace(narrow.group(0), ""), tmp_path / "run", *PHONE)
    assert probe["overflowing"], "expected the wide tables to overflow without the narrow layout"


def test_roc_draws_a_line_only_where_its_area_is_the_auc_beside_it(doc):
    pooled = doc["final"]["pooled"]
    sites = doc["final"]["sites"]
    fig = Figure()
    ax = fig.subplots()
    plots.draw_roc(ax, {n: s["roc"] for n, s in sites.items()}, "roc", {n: s["auc"] for n, s in sites.items()},
                   pooled=pooled["roc"], pooled_auc=pooled["auc"])
    lines = [line for line in ax.lines if line.get_linestyle() not in ("None", "none", "")]
    labels = sorted(line.get_label() for line in lines)
    assert labels == [f"all sites pooled (AUC {pooled['auc']:.2f})", "chance"]
    (curve,) = [line for line in lines if line.get_label() != "chance"]
    x, y = curve.get_data()
    assert abs(np.trapezoid(y, x) - pooled["auc"]) < 0.01
    markers = [line for line in ax.lines if line.get_linestyle() in ("None", "none", "")]
    assert len(markers) == len(sites)  # each site's operating points, not joined


def test_the_pooled_roc_area_is_the_pooled_auc_on_random_sites():
    """server.clinical.pooled's curve against its own AUC, over many random federations and bin counts."""
    rng = np.random.default_rng(11)
    for _ in range(60):
        bins, terms = int(rng.integers(4, 60)), {}
        for s in range(int(rng.integers(1, 6))):
            n = int(rng.integers(2 * K + 4, 80))
            y = np.r_[np.ones(n // 2 + int(rng.integers(0, 3))), np.zeros(n - n // 2)][:n].astype(int)
            prob = 1 / (1 + np.exp(-(rng.normal(0, 2, n) + y * rng.uniform(-1, 4))))
            h = cc.site_score_histograms(y, prob, cc.score_edges(bins), K)
            terms[f"s{s}"] = {"start": h["start"], "end": h["end"], **cc.site_brier_terms(y, prob, K),
                              **cc.site_decision_counts(y, prob, cc.decision_thresholds(9), K)}
        out = clinical.pooled(terms, bins, 9)
        area = np.trapezoid(out["roc"]["tpr"], out["roc"]["fpr"])
        assert abs(area - out["auc"]) < 1e-12
        assert out["auc_low"] - 1e-12 <= area <= out["auc_high"] + 1e-12


def test_selected_features_in_words_with_weight_and_direction(doc, page):
    section = re.search(r'<section id="features">(.*?)</section>', page, re.S).group(1)
    rows = [[_text(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r)]
            for r in re.findall(r"<tr>(.*?)</tr>", section, re.S)][1:]
    weights = doc["features"]["weights"]
    assert [r[-1] for r in rows] == sorted(weights, key=lambda n: -abs(weights[n]))  # largest weight first
    top = rows[0]
    assert top[0] == "mean (intensity) of the enhancing tumour on FLAIR"
    assert top[1] == "-0.900" and top[2] == "BM"
    assert rows[1][2] == "HGG"


def test_intervals_too_wide_to_read_are_named(doc, page):
    head = _text(re.search(r'<section id="headline">(.*?)</section>', page, re.S).group(1))
    wide = [n for n, s in doc["final"]["sites"].items() if s["ci"]["auc"][1] - s["ci"]["auc"][0] > TOO_WIDE]
    narrow = [n for n, s in doc["final"]["sites"].items() if n not in wide]
    assert wide and narrow, "the document should hold both kinds of site"
    for name in wide:
        assert f"{name} internal AUC" in head
    for name in narrow:
        assert f"{name} internal AUC" not in head


def test_an_unfinished_run_says_so_first(tmp_path: Path):
    result = make_result(tmp_path / "run", tmp_path)
    result.status, result.error = "failed", "site hospital-b stopped answering"
    text = _text(report.render_html(json.loads(json.dumps(result.as_json(), allow_nan=False))))
    assert "This run did not complete (failed: site hospital-b stopped answering)" in text
    assert text.index("did not complete") < text.index("Summary")


def test_the_harmonisation_section_says_whether_combat_helped(doc, page):
    share = doc["harmonization"]["site_share"]
    before = np.array(share["before"], dtype=float)
    after = np.array([np.nan if v is None else v for v in share["after"]], dtype=float)
    section = _text(re.search(r'<section id="harmonization">(.*?)</section>', page, re.S).group(1))
    ok = after[np.isfinite(after)]
    assert f"Before ComBat: median {np.median(before):.3f}; {int(np.sum(before > 0.1))} of {len(before)} features" \
        in section
    assert f"After: median {np.median(ok):.3f}; {int(np.sum(ok > 0.1))} of {len(ok)} features above 0.1" in section
    first = next(iter(doc["features"]["selected"]))
    i = share["features"].index(first)
    assert f"{first} {before[i]:.3f} {after[i]:.3f}" in section  # each model feature, before and after
