"""Whole federations on Flower's simulation engine (real SuperLink, real ClientApps, real extraction)."""

import contextlib
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from federation_helpers import ROUNDS, K, events, numbers, run_federation_in
from scipy import stats

from client.ledger import Ledger
from client.steps import load_site_data, site_matrix
from common import combat, protocol
from common.canon import arrays_sha256
from common.selection import first_ask
from radfed import synth
from radfed.cli import main as radfed_main
from radfed.launch import app_run_config
from server.audit import load_or_create_key, public_pem, verify

_run = run_federation_in


def _radfed(*argv: str) -> tuple[int, str, str]:
    """The radfed CLI in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = radfed_main(list(argv))
    return code, out.getvalue(), err.getvalue()


_events = events


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory) -> Path:
    """Three usable tiny sites plus a fourth with only 4 HGG cases (fewer than k: it cannot take part)."""
    root = tmp_path_factory.mktemp("fed")
    specs = synth.tiny_sites(4, 11)
    specs[3] = replace(specs[3], n_hgg=4)
    for i, spec in enumerate(specs):
        synth.write_site(root, spec, seed=100 + i)
    # one unusable case at a usable site: its mask is shifted off the image grid
    site = root / specs[2].name
    mask_path = site / (site / "manifest.csv").read_text(encoding="utf-8").splitlines()[1].split(",")[5]
    mask = sitk.ReadImage(str(mask_path))
    mask.SetOrigin(tuple(o + 3.0 for o in mask.GetOrigin()))
    sitk.WriteImage(mask, str(mask_path))
    return root


def test_federation_end_to_end(three_sites, tmp_path):
    folder = _run(tmp_path, three_sites, 4)
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    assert doc["schema"] == "radfed.metrics/1"
    assert len(doc["rounds"]) == ROUNDS
    # FedAvg evaluates after the last round only (evaluate-every = 0): one evaluation per site, not one per round
    assert [r["round"] for r in doc["rounds"] if r["evaluate"]["sites"]] == [ROUNDS] == [doc["final"]["round"]]
    final = doc["final"]
    assert len(final["sites"]) == 3
    for name, m in final["sites"].items():
        assert m["n"] >= K and m["tp"] + m["fp"] + m["tn"] + m["fn"] == m["n"], name
        assert 0.0 <= m["auc"] <= 1.0
    agg = final["aggregate"]
    assert agg["n"] == sum(m["n"] for m in final["sites"].values())
    assert agg["tp"] == sum(m["tp"] for m in final["sites"].values())
    # the broken case was reported, not used and not silently dropped: 21 usable cases at that site
    names = sorted(p.name for p in three_sites.iterdir() if (p / "manifest.csv").exists())
    broken = doc["sites"][names[2]]["split"]
    assert broken["n-failed"] == 1 and broken["n-cases"] == 21

    # the small site was named, left out, and the run went on without it
    small = names[3]
    assert small not in final["sites"] and [d["site"] for d in doc["dropouts"]] == [small]
    dropouts = [e["data"] for e in _events(folder) if e["event"] == "dropout"]
    assert dropouts == doc["dropouts"] and dropouts[0]["phase"] == "plan"
    assert "4 HGG and 11 BM cases; each class needs at least 10" in dropouts[0]["reason"]

    # the signed audit chain is intact and records every phase; each site's updates are hashed per round;
    # every global model a site received (its receipts) is the one the log names
    receipts = [three_sites / n / ".radfed" / "receipts.jsonl" for n in names[:3]]
    pinned = tmp_path / "coordinator.pub"  # the key an auditor would get from the coordinator, not the run
    pinned.write_bytes(public_pem(load_or_create_key(folder.parent / "coordinator-audit-key.pem")))
    check = verify(folder / "audit.jsonl", pubkey=pinned, receipts=receipts)
    assert check.ok, check.reason
    # main run: 3 sites x (ROUNDS trains + 1 evaluation); each leave-one-site-out fold: 2 sites x ROUNDS trains
    # and one evaluation at the held-out site; each local-only baseline: ROUNDS trains at its site, one
    # evaluation there (internal) and one at each of the 2 other sites (external)
    assert check.receipts_checked == 3 * (ROUNDS + 1) + 3 * (2 * ROUNDS + 1) + 3 * (ROUNDS + 1 + 2)
    assert check.events["site-plan"] == 4 and check.events["round-train"] == ROUNDS * 7
    assert check.events["round-evaluate"] == 1 and check.events["run-end"] == 1
    assert check.events["external-validation"] == 3 and check.events["histograms"] == 1
    events = _events(folder)
    # external validation: each site scored, on all its usable cases, a model trained without it
    external = {e["data"]["fold"]: e["data"] for e in events if e["event"] == "external-validation"}
    assert sorted(external) == names[:3]
    for name, entry in external.items():
        assert entry["trained_on"] == [n for n in names[:3] if n != name]
        assert entry["metrics"]["n"] == doc["sites"][name]["split"]["n-cases"]
        assert entry["ci"]["auc"][0] <= entry["metrics"]["auc"] <= entry["ci"]["auc"][1]
    for entry in (e for e in events if e["event"] == "round-train" and "fold" not in e["data"]):
        assert len(entry["data"]["sites"]) == 3
        assert all(s["n"] >= K and len(s["update_sha256"]) == 64 for s in entry["data"]["sites"].values())

    # privacy, over every message each site really sent (its outbox): only protocol keys, arrays sized
    # by the feature count, every statistic over >= k cases
    features = doc["features"]
    sizes = {"d": features["agreed"], "m": features["candidates"], "s": features["n"], "q": 1,
             "p": 10, "h": 4, "b": 16, "g": 40, "t": 19}
    assert features["n"] == 8 and len(features["selected"]) == 8 and features["candidates"] == 200
    # each leave-one-site-out fold's ComBat pooled its sites' main-run sums (the held-out site's not among them)
    harmonized = {e["data"].get("fold", ""): e["data"] for e in events if e["event"] == "harmonization"}
    assert all(harmonized[n].get("reused") == "the main run's rounds 1-2" and harmonized[n]["n_sites"] == 2
               for n in names[:3])
    assert "reused" not in harmonized[""] and "reused" not in harmonized[f"local:{names[0]}"]
    for name in names[:3]:
        outbox = three_sites / name / ".radfed" / "outbox.jsonl"
        sent = [json.loads(line) for line in outbox.read_text(encoding="utf-8").splitlines()]
        kinds = [e["type"] for e in sent]
        assert kinds.count("query.plan") == kinds.count("query.features") == kinds.count("query.histograms") == 1
        # correlation and training again in the two folds where the site trains and in its local-only
        # baseline; ComBat's two rounds only in the main run and the baseline: a leave-one-site-out fold pools the
        # sums its sites sent for the main run (same features, no covariates), so nothing is asked twice; in the
        # fold it is held out of and at the other sites' local-only models, it harmonises itself against their
        # estimates (a join), then scores the model on all its cases
        others = set(names[:3]) - {name}
        # (the correlation once per cohort, twice in a cohort whose decorrelation walk ran out of the top candidates);
        # a leave-one-site-out fold's moments are worked out from the main run's (server/derived_moments.py): the
        # site keeps its own ComBat for the fold instead (query.combat_keep), with the fold's next query
        assert kinds.count("query.moments") == 2 and kinds.count("query.combat_keep") == 2
        assert 4 <= kinds.count("query.correlation") <= 8
        assert kinds.count("query.combat_fit") == kinds.count("query.combat_residuals") == 2
        assert kinds.count("train") == 4 * ROUNDS and kinds.count("evaluate") == 1 + 1 + 1 + 2
        # the final model's calibration fit in the main run (federated Newton rounds), and the fold model's where
        # the site is held out (its calibration slope at an unseen site), fitted at the site in one reply that
        # rode with its scoring; every evaluation carries the pooled metrics' terms
        held_fit = doc["validation"]["loso"][name]["calibration_fit"]
        assert kinds.count("query.recalibrate") == final["pooled"]["calibration"]["rounds"] >= 1
        assert not any(e.get("fold") for e in sent if e["type"] == "query.recalibrate")
        assert [e.get("fold") for e in sent if e["type"] == "query.calibration_fit"] == [name]
        assert held_fit["rounds"] >= 1 and held_fit["slope_ci"][0] < held_fit["slope"] < held_fit["slope_ci"][1]
        assert held_fit["converged"]
        assert all("sse" in e["records"]["metrics"] and {"score-start", "decision"} <= set(e["records"]["arrays"])
                   for e in sent if e["type"] == "evaluate")
        assert sorted(e["fold"] for e in sent if e["type"] == "query.combat_join") == sorted(
            {name} | {f"local:{o}" for o in others})
        assert {e.get("fold", "") for e in sent if e["type"] == "query.combat_fit"} == {"", f"local:{name}"}
        for entry in sent:
            spec = protocol.REPLIES[entry["type"]]
            # a site sends its own block of ComBat's design (its column, no covariates here), whatever the sites
            sizes["q"] = 1
            if entry["type"] == "query.correlation":  # the top candidates first, all only if the walk ran out of them
                sizes["m"] = entry["records"]["arrays"]["crossproducts"]["shape"][0]
                assert sizes["m"] in (first_ask(features["candidates"], 8), features["candidates"])
            for record, values in entry["records"].items():
                allowed = {**spec.config, **spec.metrics, **spec.arrays}
                assert set(values) <= set(allowed), (name, entry["type"], record)
                if record == "arrays":  # exactly the declared shapes, in the run's sizes
                    for key, array in values.items():
                        expected = [sizes[s] if isinstance(s, str) else s for s in spec.arrays[key].shape]
                        assert array["shape"] == expected, (name, entry["type"], key)
            for count_key in spec.count_keys:
                assert entry["records"]["metrics"][count_key] >= K, (name, entry["type"], count_key)
    assert not (three_sites / names[3] / ".radfed" / "outbox.jsonl").read_text(encoding="utf-8").count("query.features")

    # each site kept its own ComBat parameters (never sent) for this run's agreed features; every fold refitted
    # ComBat without its held-out site, which then joined; so did each local-only baseline, alone
    assert check.events["harmonization"] == 1 + 3 + 3 and check.events["harmonization-join"] == 3 + 3

    # the local-only baselines (each site's own pipeline) and what the federation gained at unseen sites
    local = doc["validation"]["local_only"]
    assert sorted(local) == names[:3]
    for name, rec in local.items():
        assert rec["internal"]["n"] == doc["final"]["sites"][name]["n"]  # its own held-out split
        assert sorted(rec["external"]) == sorted(set(names[:3]) - {name})
        for other, ext in rec["external"].items():
            assert ext["n"] == doc["sites"][other]["split"]["n-cases"]
    gain = doc["validation"]["federation_gain"]
    for held, g in gain["sites"].items():
        expected = np.mean([local[s]["external"][held]["auc"] for s in names[:3] if s != held])
        assert g["local_only_auc"] == pytest.approx(expected)
        assert g["gain"] == pytest.approx(doc["validation"]["loso"][held]["auc"] - expected)
        assert g["gain_ci"][0] <= g["gain"] <= g["gain_ci"][1]
    assert gain["overall"]["sites"] == 3
    # the calibration slope at unseen sites: each held-out site's, pooled by inverse variance, audited per fold
    fits = [doc["validation"]["loso"][h]["calibration_fit"] for h in names[:3]]
    w = np.array([1 / f["slope_se"] ** 2 for f in fits])
    pooled_slope = doc["validation"]["loso_calibration"]
    assert pooled_slope["folds"] == 3 and pooled_slope["slope"] == pytest.approx(np.dot(w, [f["slope"] for f in fits])
                                                                                 / w.sum())
    audited = {e["data"]["fold"]: e["data"]["calibration"] for e in _events(folder)
               if e["event"] == "external-validation"}
    assert audited == {h: doc["validation"]["loso"][h]["calibration_fit"] for h in names[:3]}
    assert "Calibration slope at unseen sites, the 3 held-out sites' slopes pooled" in (
        folder / "report.md").read_text(encoding="utf-8")
    run_config = app_run_config({"test-fraction": 0.3, "split-seed": 7, "min-cases-per-class": K})
    params = [json.loads((three_sites / n / ".radfed" / "harmonization" / f"run-{doc['run_id']}.json").read_text())
              for n in names[:3]]
    assert all(len(p["features"]) == features["agreed"] and p["run_id"] == doc["run_id"] for p in params)

    # the pooled estimates a late-joining site is harmonised against, without any site's own intercept
    late = json.loads((folder / "harmonization.json").read_text(encoding="utf-8"))
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

    # the share of each feature's variation between sites, before and after ComBat, is the R² of the feature on
    # site indicators in the pooled training splits (raw, then harmonised)
    share = doc["harmonization"]["site_share"]
    chosen = [share["features"].index(n) for n in features["selected"]]
    raw = [site_matrix(d, p["features"], held_out=False, names=list(features["selected"])) for d, p in
           zip(data, params, strict=True)]
    for key, parts in (("before", raw), ("after", train)):
        xs = np.vstack([t[0] for t in parts])
        onehot = np.repeat(np.eye(len(parts)), [len(t[0]) for t in parts], axis=0)
        residual = xs - onehot @ np.linalg.lstsq(onehot, xs, rcond=None)[0]
        r2 = 1 - (residual ** 2).sum(axis=0) / ((xs - xs.mean(axis=0)) ** 2).sum(axis=0)
        np.testing.assert_allclose(np.array(share[key])[chosen], r2, rtol=1e-6, atol=1e-9)
    assert np.median(share["after"]) < np.median(share["before"])  # ComBat took the scanners out

    # the saved model is the one the log names
    saved = torch.load(folder / "model.pt", weights_only=False)
    state = {k: v.numpy() for k, v in saved["state_dict"].items()}
    assert arrays_sha256(state) == events[-1]["data"]["model_sha256"] == doc["model_sha256"]
    assert len(saved["features"]) == doc["features"]["n"] == state["linear.weight"].shape[1]
    # the report's weights are the saved model's, feature by feature
    assert list(doc["features"]["weights"]) == saved["features"]
    np.testing.assert_array_equal(list(doc["features"]["weights"].values()), state["linear.weight"].ravel())
    assert (folder / "report.html").read_text(encoding="utf-8").count("<tr>") > 3
    assert "federation" in (folder / "report.md").read_text(encoding="utf-8")

    _late_joiner_predicts(folder, doc, tmp_path / "late")


def _late_joiner_predicts(folder: Path, doc: dict, root: Path) -> None:
    """A hospital that joins after the run: `radfed site join` fits its own ComBat effects against the run's
    pooled estimates, then `radfed predict` scores one of its cases with the run's model."""
    spec = replace(synth.tiny_sites(5, 3)[4], name="late-site")
    site = synth.write_site(root, spec, seed=999)
    pooled = folder / "harmonization.json"
    code, out, err = _radfed("site", "join", str(pooled), "--site", str(site))
    assert code == 0 and "harmonised against run" in out, err
    assert f"radfed predict --model {pooled.resolve().parent / 'model.pt'} --site {site}" in out  # the real folder
    saved_path = site / ".radfed" / "harmonization" / f"run-{doc['run_id']}.json"
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    late = json.loads(pooled.read_text(encoding="utf-8"))
    assert saved["joined"] is True and saved["features"] == late["features"] and saved["n"] == 6
    assert saved["grand_mean"] == late["grand_mean"] and saved["var_pooled"] == late["var_pooled"]
    assert saved["site"] is None  # not one of the run's design columns

    # joining twice would silently replace what earlier predictions used: refused, naming the file
    code, _, err = _radfed("site", "join", str(pooled), "--site", str(site))
    assert code == 2 and "already has parameters for run" in err and str(saved_path) in err
    # not a harmonization.json: refused with what to use instead
    code, _, err = _radfed("site", "join", str(folder / "metrics.json"), "--site", str(site))
    assert code == 2 and 'harmonization = "combat"' in err

    code, out, err = _radfed("predict", "--model", str(folder / "model.pt"), "--site", str(site),
                             "--case-id", "site-001", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert 0.0 < result["probability_hgg"] < 1.0 and result["harmonization"]["file"] == str(saved_path)


def test_profile_mismatch_refuses_to_train_and_names_the_site(tmp_path):
    root = tmp_path / "data"
    specs = synth.tiny_sites(2, 10)
    for i, spec in enumerate(specs):
        synth.write_site(root, spec, seed=200 + i)
    profile = yaml.safe_load((Path(__file__).parent.parent / "common/profiles/default.yaml").read_text())
    profile["setting"]["binWidth"] = 25  # a site that quietly changed its bin width
    rogue = root / specs[1].name
    (rogue / "edited.yaml").write_text(yaml.safe_dump(profile))
    (rogue / "site.yaml").write_text(f"name: {specs[1].name}\nprofile: {rogue / 'edited.yaml'}\n")

    folder = _run(tmp_path, root, 2)
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
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
    for i, spec in enumerate(synth.tiny_sites(2, 10)):
        synth.write_site(root, spec, seed=300 + i)
    # one site keeps its local files elsewhere: everything radfed writes for it must go there
    (root / "tiny-a" / "site.yaml").write_text("name: tiny-a\noutput_dir: ../tiny-a-private\n")
    shutil.move(root / "tiny-a" / ".radfed", root / "tiny-a-private")  # the generator's release secret moves too
    folder = _run(tmp_path, root, 2, harmonization="none",
                  **{"select-features": 0, "num-server-rounds": 2, "external-validation": "none", "local-only": "none",
                     "dp-noise-multiplier": 2.0, "dp-clip-norm": 0.1, "training": "fedavg", "evaluate-every": 1})
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    # a training curve asked for (evaluate-every = 1): the sites evaluated after every round
    assert [sorted(r["evaluate"]["sites"]) for r in doc["rounds"]] == [["tiny-a", "tiny-b"]] * 2
    events = verify(folder / "audit.jsonl").events
    assert "harmonization" not in events and events["selection"] == 1
    # every non-constant agreed feature is used, no correlation round was needed
    assert doc["features"]["n"] == doc["features"]["agreed"] - doc["features"]["constant"]
    assert doc["features"]["candidates"] == 0 and not (folder / "harmonization.json").exists()
    private = root / "tiny-a-private"
    sent = (private / "outbox.jsonl").read_text(encoding="utf-8")
    assert "query.correlation" not in sent and "combat" not in sent
    assert (private / "receipts.jsonl").exists() and (private / "errors.json").exists()
    assert not (root / "tiny-a" / ".radfed").exists()
    # differential privacy on the updates: the budget spent is in the audit log (zCDP: rho = 1/(2 z^2) a round
    # at site level)
    budget = next(e["data"] for e in _events(folder) if e["event"] == "privacy-budget")
    assert budget["rounds"] == 2 and budget["noise_multiplier"] == 2.0
    assert budget["rho"] == pytest.approx(2 * 1 / (2 * 2.0**2))
    assert budget["epsilon"] == pytest.approx(budget["rho"] + 2 * np.sqrt(budget["rho"] * np.log(1e5)))
    assert set(budget["per_site"]) == {"tiny-a", "tiny-b"}


def test_unapproved_site_is_refused_and_a_canary_case_never_leaves(tmp_path):
    root = tmp_path / "data"
    specs = synth.tiny_sites(3, 10)
    for i, spec in enumerate(specs):
        synth.write_site(root, spec, seed=400 + i)
    # the canary: one case whose edema is grown far beyond any other (a unique, extreme shape)
    site = root / specs[0].name
    row = (site / "manifest.csv").read_text(encoding="utf-8").splitlines()[1].split(",")
    canary_id, mask_path = row[0], site / row[5]
    mask = sitk.ReadImage(str(mask_path))
    grown = sitk.BinaryDilate(mask > 0, [6, 6, 3])
    sitk.WriteImage(sitk.Cast(mask + sitk.Cast((grown - (mask > 0)) * 3, mask.GetPixelID()), mask.GetPixelID()),
                    str(mask_path))
    (site / "site.yaml").write_text(f"name: {specs[0].name}\noutbox_values: true\n")

    refused = specs[2].name
    folder = _run(tmp_path, root, 3, unapproved=(refused,))
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    assert refused not in doc["final"]["sites"] and len(doc["final"]["sites"]) == 2
    events = _events(folder)
    plan_hash = events[0]["data"]["plan_sha256"]
    refusal = next(e["data"] for e in events if e["event"] == "refusal")
    assert refusal["plan_sha256"] == plan_hash and plan_hash in refusal["reason"] and refused in refusal["reason"]
    assert "radfed site approve" in refusal["reason"]
    # the site's folders stay at the site: the reason names them by placeholder (issue 15, finding 7)
    assert str(tmp_path) not in refusal["reason"] and "--site <site>" in refusal["reason"]
    assert all(str(tmp_path) not in str(e["data"]) for e in events if e["event"] in ("refusal", "dropout"))
    # named by the site, with its whole reason: in the dropouts, on the report's first screen, at the run's end,
    # and as an answer, not a crash (no traceback in the log)
    (drop,) = [d for d in doc["dropouts"] if d["phase"] == "plan"]
    assert drop["site"] == refusal["site"] == refused and drop["reason"] == refusal["reason"]
    first_screen = (folder / "report.html").read_text(encoding="utf-8").split("<nav>")[0]
    assert f"{refused} left" in first_screen and f"radfed site approve {plan_hash}" in first_screen
    log = (tmp_path / "flwr" / "flwr-run.log").read_text(encoding="utf-8")
    assert f"Site {refused} did not take part from the plan phase on: run plan not approved" in log
    assert "Traceback" not in log
    approved = [e["data"] for e in events if e["event"] == "site-plan"]
    assert {e["site"] for e in approved} == {specs[0].name, specs[1].name}
    assert all(e["plan_sha256"] == plan_hash and e["approval"] == "approved" for e in approved)
    # the refused site read nothing and sent nothing; it kept the plan for its administrator to review
    work = root / refused / ".radfed"
    assert not (work / "cache").exists() and not (work / "outbox.jsonl").exists()
    assert (work / "plans" / f"{plan_hash}.json").exists()

    # no number any message carried equals a value of the canary's features, raw or harmonised
    names_row = (site / ".radfed").glob("features-*.csv")
    table = next(names_row).read_text(encoding="utf-8").splitlines()
    header, rows = table[0].split(","), {r.split(",")[0]: r.split(",") for r in table[1:]}
    raw = np.array([float(v) for v in rows[canary_id][3:]])
    others = np.array([[float(v) for v in r[3:]] for cid, r in rows.items() if cid != canary_id])
    volume = header.index("shape/edema/original_shape_VoxelVolume") - 3
    assert raw[volume] > 3 * others[:, volume].max()
    params = json.loads((site / ".radfed" / "harmonization" / f"run-{doc['run_id']}.json").read_text(encoding="utf-8"))
    cols = [header.index(n) - 3 for n in params["features"]]
    harmonised = combat.SiteCombat.from_dict(params).apply(raw[cols][None, :])[0]
    unique = [v for v in np.r_[raw, harmonised]
              if np.isfinite(v) and abs(v - round(v)) > 1e-6 and not np.any(np.isclose(others, v, rtol=1e-9))]
    assert len(unique) > 500
    sent = np.array([x for line in (site / ".radfed" / "outbox.jsonl").read_text(encoding="utf-8").splitlines()
                     for x in numbers(json.loads(line)["records"])])
    assert len(sent) > 10_000  # arrays were logged with their values
    sent = np.sort(sent)
    for v in unique:
        i = np.searchsorted(sent, v)
        near = sent[max(i - 1, 0): i + 1]
        assert not np.any(np.isclose(near, v, rtol=1e-9, atol=0)), v


def test_exact_training_is_the_pooled_fit_and_refuses_too_many_features(tmp_path):
    from sklearn.linear_model import LogisticRegression

    from common import exact, metrics, model

    root = tmp_path / "data"
    for i, spec in enumerate(synth.tiny_sites(2, 12)):  # 2 blocks of 6 per class: 12 training cases per site
        synth.write_site(root, spec, seed=500 + i)
    config = {"training": "exact", "harmonization": "none", "select-features": 4, "external-validation": "none",
              "local-only": "none"}
    folder = _run(tmp_path / "ok", root, 2, **config)
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    saved = torch.load(folder / "model.pt", weights_only=False)
    coef, mean, scale = exact.from_state_dict(saved["state_dict"])
    names = sorted(p.name for p in root.iterdir() if (p / "manifest.csv").exists())
    data = [load_site_data(root / n, app_run_config({"test-fraction": 0.3, "split-seed": 7, "min-cases-per-class": K}))
            for n in names]
    agreed = sorted(set.intersection(*(set(n for n, ok in zip(d.table.names, np.all(np.isfinite(d.table.values), 0),
                                                              strict=True) if ok) for d in data)))
    train = [site_matrix(d, agreed, held_out=False, names=saved["features"]) for d in data]
    x, y = np.vstack([t[0] for t in train]), np.concatenate([t[1] for t in train])
    pos_weight = float(np.sum(y == 0) / np.sum(y == 1))
    reference = LogisticRegression(C=1.0, class_weight={0: 1.0, 1: pos_weight}, solver="newton-cholesky", tol=1e-12,
                                   max_iter=1000).fit((x - mean) / scale, y)
    np.testing.assert_allclose(coef, np.r_[reference.intercept_, reference.coef_[0]], atol=1e-6)
    events = _events(folder)
    rounds = [e for e in events if e["event"] == "newton-round"]
    assert 2 <= len(rounds) <= 15 and events[-1]["data"]["status"] == "completed"
    held = []
    for name, d in zip(names, data, strict=True):  # the held-out AUC each site sent is the model's AUC there
        xt, yt = site_matrix(d, agreed, held_out=True, names=saved["features"])
        prob = 1 / (1 + np.exp(-((xt - mean) / scale @ coef[1:] + coef[0])))
        assert doc["final"]["sites"][name]["auc"] == pytest.approx(metrics.roc_auc(yt, prob), abs=1e-12)
        held.append((yt, model.predict_proba(model.model_from_state(saved["state_dict"]), xt)))
    _pooled_metrics_are_the_pooled_cases(doc, events, held)

    # LASSO selection (select-l1): the features the pooled L1 fit on the 4 candidates sets to zero leave, and
    # the sparse model is then trained (here by FedAvg) on the rest; pick a penalty that drops some, not all
    z_sites = [((t[0] - mean) / scale, t[1]) for t in train]
    path = {float(l1): exact.fit_exact(z_sites, pos_weight, l2=1.0, l1=float(l1)).coef[1:]
            for l1 in np.geomspace(0.05, 50.0, 61)}
    l1 = next(v for v, c in path.items() if 0 < np.sum(c == 0.0) < len(c))
    expected = [n for n, c in zip(saved["features"], path[l1], strict=True) if c != 0.0]
    folder = _run(tmp_path / "lasso", root, 2, **{**config, "training": "fedavg", "select-l1": l1,
                                                  "num-server-rounds": 1})
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    assert list(doc["features"]["selected"]) == expected and doc["features"]["dropped_l1"] == 4 - len(expected)
    [entry] = [e["data"] for e in _events(folder) if e["event"] == "selection-l1"]
    assert entry["features"] == expected and entry["l1"] == l1 and entry["converged"]
    np.testing.assert_allclose([entry["coefficients"][n] for n in saved["features"]], path[l1], atol=1e-6)
    assert torch.load(folder / "model.pt", weights_only=False)["features"] == expected
    report_md = (folder / "report.md").read_text(encoding="utf-8")
    assert "by LASSO" in report_md and f"then LASSO with select-l1 = {l1}" in report_md

    # with more coefficients than the sites' cases allow, every site refuses and says how many features fit
    folder = _run(tmp_path / "refused", root, 2, **{**config, "select-features": 8})
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "failed" and "too few sites" not in doc["error"]
    dropouts = [e["data"] for e in _events(folder) if e["event"] == "dropout"]
    assert {d["site"] for d in dropouts} == set(names)
    assert all("too few for exact federated logistic regression with 8 features" in d["reason"] for d in dropouts)


def _pooled_metrics_are_the_pooled_cases(doc: dict, events: list[dict], held: list[tuple[np.ndarray, np.ndarray]]
                                         ) -> None:
    """final.pooled, from the sites' aggregates only, against scikit-learn on the concatenated held-out scores
    (``held``: per site, labels and the final model's probabilities, recomputed in-process)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import brier_score_loss, roc_auc_score

    from common import clinical

    pooled = doc["final"]["pooled"]
    y = np.concatenate([h[0] for h in held]).astype(int)
    prob = np.concatenate([h[1] for h in held])
    assert pooled["n"] == len(y) and pooled["n_hgg"] == int(y.sum())
    assert pooled["sites"] == sorted(doc["final"]["sites"])
    # pooled AUC: the exact one lies in the stated range, within the stated bound of the estimate
    exact_auc = roc_auc_score(y, prob)
    assert pooled["auc_low"] - 1e-12 <= exact_auc <= pooled["auc_high"] + 1e-12
    assert abs(pooled["auc"] - exact_auc) <= pooled["auc_bound"] + 1e-12  # 6 cases per class a site: one group each
    assert pooled["auc_ci"][0] <= pooled["auc_low"] and pooled["auc_high"] <= pooled["auc_ci"][1]
    assert pooled["binning"]["bins"] == 40
    assert pooled["brier"] == pytest.approx(brier_score_loss(y, prob), rel=1e-12)
    # calibration slope and intercept: the unpenalised logistic fit of y on logit(p) of the pooled cases
    cal = pooled["calibration"]
    reference = LogisticRegression(penalty=None, solver="newton-cholesky", tol=1e-14, max_iter=1000).fit(
        clinical.logit(prob)[:, None], y)
    assert cal["converged"] and 2 <= cal["rounds"] <= cal["max_rounds"] == 25
    assert cal["intercept"] == pytest.approx(reference.intercept_[0], abs=1e-6)
    assert cal["slope"] == pytest.approx(reference.coef_[0][0], abs=1e-6)
    rounds = [e["data"] for e in events if e["event"] == "recalibration-round"]
    assert len(rounds) == cal["rounds"] and all(sorted(r["sites"]) == pooled["sites"] for r in rounds)
    # net benefit at every threshold all sites kept: TP/N - FP/N t/(1 - t) of the pooled cases
    curve = pooled["net_benefit"]
    # (here, 6 cases per class a site, a site withholds most thresholds: elsewhere the stated range must hold it)
    for i, t in enumerate(curve["threshold"]):
        called = prob >= t
        direct = np.sum(called & (y == 1)) / len(y) - np.sum(called & (y == 0)) / len(y) * t / (1 - t)
        assert curve["model_low"][i] - 1e-12 <= direct <= curve["model_high"][i] + 1e-12
        if curve["kept_by_every_site"][i]:
            assert curve["model"][i] == pytest.approx(direct, abs=1e-12)


def _set_covariates(site: Path, train_ids: set[str], missing_age: str | None = None) -> None:
    """Rewrite the manifest's age and sex: sexes alternate within each class of the training split (so each
    level, and each level-class pair the release rule weighs, has enough training cases) and within the
    held-out cases; ``missing_age`` gets an empty age."""
    manifest = site / "manifest.csv"
    lines = manifest.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    age, sex, diagnosis = header.index("age"), header.index("sex"), header.index("diagnosis")
    for group in (True, False):
        for cls in ("HGG", "BM"):
            part = sorted((r for r in rows if (r[0] in train_ids) == group and r[diagnosis] == cls),
                          key=lambda r: r[0])
            for j, row in enumerate(part):
                row[sex] = "FM"[j % 2]
    for row in rows:
        if row[0] == missing_age:
            row[age] = ""
    manifest.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def _training_ids(site: Path, case_ids: list[str], labels: np.ndarray, test_fraction: float, seed: int) -> set[str]:
    """The training split the site will use for these usable cases: its own release blocks (client.ledger),
    drawn with the site's secret, which the run then reuses."""
    blocking = Ledger(site / ".radfed" / "release", K).blocking(case_ids, labels)
    held = blocking.held_out(case_ids, test_fraction, seed)
    return {c for c, h in zip(case_ids, held, strict=True) if not h}


