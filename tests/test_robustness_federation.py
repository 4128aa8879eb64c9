"""The robustness filter in a whole federation (Flower simulation, real extraction): the federated ICC equals the
ICC computed in one place from every site's training cases, the features below the threshold leave before
selection in the main run and in each leave-one-site-out fold, and the sites sent only the declared sums."""

from __future__ import annotations

import json

import numpy as np
import yaml
from federation_helpers import K, events, run_federation_in

from client.robustness import perturbed_features
from client.steps import load_site_data
from common import icc
from common.profile import PROFILE_DIR
from radfed import synth
from radfed.launch import app_run_config
from server.audit import verify

THRESHOLD = 0.75


def test_robustness_filter_in_a_federation(tmp_path):
    root = tmp_path / "data"
    specs = synth.tiny_sites(2, 10)
    for i, spec in enumerate(specs):
        synth.write_site(root, spec, seed=400 + i)
    # two perturbations keep the test short: noise and a one-voxel erosion (m = 3)
    doc = yaml.safe_load((PROFILE_DIR / "default.yaml").read_text(encoding="utf-8"))
    doc["robustness"] = {"perturbations": [{"kind": "noise", "sigma": 0.1}, {"kind": "mask", "erode": 1}],
                         "repeats": 1, "seed": 7}
    profile_path = tmp_path / "robust.yaml"
    profile_path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    config = {"profile": str(profile_path), "robustness-min-icc": THRESHOLD, "num-server-rounds": 2,
              "external-validation": "loso", "local-only": "none", "select-features": 10}
    folder = run_federation_in(tmp_path, root, 2, **config)
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["status"] == "completed", metrics["error"]
    rob = metrics["features"]["robustness"]
    assert rob["measurements"] == 3 and rob["threshold"] == THRESHOLD
    assert rob["n_features"] == metrics["features"]["agreed"]

    # the federated ICC equals the pooled ICC of every site's training cases computed here in one place
    run_config = app_run_config({"profile": str(profile_path), "min-cases-per-class": K})
    blocks, labels, names = [], [], list(rob["icc"])
    for s, spec in enumerate(specs):
        data = load_site_data(root / spec.name, run_config)
        ids = [c for c, held in zip(data.table.case_ids, data.held_out, strict=True) if not held]
        copies = perturbed_features(data.site, data.profile, ids)  # from the site's cache
        originals = data.table.columns(names)[~data.held_out]
        perturbed = np.array([[[c[n] for n in names] for c in copies[i]] for i in ids])
        blocks.append(np.concatenate([originals[:, None, :], perturbed], axis=1))
        labels += [s] * len(ids)
    pooled = icc.pooled_icc(np.concatenate(blocks), np.array(labels))
    federated = np.array([np.nan if v is None else v for v in rob["icc"].values()])
    assert np.array_equal(np.isnan(federated), np.isnan(pooled))
    np.testing.assert_allclose(federated[np.isfinite(pooled)], pooled[np.isfinite(pooled)], rtol=0, atol=1e-10)
    assert rob["n_cases"] == sum(len(b) for b in blocks)

    # features below the threshold (or without an ICC) left, and only those; none of them was selected
    expected = sorted(n for n, v in zip(names, pooled, strict=True) if not v >= THRESHOLD)
    assert sorted(rob["removed"]) == expected and 0 < len(expected) < len(names)
    assert not set(metrics["features"]["selected"]) & set(expected)
    assert {g.split("/")[0] for g in rob["groups"]} == {"t1c", "flair", "adc", "shape"}
    report = (folder / "report.md").read_text(encoding="utf-8")
    assert "Feature robustness" in report and expected[0] in report

    # each cohort measured robustness on its own sites: the main run and both leave-one-site-out folds
    audit = [e["data"] for e in events(folder) if e["event"] == "robustness"]
    assert sorted((e.get("fold", ""), tuple(e["sites"])) for e in audit) == sorted(
        [("", (specs[0].name, specs[1].name)), (specs[0].name, (specs[1].name,)), (specs[1].name, (specs[0].name,))])
    assert verify(folder / "audit.jsonl").ok

    # the guard let the new message through: per-feature sums of the agreed size and the training count, nothing else
    for s, spec in enumerate(specs):
        sent = [json.loads(line) for line in (root / spec.name / ".radfed" / "outbox.jsonl").read_text().splitlines()]
        replies = [e for e in sent if e["type"] == "query.robustness"]
        assert len(replies) == 2  # the main run and the fold it trains in
        for e in replies:
            assert set(e["records"]) == {"arrays", "metrics"}
            assert {k: v["shape"] for k, v in e["records"]["arrays"].items()} == {
                "ssb": [len(names)], "ssw": [len(names)], "unmeasured": [len(names)]}
            assert e["records"]["metrics"] == {"n": len(blocks[s])} and len(blocks[s]) >= K
