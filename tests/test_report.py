"""The run report: every section from a full metrics document, graceful "not available" lines for a refused
run and an older one, self-containment (embedded PNGs only), escaping, and a real render in headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib import image as mpimg
from report_helpers import EVIL_FEATURE, SITES, chromium_path, make_result, probe_report, run_chromium

from common.profile import load_profile
from server import report

SECTION_IDS = ("headline", "summary", "model-card", "final", "roc", "calibration", "clinical", "training",
               "harmonization", "robustness", "features", "validation", "families")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_SRC = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
TAB_BLUE = np.array([31, 119, 180])  # the first site's colour in every figure


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo-data")
    (root / report.DEMO_STAMP).write_text(json.dumps({"seed": 0, "sites": [{"name": n} for n in SITES]}))
    return root


@pytest.fixture(scope="module")
def full_doc(tmp_path_factory: pytest.TempPathFactory, demo_root: Path) -> dict[str, Any]:
    doc = make_result(tmp_path_factory.mktemp("run"), demo_root).as_json()
    return json.loads(json.dumps(doc, allow_nan=False))  # exactly what metrics.json holds


@pytest.fixture(scope="module")
def full_page(full_doc: dict[str, Any]) -> str:
    return report.render_html(full_doc)


def refused_doc(tmp_path: Path) -> dict[str, Any]:
    result = report.RunResult(run_id=7, folder=tmp_path, profile=load_profile("default"),
                              config={"data-root": "/data/hospitals", "harmonization": "combat",
                                      "num-server-rounds": 20},
                              status="refused", error="site hospital-b uses profile abc123, not def456", seconds=3.0)
    return json.loads(json.dumps(result.as_json(), allow_nan=False))


def older_doc(full: dict[str, Any]) -> dict[str, Any]:
    """A radfed.metrics/1 document from before intervals, curves, histograms and validation."""
    doc = json.loads(json.dumps(full))
    for key in ("harmonization", "validation"):
        doc.pop(key)
    doc["final"].pop("pooled")
    for site in doc["final"]["sites"].values():
        for key in ("ci", "roc", "calibration", "auc_var"):
            site.pop(key, None)
    doc["final"]["aggregate"].pop("ci", None)
    return doc


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b64, validate=True) for b64 in IMG_SRC.findall(page)]


def _table_rows(fragment: str) -> list[list[str]]:
    """The text of every table row's cells in an HTML fragment."""
    return [[html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", fragment, re.S)]


def _section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert match, f"section {sid} missing"
    return match.group(1)


# ---------------------------------------------------------------------------------------------- tests


def test_full_report_has_every_section_and_valid_images(full_doc, full_page):
    page = full_page
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page
    assert "not available" not in page
    images = _images(page)
    # ROC, calibration, decision curve, training, 4 of the 6 harmonisation features, leave-one-site-out ROC
    assert len(images) == page.count("<img ") == 9
    for png in images:
        assert png.startswith(PNG_SIGNATURE)
        assert len(png) > 10_000  # a drawn figure, not an empty canvas
        pixels = mpimg.imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert np.ptp(pixels[..., :3]) > 0.5
        assert np.sum(np.ptp(pixels[..., :3], axis=-1) > 0.3) > 200  # coloured site lines were drawn
    for sid, n in (("roc", 1), ("calibration", 1), ("clinical", 1), ("training", 1), ("harmonization", 4),
                   ("validation", 1)):
        assert _section(page, sid).count("<img ") == n, sid
    assert "showing 4 of 6 features" in page
    assert len(page) < 1_000_000  # modest: small figures at 100 dpi


def test_model_card_counts_profile_and_honest_limits(full_doc, full_page):
    card = _section(full_page, "model-card")
    prof = full_doc["profile"]
    assert prof["sha256"] in card and prof["name"] in card and prof["version"] in card
    assert "Not a diagnostic device" in card
    assert "Synthetic demo data" in card and "harmonisation was fitted on these sites" in card
    assert "Synthetic demo data" not in report.render_markdown({**full_doc, "sites": {"real-hospital": {}}})
    assert "threshold is fixed at 0.5" in card and "leaving out one of these 4 sites" in card
    rows = {r[0]: r[1:] for r in _table_rows(card)}
    assert rows["hospital-a"][:5] == ["40", "40", "0", "80", "0"]  # HGG, BM, unusable rows, usable, failed
    assert rows["hospital-a"][7:] == ["12", "12"]  # held-out HGG, BM
    assert rows["all sites"][:2] == [str(sum(40 + 10 * i for i in range(4)))] * 2
    assert "held-out sets of 24–42 cases per site" in card


def test_intervals_in_html_and_markdown(full_doc, full_page):
    header, rows = report.final_table(full_doc)
    assert header[2:] == ["AUC (95% CI)", "sensitivity (95% CI)", "specificity (95% CI)", "balanced acc. (95% CI)"]
    interval = re.compile(r"^\d\.\d{3} \(\d\.\d\d–\d\.\d\d\)$")
    assert all(interval.match(cell) for row in rows for cell in row[2:]), rows
    site = full_doc["final"]["sites"]["hospital-a"]
    lo, hi = site["ci"]["auc"]
    expected = f"{site['auc']:.3f} ({lo:.2f}–{hi:.2f})"
    assert expected in full_page
    md = report.render_markdown(full_doc)
    assert "| site | held-out cases | AUC (95% CI) | sensitivity (95% CI) |" in md
    assert f"| hospital-a | {site['n']} | {expected} |" in md
    assert "| held-out site | trained on | cases | AUC (95% CI) |" in md  # leave-one-site-out table
    assert "## Calibration" in md and "| site | bin | mean predicted |" in md
    assert "![" not in md and "data:image" not in md  # tables, no images


def test_clinical_section_states_the_pooled_auc_bound_and_which_auc_is_which(full_doc, full_page):
    pooled = full_doc["final"]["pooled"]
    section = html.unescape(_section(full_page, "clinical"))
    assert f"{pooled['auc']:.3f} (95% CI {pooled['auc_ci'][0]:.2f}–{pooled['auc_ci'][1]:.2f})" in section
    assert (f"the exact pooled AUC lies between {pooled['auc_low']:.3f} and {pooled['auc_high']:.3f}, so within "
            f"{pooled['auc_bound']:.3f} of {pooled['auc']:.3f}") in section
    assert f"{full_doc['final']['aggregate']['auc']:.3f}: the mean of the site AUCs weighted by held-out cases" \
        in section
    cal = pooled["calibration"]
    assert cal["converged"] and f"{cal['slope']:.3f} ± {cal['slope_se']:.3f} (SE)" in section
    assert f"{pooled['brier']:.3f}: mean squared difference" in section
    md = report.render_markdown(full_doc)
    assert "| threshold | net benefit: model | treat all | treat none |" in md
    assert md.count("| 0.05 |") == 1 and "### " not in md.split("## Clinical metrics")[1].split("## ")[0]
    # a site that withheld a threshold: the table gives the range the pooled value lies in
    kept = pooled["net_benefit"]["kept_by_every_site"]
    if not all(kept):
        i = kept.index(False)
        low, high = pooled["net_benefit"]["model_low"][i], pooled["net_benefit"]["model_high"][i]
        assert f"{low:.3f} to {high:.3f}" in md


def test_report_is_self_contained(full_doc, full_page):
    page = full_page
    lowered = page.lower()
    for forbidden in ("http://", "https://", "//cdn", "<script", "<link", "@import", "url(", "<iframe", "<object"):
        assert forbidden not in lowered, forbidden
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', page))
    assert "default-src 'none'; img-src data:" in page  # the browser refuses anything else


def test_text_is_escaped(full_doc, full_page):
    page = full_page
    assert "<b>x</b>" not in page and "<i>glcm</i>" not in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "&lt;i&gt;glcm&lt;/i&gt;" in page
    md = report.render_markdown(full_doc)
    assert "<b>" not in md and "&lt;b&gt;x&lt;/b&gt;" in md
    assert "`t1c/enhancing/<i>glcm</i>\\|Contrast`" in md  # a code span, its pipe not splitting the table


def test_refused_run_says_not_available(tmp_path):
    doc = refused_doc(tmp_path)
    page = report.render_html(doc)
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page
    for sid in ("final", "roc", "calibration", "training", "harmonization", "features", "validation"):
        assert "not available: the run was refused before training" in _section(page, sid), sid
    assert "hospital-b uses profile abc123" in page and "<img" not in page
    assert "Synthetic demo data" not in page  # /data/hospitals is not the demo
    assert "No model was produced (the run was refused before training" in _section(page, "model-card")
    md = report.render_markdown(doc)
    assert md.count("_not available: the run was refused before training") == 7
    assert "Research use only: not a diagnostic device." in md


def test_older_run_keeps_tables_and_explains_missing_parts(full_doc):
    doc = older_doc(full_doc)
    page = report.render_html(doc)
    header, rows = report.final_table(doc)
    assert header[2] == "AUC" and "–" not in "".join(rows[0])
    assert "95% intervals: not available" in _section(page, "final")
    assert "not available: the sites sent no ROC points" in _section(page, "roc")
    assert "not available: the sites sent no calibration bins" in _section(page, "calibration")
    assert html.escape("not available: this run's metrics carry no before/after histograms") in _section(
        page, "harmonization")
    assert "not available: leave-one-site-out validation was not run" in _section(page, "validation")
    assert "not available: the sites sent no pooled-metric terms" in _section(page, "clinical")
    assert _section(page, "training").count("<img ") == 1
    doc["config"]["harmonization"] = "none"
    assert html.escape('harmonisation was off in this run (harmonization = "none")') in report.render_html(doc)


def test_broken_parts_degrade_to_a_note(full_doc):
    doc = json.loads(json.dumps(full_doc))
    doc["final"]["sites"]["hospital-a"]["roc"] = {"fpr": [0, 1], "tpr": [0, 0.5, 1]}
    doc["harmonization"]["features"][EVIL_FEATURE]["edges"] = [1, 0]
    doc["validation"]["loso"]["hospital-b"] = {"error": "hospital-b could not score the model: timeout"}
    doc["rounds"] = "garbage"
    page = report.render_html(doc)
    assert html.escape("not available: could not be built from this run's metrics (ValueError: ROC of hospital-a") \
        in page
    assert f"not available for {html.escape(EVIL_FEATURE)}: edges of" in page
    assert "failed: hospital-b could not score the model: timeout" in _section(page, "validation")
    assert "not available: the run did not finish" not in page
    assert "<img" in _section(page, "calibration")  # the other sections still draw
    report.render_markdown(doc)


def test_metrics_json_stays_compatible(tmp_path, demo_root):
    result = make_result(tmp_path, demo_root, rounds=2)
    result.harmonization = result.validation = None
    result.curves = {}
    doc = result.as_json()
    assert doc["schema"] == "radfed.metrics/1"
    assert set(doc) == {"schema", "run_id", "status", "error", "seconds", "profile", "config", "sites", "dropouts",
                        "features", "model_sha256", "rounds", "final", "notes"}
    assert "roc" not in doc["final"]["sites"]["hospital-a"] and "ci" in doc["final"]["sites"]["hospital-a"]
    report.write_outputs(result)
    assert json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8")) == json.loads(json.dumps(doc))
    assert (tmp_path / "report.html").read_text(encoding="utf-8").count("<tr>") > 3
    assert "federation" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_rounds_without_evaluation(tmp_path, demo_root):
    """An exact fit trains for several Newton steps and evaluates once: every step is a round, losses plotted."""
    result = make_result(tmp_path, demo_root, rounds=4)
    result.config.update({"training": "exact", "exact-l2": 1.0, "exact-max-rounds": 50, "dp-noise-multiplier": 0.0})
    last = result.evaluations[4]
    result.evaluations, result.curves = {4: last}, {4: result.curves[4]}
    doc = json.loads(json.dumps(result.as_json(), allow_nan=False))
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3, 4]
    assert doc["rounds"][0]["evaluate"] == {"sites": {}, "aggregate": None} and doc["final"]["round"] == 4
    page = report.render_html(doc)
    training = _section(page, "training")
    assert training.count("<img ") == 1 and [r[0] for r in _table_rows(training)] == ["round", "4"]
    assert "exact federated logistic regression" in page and "4 step(s) of at most 50" in page
    assert "no differential privacy" in page
    doc["config"].update({"dp-noise-multiplier": 1.1, "dp-clip-norm": 0.5})
    assert "Gaussian noise (noise multiplier 1.1)" in report.render_markdown(doc)


def test_report_loads_in_headless_chromium(full_doc, full_page, tmp_path):
    # 1. The unmodified report inside an iframe; the probe page reads its DOM once it has loaded.
    folder = tmp_path / "run"
    probe = probe_report(full_page, folder)
    assert "error" not in probe, probe
    assert probe["title"] == "radfed run 42"
    assert probe["sections"] == list(SECTION_IDS)
    assert probe["total"] == 9 and probe["loaded"] == 9, probe
    assert all(w >= 400 for w in probe["widths"]), probe

    # 2. A screenshot of the whole page: not blank, and the figures' colours are on it.
    shot = tmp_path / "report.png"
    height = min(int(probe["height"]) + 50, 16_000)
    run = run_chromium(chromium_path(), tmp_path, "shot", [f"--window-size=1100,{height}", f"--screenshot={shot}",
                                                     (folder / "report.html").as_uri()])
    assert shot.exists(), f"no screenshot; chromium exit {run.returncode}: {run.stderr[-2000:]}"
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    pixels = (mpimg.imread(shot, format="png")[..., :3] * 255).round()
    assert pixels.shape[:2] == (height, 1100)
    assert np.mean(np.any(pixels < 200, axis=-1)) > 0.02  # text, tables and figures, not a blank page
    assert np.sum(np.all(np.abs(pixels - TAB_BLUE) < 8, axis=-1)) > 500  # markers in the first site's colour


def test_robustness_section_shows_icc_quantiles_per_region_and_removed_features(full_doc):
    html_page = report.render_html(full_doc)
    section = _section(html_page, "robustness")
    rob = full_doc["features"]["robustness"]
    # one row per sequence/region with its quantiles; the two features that left are named
    for group in ("t1c/enhancing", "adc/edema", "shape/edema"):
        assert f"<code>{group}</code>" in section
    assert rob["groups"]["t1c/edema"]["icc_quantiles"][2] == 0.41 and rob["groups"]["t1c/edema"]["removed"] == 1
    assert rob["groups"]["shape/edema"]["not_measurable"] == 1
    assert "t1c/edema/original_glcm_Contrast" in section and "shape/edema/original_shape_Sphericity" in section
    assert "2 of 7" in section
    off = {**full_doc, "features": {k: v for k, v in full_doc["features"].items() if k != "robustness"}}
    assert "Off (robustness-min-icc = 0)" in _section(report.render_html(off), "robustness")