def test_combat_covariates_from_the_manifest_equal_the_in_process_protocol(tmp_path):
    """combat-covariates = "age,sex=F|M": each site codes age and sex from its manifest (they never leave),
    the federation's ComBat equals common.combat's in-process protocol (itself checked against neuroCombat
    in test_combat) on the pooled training splits; a case without an age is named and left out."""
    root = tmp_path / "data"
    # 15 per class: 3 release blocks; the training split's sex-by-class groups must stay large enough that
    # ComBat's per-level sums single out no one (the release rule, docs/privacy.md)
    specs = synth.tiny_sites(3, 15)
    config = {"combat-covariates": "age,sex=F|M", "select-features": 8, "external-validation": "none",
              "local-only": "none", "num-server-rounds": 1, "test-fraction": 0.3, "split-seed": 7}
    bad_site, bad_case = specs[1].name, f"{synth._case_prefix(specs[1].name)}-002"
    for i, spec in enumerate(specs):
        site = synth.write_site(root, spec, seed=300 + i)
        rows = [line.split(",") for line in (site / "manifest.csv").read_text(encoding="utf-8").splitlines()[1:]]
        rows = [r for r in rows if not (spec.name == bad_site and r[0] == bad_case)]
        train_ids = _training_ids(site, [r[0] for r in rows], np.array([int(r[1] == "HGG") for r in rows]), 0.3, 7)
        _set_covariates(site, train_ids, bad_case if spec.name == bad_site else None)
    folder = _run(tmp_path, root, 3, **config)
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    names = [s.name for s in specs]
    assert doc["sites"][bad_site]["split"]["n-failed"] == 1
    errors = json.loads((root / bad_site / ".radfed" / "errors.json").read_text(encoding="utf-8"))
    [problem] = [p for p in errors["problems"] if p["case_id"] == bad_case]
    assert "no age value" in problem["reason"] and "age" in problem["fix"] and errors["cases_used"] == 29

    late = json.loads((folder / "harmonization.json").read_text(encoding="utf-8"))
    assert late["covariates"] == "sex=F|M,age" and len(late["beta_cov"]) == 2  # sex=M indicator, age
    params = [json.loads((root / n / ".radfed" / "harmonization" / f"run-{doc['run_id']}.json")
                         .read_text(encoding="utf-8")) for n in names]
    assert all(p["covariates"] == "sex=F|M,age" for p in params)

    run_config = app_run_config({**config, "min-cases-per-class": K, "harmonization": "combat"})
    data = [load_site_data(root / n, run_config) for n in names]
    assert bad_case not in data[1].table.case_ids
    agreed = params[0]["features"]
    xs = [site_matrix(d, agreed, held_out=False)[0] for d in data]
    cs = [d.covariates[~d.held_out] for d in data]
    assert all(c.shape == (len(x), 2) for c, x in zip(cs, xs, strict=True))
    assert sorted(np.unique(np.concatenate(cs)[:, 0])) == [0.0, 1.0]
    expected, _ = combat.federated_combat(xs, cs)
    for d, p, x, c, want in zip(data, params, xs, cs, expected, strict=True):
        got = combat.SiteCombat.from_dict(p).apply(x, c)
        scale = np.sqrt(np.asarray(late["var_pooled"]))
        ok = scale > 0
        np.testing.assert_allclose(got[:, ok] / scale[ok], want[:, ok] / scale[ok], rtol=0, atol=1e-9,
                                   err_msg=d.site.name)
    # the sexes' ComBat design really entered: without covariates the adjustment is another one
    plain, _ = combat.federated_combat(xs)
    assert np.max(np.abs(plain[0] - expected[0])) > 1e-6


