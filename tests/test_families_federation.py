"""Several model families in one real federation (Flower simulation, real extraction): every family fitted on
the same cohort, the choice by internal AUC before external validation, the paired comparison, the model file and
`radfed predict` for a non-default family, and a canary case no family's message carries."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from federation_helpers import K, events, numbers, run_federation_in
from test_exact import _sklearn as sklearn_fit

from client.steps import load_site_data, site_matrix
from common import clinical, exact, families, metrics, moments
from radfed import synth
from radfed.cli import main as radfed_main
from radfed.launch import app_run_config
from server.audit import verify

MODELS = "logistic-l2,logistic-l1,svm,mlp"


def test_every_family_under_one_protocol(tmp_path):
    root = tmp_path / "data"
    specs = synth.tiny_sites(2, 12)  # 2 release blocks of 6 per class: 12 training cases per site
    for i, spec in enumerate(specs):
        synth.write_site(root, spec, seed=700 + i)
    # the canary: one case whose edema is grown far beyond any other's
    site = root / specs[0].name
    row = (site / "manifest.csv").read_text(encoding="utf-8").splitlines()[1].split(",")
    canary_id, mask_path = row[0], site / row[5]
    mask = sitk.ReadImage(str(mask_path))
    grown = sitk.BinaryDilate(mask > 0, [6, 6, 3])
    sitk.WriteImage(sitk.Cast(mask + sitk.Cast((grown - (mask > 0)) * 3, mask.GetPixelID()), mask.GetPixelID()),
                    str(mask_path))
    (site / "site.yaml").write_text(f"name: {specs[0].name}\noutbox_values: true\n")

    # two sites (each leave-one-site-out fold trains on the other alone: min-sites 1), two FedAvg rounds: kept small
    # with each site's local-only baselines (every family) and each family's calibration at the held-out sites
    config = {"training": "exact", "harmonization": "none", "select-features": 3, "models": MODELS,
              "local-only": "own-pipeline", "recalibration-max-rounds": 10, "min-sites": 1, "num-server-rounds": 2}
    folder = run_federation_in(tmp_path, root, 2, **config)
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    names = MODELS.split(",")
    fam = doc["families"]
    assert fam["order"] == names and fam["reference"] == "logistic-l2" and fam["rule"] == "internal-auc"
    internal = {f: fam["rows"][f]["internal"]["auc"] for f in names}
    best = max(names, key=lambda f: (internal[f], -names.index(f)))  # ties to the first listed
    assert fam["chosen"] == best
    for f in names:  # every family has an internal and an external row, with intervals and a Brier score
        for part in ("internal", "external"):
            row = fam["rows"][f][part]
            assert 0 <= row["auc"] <= 1 and len(row["ci"]["auc"]) == 2 and 0 <= row["brier"] <= 1, (f, part)
    for part in ("internal", "external"):
        pairs = fam["comparison"][part] if part == "external" else fam["comparison"][part]["pairs"]
        assert sorted(pairs) == sorted(names[1:])
        for f in names[1:]:
            assert 0 <= pairs[f]["p_value"] <= 1 and pairs[f]["auc_diff_ci"][0] <= pairs[f]["auc_diff"], (f, part)
    # each leave-one-site-out fold scored every family at its held-out site and compared them there
    for held, record in doc["validation"]["loso"].items():
        assert sorted(record["families"]) == sorted(names) and record["comparison"]["sites"].keys() == {held}

    # the choice is audited before external validation starts, with each family's internal AUC
    log = events(folder)
    kinds = [e["event"] for e in log]
    choice = log[kinds.index("model-choice")]["data"]
    assert choice["chosen"] == best and choice["internal_auc"] == pytest.approx(internal, abs=1e-12)
    assert kinds.index("model-choice") < kinds.index("fold-start")
    receipts = [root / s.name / ".radfed" / "receipts.jsonl" for s in specs]
    check = verify(folder / "audit.jsonl", receipts=receipts)
    assert check.ok, check.reason

    # the model file is the chosen family's; it keeps every family's model of the main run
    saved = torch.load(folder / "model.pt", weights_only=False)
    assert saved["family"] == best and sorted(saved["models"]) == sorted(names)
    # logistic-l2 (exact) and logistic-l1 (exact proximal Newton, penalty model-l1) are the pooled fits
    data = [load_site_data(root / s.name, app_run_config({"min-cases-per-class": K})) for s in specs]
    agreed = sorted(set.intersection(*(set(n for n, ok in zip(d.table.names, np.all(np.isfinite(d.table.values), 0),
                                                              strict=True) if ok) for d in data)))
    train = [site_matrix(d, agreed, held_out=False, names=saved["features"]) for d in data]
    y = np.concatenate([t[1] for t in train])
    pos_weight = float(np.sum(y == 0) / np.sum(y == 1))
    run = app_run_config()
    x = np.vstack([t[0] for t in train])
    for f, l1 in (("logistic-l2", 0.0), ("logistic-l1", float(run["model-l1"]))):
        coef, mean, scale = exact.from_state_dict(saved["models"][f])
        reference = sklearn_fit((x - mean) / scale, y, pos_weight, l2=float(run["exact-l2"]), l1=l1)
        np.testing.assert_allclose(coef, reference, atol=1e-6, err_msg=f)
    assert not np.array_equal(saved["models"]["logistic-l1"]["linear.weight"],
                              saved["models"]["logistic-l2"]["linear.weight"])
    _check_alone_and_external_calibration(doc, data, [s.name for s in specs], run)

    # radfed predict with a non-default family's model file (svm here; the mlp has no per-feature drivers)
    for f in ("svm", "mlp"):
        path = folder / f"{f}-model" / "model.pt"
        path.parent.mkdir()
        torch.save({**{k: v for k, v in saved.items() if k != "models"}, "state_dict": saved["models"][f],
                    "family": f}, path)
        case = data[1].table.case_ids[0]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = radfed_main(["predict", "--model", str(path), "--site", str(root / specs[1].name),
                                "--case-id", case, "--json"])
        assert code == 0, err.getvalue()
        result = json.loads(out.getvalue())
        x = data[1].table.columns(saved["features"])[[0]]
        arrays = {k: v.numpy() for k, v in saved["models"][f].items()}
        assert result["probability_hgg"] == pytest.approx(families.predict_proba(f, arrays, x)[0], rel=1e-9)
        assert result["model"]["family"] == f and (len(result["drivers"]) > 0) == (f == "svm")

    # report: the comparison table, the forest plot and the chosen model
    report = (folder / "report.md").read_text(encoding="utf-8")
    assert "Model families" in report and f"Chosen model: {best}" in report
    assert "forest plot" in report.lower()
    assert "calibration slope (95% CI)" in report and "| site alone | family |" in report

    # no number any message carried equals a value of the canary's features
    table = next((site / ".radfed").glob("features-*.csv")).read_text(encoding="utf-8").splitlines()
    rows = {r.split(",")[0]: r.split(",") for r in table[1:]}
    raw = np.array([float(v) for v in rows[canary_id][3:]])
    others = np.array([[float(v) for v in r[3:]] for cid, r in rows.items() if cid != canary_id])
    unique = [v for v in raw if np.isfinite(v) and abs(v - round(v)) > 1e-6
              and not np.any(np.isclose(others, v, rtol=1e-9))]
    assert len(unique) > 300
    outbox = [json.loads(line) for line in (site / ".radfed" / "outbox.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {"query.compare", "train", "query.newton"} <= {e["type"] for e in outbox}
    sent = np.sort([x for e in outbox for x in numbers(e["records"])])
    for v in unique:
        i = np.searchsorted(sent, v)
        assert not np.any(np.isclose(sent[max(i - 1, 0): i + 1], v, rtol=1e-9, atol=0)), v


def _check_alone_and_external_calibration(doc, data, sites, run):
    """Two sites: the leave-one-site-out fold without h and the other site's local-only baseline are both the
    pipeline on that site alone. Every family has a local-only record (internal and at the other site) and an
    external calibration slope with its interval at each held-out site; for the exact logistic families they equal
    scikit-learn's fit on that site's training split, scored at h (AUC), and scikit-learn's unpenalised logistic
    recalibration y ~ a + b logit(p) over all of h's cases (slope, standard error from its Hessian)."""
    names = MODELS.split(",")
    fam, local, loso = doc["families"], doc["validation"]["local_only"], doc["validation"]["loso"]
    for trained, held in (sites, sites[::-1]):
        rec, fold = local[trained], loso[held]
        assert sorted(rec["families"]) == sorted(names) and rec["features"] == fold["features"]
        # the gain keeps comparing the first listed family's baselines
        assert rec["internal"] == rec["families"][names[0]]["internal"]
        assert rec["external"] == rec["families"][names[0]]["external"]
        for f in names:
            assert 0 <= rec["families"][f]["internal"]["auc"] <= 1, (trained, f)
            assert list(rec["families"][f]["external"]) == [held], (trained, f)
            cal = fold["families"][f]["calibration"]
            assert cal["slope_ci"][0] < cal["slope"] < cal["slope_ci"][1], (held, f, cal)
        assert fold["calibration_fit"] == fold["families"][fam["chosen"]]["calibration"]  # the one in use's
        i, j = sites.index(trained), sites.index(held)
        x, y = site_matrix(data[i], fold["features"], held_out=False)
        mean, std = moments.pooled_mean_std(*zip(moments.site_moments(x), strict=True))
        pos_weight = float(np.sum(y == 0) / np.sum(y == 1))
        x_held, y_held = site_matrix(data[j], fold["features"], held_out=None)
        x_own, y_own = site_matrix(data[i], fold["features"], held_out=True)
        for f, l1 in (("logistic-l2", 0.0), ("logistic-l1", float(run["model-l1"]))):
            coef = sklearn_fit((x - mean) / std, y, pos_weight, l2=float(run["exact-l2"]), l1=l1)
            arrays = exact.to_state_dict(coef, mean, std)
            prob = families.predict_proba(f, {k: v.numpy() for k, v in arrays.items()}, x_held)
            auc = metrics.roc_auc(y_held, prob)
            assert rec["families"][f]["external"][held]["auc"] == pytest.approx(auc, abs=1e-9), (trained, f)
            assert fold["families"][f]["auc"] == pytest.approx(auc, abs=1e-9), (held, f)
            own = families.predict_proba(f, {k: v.numpy() for k, v in arrays.items()}, x_own)
            assert rec["families"][f]["internal"]["auc"] == pytest.approx(metrics.roc_auc(y_own, own), abs=1e-9)
            design = clinical.logit(prob)[:, None]
            a, b = sklearn_fit(design, y_held, 1.0, l2=0.0)
            mu = 1.0 / (1.0 + np.exp(-(a + b * design[:, 0])))
            full = np.column_stack([np.ones(len(y_held)), design])
            se = float(np.sqrt(np.linalg.inv((full * (mu * (1 - mu))[:, None]).T @ full)[1, 1]))
            cal = fold["families"][f]["calibration"]
            assert cal["converged"] and cal["slope"] == pytest.approx(b, abs=1e-5), (held, f, cal, b)
            assert cal["slope_se"] == pytest.approx(se, rel=1e-4) and cal["intercept"] == pytest.approx(a, abs=1e-5)
    # the external row pools the held-out sites' slopes by inverse variance; the internal row keeps its interval
    for f in names:
        fits = [loso[h]["families"][f]["calibration"] for h in sites]
        w = np.array([1 / c["slope_se"] ** 2 for c in fits])
        ext = fam["rows"][f]["external"]["calibration"]
        assert ext["folds"] == 2 and ext["slope"] == pytest.approx(np.dot(w, [c["slope"] for c in fits]) / w.sum())
        assert ext["slope_se"] == pytest.approx(np.sqrt(1 / w.sum()))
        internal = fam["rows"][f]["calibration"]
        assert internal["slope_ci"] == pytest.approx([internal["slope"] - 1.959963984540054 * internal["slope_se"],
                                                      internal["slope"] + 1.959963984540054 * internal["slope_se"]])
