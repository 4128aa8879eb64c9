"""Shared by the report tests: a full metrics document as a completed run writes it, and headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common import metrics
from common.profile import load_profile
from server import report
from server.robustness import RobustnessResult

K = 5
SITES = ("hospital-a", "hospital-b", "hospital-c", "<b>x</b>")
EVIL_FEATURE = "t1c/enhancing/<i>glcm</i>|Contrast"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=5000"]


def _k_groups(n: int) -> list[slice]:
    groups = min(8, n // K)
    bounds = np.linspace(0, n, groups + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _site_scores(rng: np.random.Generator, n: int, separation: float) -> tuple[np.ndarray, np.ndarray]:
    y = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(int)
    prob = 1 / (1 + np.exp(-(separation * (2 * y - 1) + rng.normal(0, 1.2, n))))
    return y, prob


def _evaluation(y: np.ndarray, prob: np.ndarray, loss: float) -> dict[str, Any]:
    rec = {"n": len(y), **metrics.confusion_counts(y, prob), "auc": metrics.roc_auc(y, prob),
           "auc_var": metrics.delong_variance(y, prob), "loss": loss}
    rec.update(metrics.rates(rec))
    return rec


def _curves(y: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """k-anonymous ROC (highest scores first) and calibration bins, as a site computes them."""
    desc = np.argsort(-prob, kind="mergesort")
    fpr, tpr, tp, fp = [0.0], [0.0], 0, 0
    for g in _k_groups(len(y)):
        pos = int(y[desc[g]].sum())
        tp, fp = tp + pos, fp + (g.stop - g.start - pos)
        tpr.append(tp / y.sum())
        fpr.append(fp / (len(y) - y.sum()))
    asc = np.argsort(prob, kind="mergesort")
    groups = [asc[g] for g in _k_groups(len(y))]
    return {"roc": {"fpr": fpr, "tpr": tpr},
            "calibration": {"predicted": [float(prob[i].mean()) for i in groups],
                            "observed": [float(y[i].mean()) for i in groups], "n": [len(i) for i in groups]}}


def _histogram(values: np.ndarray, edges: np.ndarray) -> list[int]:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return [int(c) if c >= K else 0 for c in counts]  # cruder than the sites' merging, same promise


def _pooled(scores: dict[str, tuple[np.ndarray, np.ndarray]], last: int) -> dict[str, Any]:
    """final.pooled as server.clinical computes it from what the sites send (40 bins, 19 thresholds)."""
    from common import clinical as cc
    from server import clinical

    terms = {}
    for name, (y, prob) in scores.items():
        h = cc.site_score_histograms(y, prob, cc.score_edges(40), K)
        terms[name] = {"start": h["start"], "end": h["end"], **cc.site_brier_terms(y, prob, K),
                       **cc.site_decision_counts(y, prob, cc.decision_thresholds(19), K)}
    fit = cc.fit_recalibration(lambda p: [cc.site_recalibration_terms(y, prob, p, K) for y, prob in scores.values()],
                               max_rounds=25)
    return {"round": last, **clinical.pooled(terms, 40, 19), "calibration": {**fit, "max_rounds": 25}}


def make_result(folder: Path, data_root: Path, sites: tuple[str, ...] = SITES, rounds: int = 6) -> report.RunResult:
    """A completed run at ``sites`` with every optional part: intervals, curves, histograms, LOSO, baselines."""
    rng = np.random.default_rng(3)
    cfg = {"num-server-rounds": rounds, "local-epochs": 5, "learning-rate": 0.05, "weight-decay": 0.001,
           "min-cases-per-class": K, "test-fraction": 0.3, "split-seed": 7, "data-root": str(data_root),
           "harmonization": "combat", "select-features": 5, "select-max-correlation": 0.9}
    result = report.RunResult(run_id=42, folder=folder, config=cfg, profile=load_profile("default"),
                              status="completed", seconds=12.5)
    sizes = {name: 80 + 20 * i for i, name in enumerate(sites)}
    held_out = {}
    for name, n in sizes.items():
        test = held_out[name] = int(round(0.3 * n))
        result.site_counts[name] = {"n-hgg": n // 2, "n-bm": n - n // 2, "n-problems": 0}
        result.split_counts[name] = {"n-cases": n, "n-train-hgg": n // 2 - test // 2,
                                     "n-train-bm": n - n // 2 - (test - test // 2), "n-test-hgg": test // 2,
                                     "n-test-bm": test - test // 2, "n-failed": 0}
    names = [f"{seq}/enhancing/original_firstorder_Mean" for seq in ("t1c", "flair", "adc")]
    names += [EVIL_FEATURE, "adc/edema/original_glszm_ZoneEntropy"]
    result.features = {"agreed": 120, "n": len(names), "constant": 1, "candidates": 40, "dropped_correlated": 7,
                       "selected": {n: float(t) for n, t in zip(names, (4.2, -3.1, 2.5, 2.2, -1.9), strict=True)},
                       "weights": {n: float(w) for n, w in zip(names, (0.4, -0.9, 0.05, 0.3, -0.2), strict=True)},
                       "sha256": "ab" * 32}
    agreed = [*names, "t1c/edema/original_glcm_Contrast", "shape/edema/original_shape_Sphericity"]
    icc = np.array([0.95, 0.9, 0.82, 0.97, 0.88, 0.41, np.nan])
    result.features["robustness"] = RobustnessResult(agreed, icc, 0.75, [agreed[5], agreed[6]], 140, 6,
                                                     list(sites)).summary()
    for r in range(1, rounds + 1):
        result.training[r] = {name: {"n": sizes[name] - held_out[name], "loss": 0.7 * 0.9 ** r + 0.02 * i,
                                     "update_sha256": "0" * 64} for i, name in enumerate(sites)}
        result.evaluations[r], result.curves[r] = {}, {}
        scores = {}
        for i, name in enumerate(sites):
            y, prob = scores[name] = _site_scores(np.random.default_rng(100 * i + r), held_out[name], 0.4 + 0.15 * r)
            result.evaluations[r][name] = _evaluation(y, prob, 0.6 - 0.02 * r)
            result.curves[r][name] = _curves(y, prob)
    result.pooled = _pooled(scores, rounds)
    result.model_sha256 = "cd" * 32
    edges = np.linspace(-3.5, 3.5, 17)
    result.harmonization = {"features": {
        n: {"edges": edges.tolist(), "sites": {
            name: {"before": _histogram(rng.normal(0.8 * i - 1, 1, 60), edges),
                   "after": _histogram(rng.normal(0, 1, 60), edges)} for i, name in enumerate(sites)}}
        for n in [*names, "t1c/enhancing/original_shape_Sphericity"]}}
    agreed = [*names, *(f"adc/edema/original_firstorder_X{j}" for j in range(20))]  # 25 agreed features
    result.harmonization["site_share"] = {"features": agreed, "before": rng.uniform(0.05, 0.6, len(agreed)).tolist(),
                                          "after": [*rng.uniform(0.0, 0.04, len(agreed) - 1).tolist(), None]}
    loso = {}
    for i, name in enumerate(sites):
        y, prob = _site_scores(np.random.default_rng(7 + i), 50, 0.9)
        rec = _evaluation(y, prob, 0.5)
        loso[name] = {**rec, "ci": metrics.intervals(rec), "trained_on": sorted(set(sites) - {name}), "features": 5,
                      **_curves(y, prob)}
    result.validation = {"loso": loso, "baselines": {
        "centralised (pooled)": {"auc": 0.861, "sensitivity": 0.8, "ci": {"auc": [0.79, 0.92]}},
        "local only (mean over sites)": {"auc": 0.702, "note": "each site trains on its own cases"}}}
    return result


# ---------------------------------------------------------------------------------------------- Chromium

PROBE = """<!doctype html><html><head><meta charset="utf-8"><title>probe</title></head><body>
<iframe id="report" src="report.html" style="width:WIDTHpx;height:HEIGHTpx;border:0"></iframe>
<script>
document.getElementById("report").addEventListener("load", function () {
  var out = {};
  try {
    var d = this.contentDocument, images = Array.prototype.slice.call(d.images);
    out.title = d.title;
    out.total = images.length;
    out.loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
    out.widths = images.map(function (i) { return i.naturalWidth; });
    out.sections = Array.prototype.map.call(d.querySelectorAll("section"), function (s) { return s.id; });
    out.height = d.documentElement.scrollHeight;
    var view = d.documentElement.clientWidth;
    out.view = view;
    out.pageWidth = d.documentElement.scrollWidth;
    out.overflowing = Array.prototype.filter.call(d.body.querySelectorAll("*"), function (e) {
      var r = e.getBoundingClientRect();
      return r.width > 0 && (r.right > view + 1 || e.scrollWidth > e.clientWidth + 1);
    }).map(function (e) { return e.tagName + (e.id ? "#" + e.id : "") + ": " + e.textContent.slice(0, 60); });
    var head = d.getElementById("headline");
    out.headline = head ? {top: head.getBoundingClientRect().top, bottom: head.getBoundingClientRect().bottom,
                           text: head.textContent} : null;
  } catch (e) { out.error = String(e); }
  document.body.setAttribute("data-probe", JSON.stringify(out));
});
</script></body></html>
"""


def chromium_path() -> str:
    """Debian's chromium; installed here if missing and we may (``make test`` installs it beforehand)."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, env=env,
                       capture_output=True, timeout=900, check=False)
        found = shutil.which("chromium")
        if found:
            return found
    pytest.skip("headless Chromium check: /usr/bin/chromium is absent and could not be installed "
                "(run `make test`, which installs Debian's chromium, or `apt-get install chromium`)")


def run_chromium(chromium: str, tmp_path: Path, name: str, args: list[str]) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{name}"  # a fresh profile every time
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
                          check=False)


def probe_report(page: str, folder: Path, width: int = 1100, height: int = 900) -> dict[str, Any]:
    """Load ``page`` unmodified in an iframe of ``width`` x ``height`` px in headless Chromium and read its DOM
    (file pages may read each other only with --allow-file-access-from-files)."""
    chromium = chromium_path()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.html").write_text(page, encoding="utf-8")
    probe = folder / "probe.html"
    probe.write_text(PROBE.replace("WIDTH", str(width)).replace("HEIGHT", str(height)), encoding="utf-8")
    dom = run_chromium(chromium, folder, f"dom-{width}", ["--allow-file-access-from-files", "--dump-dom",
                                                          probe.as_uri()])
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert found, f"no probe result; chromium exit {dom.returncode}: {dom.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))