def test_leave_one_site_out_learns_nothing_from_the_held_out_site(tmp_path):
    """Each fold is fitted without its held-out site: change that site's images (a different scanner gain) and
    the fold's model is bit-identical, while the folds it trains in and the main model change. The held-out
    site harmonises itself against the fold's pooled ComBat estimates, as a late-joining hospital does."""
    root = tmp_path / "data"
    specs = synth.tiny_sites(3, 12)
    for i, spec in enumerate(specs):
        synth.write_site(root, spec, seed=700 + i)
    config = {"training": "exact", "select-features": 4, "external-validation": "loso", "local-only": "none"}

    def folds(folder: Path) -> dict[str, str]:
        doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        assert doc["status"] == "completed", doc["error"]
        return {e["data"]["fold"]: e["data"]["model_sha256"] for e in _events(folder)
                if e["event"] == "external-validation"} | {"": doc["model_sha256"]}

    before = folds(_run(tmp_path / "before", root, 3, **config))
    held = specs[0].name
    synth.write_site(root, replace(specs[0], gain=specs[0].gain * 1.7, offset=specs[0].offset + 40.0), seed=700)
    after_folder = _run(tmp_path / "after", root, 3, **config)
    after = folds(after_folder)
    assert sorted(before) == sorted(after) == ["", *sorted(s.name for s in specs)]
    assert after[held] == before[held]  # nothing of the held-out site entered its fold
    for other in (s.name for s in specs[1:]):
        assert after[other] != before[other]  # the changed site trains in these folds: they see it
    assert after[""] != before[""]
    # the held-out site joined its fold's harmonisation (no labels) and scored the fold's model on all its cases
    # (one join per fold; in the order the folds finish, which under fold-batching need not be the folds' order)
    joins = [e["data"] for e in _events(after_folder) if e["event"] == "harmonization-join"]
    assert sorted(j["fold"] for j in joins) == sorted(s.name for s in specs)
    assert all(j["sites"] == [j["fold"]] for j in joins)
