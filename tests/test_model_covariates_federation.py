"""model-covariates in a real federation (Flower simulation, real extraction, ComBat on): the combined model is the
pooled exact logistic fit on [selected radiomics features after ComBat, coded covariates never adjusted], standardised
with the pooled moments; the model file records the covariates and `radfed predict` takes them (and refuses a
missing one, naming it)."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import torch
from federation_helpers import K, events, run_federation_in
from test_exact import _sklearn as sklearn_fit

from client.steps import load_site_data
from common import exact, families
from common.combat import SiteCombat
from radfed import synth
from radfed.cli import main as radfed_main
from radfed.launch import app_run_config
from server.audit import verify

SPEC = "age,sex=F|M"


def _manifest(site):
    with (site / "manifest.csv").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _write_sexes(site, held_out_ids, labels):
    """Sex balanced within each class of the training split (3 M, 3 F of 6): every level holds >= k training
    cases and says nothing about the class; held-out cases alternate."""
    rows = _manifest(site)
    seen: dict[tuple[bool, int], int] = {}
    for row in rows:
        key = (row["case_id"] in held_out_ids, labels[row["case_id"]])
        seen[key] = seen.get(key, 0) + 1
        row["sex"] = "M" if seen[key] % 2 else "F"
    with (site / "manifest.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _predict(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = radfed_main(["predict", *args])
    return code, out.getvalue(), err.getvalue()


def test_combined_model_is_the_pooled_fit_on_features_and_covariates(tmp_path):
    root = tmp_path / "data"
    specs = synth.tiny_sites(2, 12)  # 2 release blocks of 6 per class: 12 training cases per site
    for i, spec in enumerate(specs):
        synth.write_site(root, spec, seed=900 + i)
    config = {"training": "exact", "harmonization": "combat", "select-features": 2, "model-covariates": SPEC,
              "local-only": "none", "recalibration-max-rounds": 5, "min-sites": 1}
    run_cfg = app_run_config({"min-cases-per-class": K, **config})
    for spec in specs:  # the split comes from the site's release blocks: set the sexes knowing it
        data = load_site_data(root / spec.name, run_cfg)
        ids = np.array(data.table.case_ids)
        _write_sexes(root / spec.name, set(ids[data.held_out]),
                     dict(zip(data.table.case_ids, data.table.labels.tolist(), strict=True)))

    folder = run_federation_in(tmp_path, root, 2, **config)
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    saved = torch.load(folder / "model.pt", weights_only=False)
    features = saved["features"]
    # two radiomics features chosen by selection, then the clinical inputs, always kept, in design order
    assert features[2:] == ["clinical/sex=M", "clinical/age"] and saved["model_covariates"] == "sex=F|M,age"
    assert not any(n.startswith("clinical/") for n in features[:2])
    selection = [e["data"] for e in events(folder) if e["event"] == "selection"]
    assert all(s["features"][-2:] == ["clinical/sex=M", "clinical/age"] for s in selection)  # every fold too
    assert set(doc["validation"]["loso"]) == {s.name for s in specs}

    # the reference, from every training case in one place: each site's own ComBat on the radiomics features,
    # the covariates coded by hand from the manifest, untouched
    run_id = str(saved["run_id"])
    x_all, y_all, coded = [], [], {}
    for spec in specs:
        site = root / spec.name
        data = load_site_data(site, run_cfg)
        params_doc = json.loads((site / ".radfed" / "harmonization" / f"run-{run_id}.json").read_text("utf-8"))
        agreed = params_doc["features"]
        assert not any(n.startswith("clinical/") for n in agreed)
        harmonized = SiteCombat.from_dict(params_doc).apply(data.table.columns(agreed))
        rows = {r["case_id"]: r for r in _manifest(site)}
        clinical = np.array([[float(rows[c]["sex"] == "M"), float(rows[c]["age"])] for c in data.table.case_ids])
        coded[spec.name] = (data, harmonized, clinical, agreed)
        x = np.column_stack([harmonized[:, [agreed.index(n) for n in features[:2]]], clinical])
        x_all.append(x[~data.held_out])
        y_all.append(data.table.labels[~data.held_out])
    x, y = np.vstack(x_all), np.concatenate(y_all)
    coef, mean, scale = exact.from_state_dict(saved["state_dict"])
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-10)  # the pooled moments, from the sites' sums
    np.testing.assert_allclose(scale, x.std(axis=0, ddof=1), rtol=1e-10)
    pos_weight = float(np.sum(y == 0) / np.sum(y == 1))
    reference = sklearn_fit((x - mean) / scale, y, pos_weight, l2=float(app_run_config()["exact-l2"]))
    np.testing.assert_allclose(coef, reference, atol=1e-6)
    assert np.all(coef[-2:] != 0)

    # the comparison: the same family on the radiomics features only and on the covariates only, each the pooled fit
    # on its own columns, compared with the combined model (paired DeLong) internally and at every held-out site
    order = ["logistic-l2", "logistic-l2:radiomics-only", "logistic-l2:clinical-only"]
    fam = doc["families"]
    assert fam["order"] == order and fam["reference"] == "logistic-l2" and fam["chosen"] == "logistic-l2"
    for name, cols in ((order[1], [0, 1]), (order[2], [2, 3])):
        coef_v, mean_v, scale_v = exact.from_state_dict(saved["models"][name])
        np.testing.assert_allclose(mean_v, x[:, cols].mean(axis=0), rtol=1e-10)
        ref_v = sklearn_fit((x[:, cols] - mean_v) / scale_v, y, pos_weight, l2=float(app_run_config()["exact-l2"]))
        np.testing.assert_allclose(coef_v, ref_v, atol=1e-6, err_msg=name)
        for part in ("internal", "external"):
            row = fam["rows"][name][part]
            assert 0 <= row["auc"] <= 1 and len(row["ci"]["auc"]) == 2, (name, part)
    assert sorted(fam["comparison"]["internal"]["pairs"]) == sorted(order[1:])
    assert sorted(fam["comparison"]["external"]) == sorted(order[1:])
    report = (folder / "report.md").read_text(encoding="utf-8")
    assert "logistic-l2:clinical-only" in report and "on the clinical inputs (model-covariates) only" in report
    receipts = [root / s.name / ".radfed" / "receipts.jsonl" for s in specs]
    check = verify(folder / "audit.jsonl", receipts=receipts)
    assert check.ok, check.reason

    # radfed predict: the covariates from the command line (or the manifest), coded as the sites coded them
    name = specs[1].name
    data, harmonized, clinical, agreed = coded[name]
    case = data.table.case_ids[0]
    model = ["--model", str(folder / "model.pt"), "--site", str(root / name), "--case-id", case, "--json"]
    code, out, err = _predict(*model, "--covariate", "age=63", "--covariate", "sex=F")
    assert code == 0, err
    row = np.concatenate([harmonized[0, [agreed.index(n) for n in features[:2]]], [0.0, 63.0]])[None, :]
    arrays = {k: v.numpy() for k, v in saved["state_dict"].items()}
    assert json.loads(out)["probability_hgg"] == pytest.approx(
        families.predict_proba("logistic-l2", arrays, row)[0], rel=1e-9)
    code, out, err = _predict(*model)  # the manifest's own values
    expected = np.concatenate([harmonized[0, [agreed.index(n) for n in features[:2]]], clinical[0]])[None, :]
    assert code == 0 and json.loads(out)["probability_hgg"] == pytest.approx(
        families.predict_proba("logistic-l2", arrays, expected)[0], rel=1e-9)
    code, out, err = _predict(*model, "--covariate", "age=")  # a missing value: refused, named, with the fix
    refusal = json.loads(out)
    assert code == 1 and refusal["case"] == case and "no age value" in refusal["reason"], out
    assert "--covariate age=" in refusal["fix"] and refusal["sent"] == "nothing"
    code, out, err = _predict(*model, "--covariate", "weight=80")
    refusal = json.loads(out)
    assert code == 2 and "weight" in refusal["reason"] and "sex=F|M,age" in refusal["reason"], out
