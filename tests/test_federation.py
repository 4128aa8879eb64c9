"""Whole federations on Flower's simulation engine (real SuperLink, real ClientApps, real extraction)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from scipy import stats

from client.steps import load_site_data, site_matrix
from common import combat, protocol
from common.canon import arrays_sha256
from radfed import synth
from radfed.launch import run_federation
from server.audit import load_or_create_key, public_pem, verify

K = 5
ROUNDS = 3


def _run(tmp_path: Path, data_root: Path, n_sites: int, **config) -> Path:
    out = tmp_path / "runs"
    run_config = {"data-root": str(data_root), "output-dir": str(out), "num-server-rounds": ROUNDS,
                  "min-cases-per-class": K, "query-timeout": 600.0, **config}
    run_federation(run_config, num_supernodes=n_sites, flwr_home=tmp_path / "flwr", echo=False, timeout=900)
    runs = sorted(out.glob("*-run*"))
    log = tmp_path / "flwr" / "flwr-run.log"
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists(), log.read_text()[-3000:]
    return runs[0]


def _events(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "audit.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory) -> Path:
    """Three usable tiny sites plus a fourth with only 4 HGG cases (fewer than k: it cannot take part)."""
    root = tmp_path_factory.mktemp("fed")
    specs = synth.tiny_sites(4, 9)
    specs[3] = replace(specs[3], n_hgg=4)
    for i, spec in enumerate(specs):
        synth.write_site(root, spec, seed=100 + i)
    # one unusable case at a usable site: its mask is shifted off the image grid
    site = root / specs[2].name
    mask_path = site / (site / "manifest.csv").read_text().splitlines()[1].split(",")[5]
    mask = sitk.ReadImage(str(mask_path))
    mask.SetOrigin(tuple(o + 3.0 for o in mask.GetOrigin()))
    sitk.WriteImage(mask, str(mask_path))
    return root


def test_federation_end_to_end(three_sites, tmp_path):
    folder = _run(tmp_path, three_sites, 4)
    doc = json.loads((folder / "metrics.json").read_text())
    assert doc["status"] == "completed", doc["error"]
    assert doc["schema"] == "radfed.metrics/1"
    assert len(doc["rounds"]) == ROUNDS
    final = doc["final"]
    assert len(final["sites"]) == 3
    for name, m in final["sites"].items():
        assert m["n"] >= K and m["tp"] + m["fp"] + m["tn"] + m["fn"] == m["n"], name
        assert 0.0 <= m["auc"] <= 1.0
    agg = final["aggregate"]
    assert agg["n"] == sum(m["n"] for m in final["sites"].values())
    assert agg["tp"] == sum(m["tp"] for m in final["sites"].values())
    # the broken case was reported, not used and not silently dropped: 17 usable cases at that site
    names = sorted(p.name for p in three_sites.iterdir() if (p / "manifest.csv").exists())
    broken = doc["sites"][names[2]]["split"]
    assert broken["n-failed"] == 1 and broken["n-cases"] == 17

    # the small site was named, left out, and the run went on without it
    small = names[3]
    assert small not in final["sites"] and [d["site"] for d in doc["dropouts"]] == [small]
    dropouts = [e["data"] for e in _events(folder) if e["event"] == "dropout"]
    assert dropouts == doc["dropouts"] and dropouts[0]["phase"] == "plan"
    assert "4 HGG and 9 BM cases; at least 5 of each" in dropouts[0]["reason"]

    # the signed audit chain is intact and records every phase; each site's updates are hashed per round;
    # every global model a site received (its receipts) is the one the log names
    receipts = [three_sites / n / ".radfed" / "receipts.jsonl" for n in names[:3]]
    pinned = tmp_path / "coordinator.pub"  # the key an auditor would get from the coordinator, not the run
    pinned.write_bytes(public_pem(load_or_create_key(folder.parent / "coordinator-audit-key.pem")))
    check = verify(folder / "audit.jsonl", pubkey=pinned, receipts=receipts)
    assert check.ok, check.reason
    assert check.receipts_checked == 3 * 2 * ROUNDS
    assert check.events["site-plan"] == 4 and check.events["round-train"] == ROUNDS
    assert check.events["round-evaluate"] == ROUNDS and check.events["run-end"] == 1
    events = _events(folder)
    for entry in (e for e in events if e["event"] == "round-train"):
        assert len(entry["data"]["sites"]) == 3
        assert all(s["n"] >= K and len(s["update_sha256"]) == 64 for s in entry["data"]["sites"].values())

    # privacy, over every message each site really sent (its outbox): only protocol keys, arrays sized
    # by the feature count, every statistic over >= k cases
    features = doc["features"]
    sizes = {"d": features["agreed"], "m": features["candidates"], "s": features["n"], "q": len(final["sites"])}
    assert features["n"] == 30 and len(features["selected"]) == 30 and features["candidates"] == 200
    for name in names[:3]:
        sent = [json.loads(line) for line in (three_sites / name / ".radfed" / "outbox.jsonl").read_text().splitlines()]
        kinds = [e["type"] for e in sent]
        assert kinds.count("query.plan") == kinds.count("query.features") == kinds.count("query.moments") == 1
        assert kinds.count("query.correlation") == 1
        assert kinds.count("train") == kinds.count("evaluate") == ROUNDS
        for entry in sent:
            spec = protocol.REPLIES[entry["type"]]
            for record, values in entry["records"].items():
                allowed = {**spec.config, **spec.metrics, **spec.arrays}
                assert set(values) <= set(allowed), (name, entry["type"], record)
                if record == "arrays":  # exactly the declared shapes, in the run's sizes
                    for key, array in values.items():
                        expected = [sizes[s] if isinstance(s, str) else s for s in spec.arrays[key].shape]
                        assert array["shape"] == expected, (name, entry["type"], key)
            for count_key in spec.count_keys:
                assert entry["records"]["metrics"][count_key] >= K, (name, entry["type"], count_key)
    assert not (three_sites / names[3] / ".radfed" / "outbox.jsonl").read_text().count("query.features")

    # each site kept its own ComBat parameters (never sent) for this run's agreed features
    assert check.events["harmonization"] == 1
    run_config = {"test-fraction": 0.3, "split-seed": 7, "min-cases-per-class": K}
    params = [json.loads((three_sites / n / ".radfed" / "harmonization" / f"run-{doc['run_id']}.json").read_text())
              for n in names[:3]]
    assert all(len(p["features"]) == features["agreed"] and p["run_id"] == doc["run_id"] for p in params)

    # the pooled estimates a late-joining site is harmonised against, without any site's own intercept
    late = json.loads((folder / "harmonization.json").read_text())
    assert len(late["grand_mean"]) == features["agreed"] and late["beta_cov"] == [] and late["n_sites"] == 3
    assert "beta" not in late

    # the selection (from aggregates only) is what the pooled harmonised data says: Welch's t equals scipy's
    # on the pooled training splits, and no two selected features correlate above the threshold
    data = [load_site_data(three_sites / name, run_config) for name in names[:3]]
    train = [site_matrix(d, p["features"], held_out=False, names=list(features["selected"]),
                         harmonize=combat.SiteCombat.from_dict(p).apply) for d, p in zip(data, params, strict=True)]
    x, y = np.vstack([t[0] for t in train]), np.concatenate([t[1] for t in train])
    reference_t = stats.ttest_ind(x[y == 1], x[y == 0], equal_var=False).statistic
    np.testing.assert_allclose(list(features["selected"].values()), reference_t, rtol=1e-8)
    corr = np.corrcoef(x, rowvar=False)
    assert np.max(np.abs(corr - np.eye(len(corr)))) <= 0.9 + 1e-9
    selection_entry = next(e for e in _events(folder) if e["event"] == "selection")
    assert selection_entry["data"]["features"] == list(features["selected"])

    # the saved model is the one the log names
    saved = torch.load(folder / "model.pt", weights_only=False)
    state = {k: v.numpy() for k, v in saved["state_dict"].items()}
    assert arrays_sha256(state) == events[-1]["data"]["model_sha256"] == doc["model_sha256"]
    assert len(saved["features"]) == doc["features"]["n"] == state["linear.weight"].shape[1]
    assert (folder / "report.html").read_text().count("<tr>") > 3
    assert "federation" in (folder / "report.md").read_text()


def test_profile_mismatch_refuses_to_train_and_names_the_site(tmp_path):
    root = tmp_path / "data"
    specs = synth.tiny_sites(2, 9)
    for i, spec in enumerate(specs):
        synth.write_site(root, spec, seed=200 + i)
    profile = yaml.safe_load((Path(__file__).parent.parent / "common/profiles/default.yaml").read_text())
    profile["setting"]["binWidth"] = 25  # a site that quietly changed its bin width
    rogue = root / specs[1].name
    (rogue / "edited.yaml").write_text(yaml.safe_dump(profile))
    (rogue / "site.yaml").write_text(f"name: {specs[1].name}\nprofile: {rogue / 'edited.yaml'}\n")

    folder = _run(tmp_path, root, 2)
    doc = json.loads((folder / "metrics.json").read_text())
    assert doc["status"] == "refused"
    assert specs[1].name in doc["error"] and specs[0].name not in doc["error"]
    events = _events(folder)
    refusals = [e for e in events if e["event"] == "refusal"]
    assert [e["data"]["site"] for e in refusals] == [specs[1].name]
    assert not [e for e in events if e["event"] in ("round-train", "features-agreed")]
    assert events[-1]["event"] == "run-end" and events[-1]["data"]["status"] == "refused"
    assert verify(folder / "audit.jsonl").ok
    # nothing was extracted anywhere: the refusal came before any data was touched
    assert not (root / specs[0].name / ".radfed" / "cache").exists()


def test_harmonisation_and_selection_can_be_switched_off(tmp_path):
    root = tmp_path / "data"
    for i, spec in enumerate(synth.tiny_sites(2, 9)):
        synth.write_site(root, spec, seed=300 + i)
    # one site keeps its local files elsewhere: everything radfed writes for it must go there
    (root / "tiny-a" / "site.yaml").write_text("name: tiny-a\noutput_dir: ../tiny-a-private\n")
    folder = _run(tmp_path, root, 2, harmonization="none", **{"select-features": 0, "num-server-rounds": 2})
    doc = json.loads((folder / "metrics.json").read_text())
    assert doc["status"] == "completed", doc["error"]
    events = verify(folder / "audit.jsonl").events
    assert "harmonization" not in events and events["selection"] == 1
    # every non-constant agreed feature is used, no correlation round was needed
    assert doc["features"]["n"] == doc["features"]["agreed"] - doc["features"]["constant"]
    assert doc["features"]["candidates"] == 0 and not (folder / "harmonization.json").exists()
    private = root / "tiny-a-private"
    sent = (private / "outbox.jsonl").read_text()
    assert "query.correlation" not in sent and "combat" not in sent
    assert (private / "receipts.jsonl").exists() and (private / "errors.json").exists()
    assert not (root / "tiny-a" / ".radfed").exists()
