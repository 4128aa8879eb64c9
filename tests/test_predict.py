"""`radfed predict` on real files: synthetic cases written with SimpleITK, real pyradiomics, ComBat parameters
fitted with common.combat on the real features of two small synthetic sites, and a model.pt written with
torch.save in the format server/app.py writes."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from client import predict
from client.extract import extract_case_features
from client.site import load_site
from common import combat, model
from common import covariates as cv
from common.canon import sha256_json
from common.profile import load_profile
from common.protocol import PROTOCOL_VERSION
from radfed import synth
from radfed.cli import main as radfed_main

PROFILE = load_profile("default")
NEW = "a-004"  # the case scored as new; a-001..a-003 are the site's "training" cases
RUN = 7
N_MODEL_FEATURES = 8


def _save_model(path: Path, state: dict, features: list[str], **extra: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "features": features, "profile_sha256": PROFILE.sha256,
                "protocol": PROTOCOL_VERSION, **extra}, path)
    return path


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """Site a (4 cases; 3 train ComBat and the model's standardisation) and site b (2 cases, another scanner),
    site a's run-7 ComBat parameters as the ClientApp saves them, and run 7's model.pt (today's format)."""
    root = tmp_path_factory.mktemp("predict")
    spec_a, spec_b = synth.tiny_sites(2, 2)[0], synth.tiny_sites(2, 1)[1]
    site_a = synth.write_site(root / "sites", spec_a, seed=3)
    site_b = synth.write_site(root / "sites", spec_b, seed=4)
    cases_a = load_site(site_a, PROFILE.sequences).cases
    cases_b = load_site(site_b, PROFILE.sequences).cases
    feats_a = {c.case_id: extract_case_features(c, PROFILE) for c in cases_a}
    feats_b = [extract_case_features(c, PROFILE) for c in cases_b]
    train = [feats_a[c.case_id] for c in cases_a if c.case_id != NEW]
    rows = train + feats_b
    agreed = sorted(n for n in rows[0] if all(n in r and np.isfinite(r[n]) for r in rows))
    x_a = np.array([[r[n] for n in agreed] for r in train])
    x_b = np.array([[r[n] for n in agreed] for r in feats_b])
    adjusted, params = combat.federated_combat([x_a, x_b])
    harm_dir = site_a / ".radfed" / "harmonization"
    harm_dir.mkdir(parents=True)
    (harm_dir / f"run-{RUN}.json").write_text(
        json.dumps({**params[0].to_dict(), "features": agreed, "run_id": RUN}), encoding="utf-8")

    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(agreed), N_MODEL_FEATURES, replace=False).tolist())
    features = [agreed[j] for j in chosen]
    pooled = np.vstack(adjusted)[:, chosen]
    std = pooled.std(axis=0)
    net = model.build_model(pooled.mean(axis=0), np.where(std > 0, std, 1.0))
    with torch.no_grad():
        net.linear.weight.copy_(torch.as_tensor(rng.normal(0, 0.8, (1, N_MODEL_FEATURES))))
        net.linear.bias.fill_(0.2)
    state = net.state_dict()
    model_path = _save_model(root / "runs" / f"20250101-120000-run{RUN}" / "model.pt", state, features)
    return {"root": root, "site": site_a, "case": next(c for c in cases_a if c.case_id == NEW),
            "new_features": feats_a[NEW], "agreed": agreed, "params": params[0], "features": features,
            "state": state, "model": model_path, "harm": harm_dir / f"run-{RUN}.json", "train_features": train,
            "x_b": x_b}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = radfed_main(["predict", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _files(case, **override) -> list[str]:
    paths = {**case.images, "mask": case.mask, **override}
    argv = [f"--image={seq}={paths[seq]}" for seq in PROFILE.sequences]
    return [*argv, "--mask", str(paths["mask"])]


def _direct(fed, harmonize: bool = True) -> float:
    """extract -> SiteCombat.apply on the whole agreed list -> the model's columns -> predict_proba."""
    x = np.array([[fed["new_features"][n] for n in fed["agreed"]]])
    if harmonize:
        x = fed["params"].apply(x)
    index = {n: i for i, n in enumerate(fed["agreed"])}
    x = x[:, [index[n] for n in fed["features"]]]
    return float(model.predict_proba(model.model_from_state(fed["state"]), x)[0])


def test_probability_equals_direct_computation_and_drivers_sum_to_logit(fed, capsys):
    code, out, err = _run(["--model", str(fed["model"]), "--site", str(fed["site"]), "--case-id", NEW, "--json"],
                          capsys)
    assert code == 0, err
    result = json.loads(out)
    expected = _direct(fed)
    assert result["probability_hgg"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert result["probability_bm"] == pytest.approx(1 - expected, rel=1e-12, abs=1e-15)
    # the site's ComBat parameters matter: without them the probability is another one
    assert abs(_direct(fed, harmonize=False) - expected) > 1e-6

    contributions = [c["contribution"] for c in result["contributions"]]
    assert len(contributions) == N_MODEL_FEATURES
    assert sum(contributions) == pytest.approx(result["logit"] - result["intercept"], rel=1e-12, abs=1e-12)
    assert result["intercept"] == pytest.approx(0.2)
    assert result["logit"] == pytest.approx(math.log(expected / (1 - expected)), rel=1e-9)
    drivers = result["drivers"]
    assert len(drivers) == 5
    assert [abs(d["contribution"]) for d in drivers] == sorted((abs(c) for c in contributions), reverse=True)[:5]
    for d in drivers:
        assert d["feature"] in fed["features"]
        assert d["contribution"] == pytest.approx(d["weight"] * d["z"], rel=1e-12)
        assert d["towards"] == ("HGG" if d["contribution"] > 0 else "BM")
        assert f"points to {d['towards']}" in d["words"] and "federation's average" in d["words"]

    assert result["model"]["sha256"] == hashlib.sha256(fed["model"].read_bytes()).hexdigest()
    from flwr.app import ArrayRecord

    from server.strategy import record_sha256
    assert result["model"]["weights_sha256"] == record_sha256(ArrayRecord(fed["state"]))  # the audit log's hash
    assert result["model"]["run_id"] == str(RUN) and result["model"]["run_id_source"] == "the run folder's name"
    assert result["profile"]["sha256"] == PROFILE.sha256
    assert result["harmonization"]["method"] == "combat"
    assert result["harmonization"]["file"] == str(fed["harm"]) and result["harmonization"]["run_id"] == str(RUN)
    assert result["offline"] is True and result["sent"] == "nothing"
    assert result["case"] == {"id": NEW, "source": "site", "inputs": {
        **{s: str(p) for s, p in fed["case"].images.items()}, "mask": str(fed["case"].mask)}}
    assert any("optimistic" in n for n in result["notes"])


def test_new_case_from_files_with_the_proposed_model_fields(fed, tmp_path, capsys):
    """A model.pt that names its run and harmonisation (proposed fields) anywhere on disk; text output."""
    path = _save_model(tmp_path / "model.pt", fed["state"], fed["features"], run_id=RUN, harmonization="combat")
    code, out, err = _run(["--model", str(path), "--site", str(fed["site"]), *_files(fed["case"]),
                           "--case-name", "P-17", "--top", "3"], capsys)
    assert code == 0, err
    assert f"probability of HGG  {_direct(fed):.3f}" in out
    assert "case P-17 at site tiny-a" in out
    assert predict.OFFLINE_NOTE in out
    assert hashlib.sha256(path.read_bytes()).hexdigest() in out and PROFILE.sha256 in out
    assert f"ComBat parameters of run {RUN} (run id from model.pt)" in out
    assert out.count("points to") == 3
    assert "log-odds are" in out and "not a diagnostic device" in out


# --------------------------------------------------------------------------------------------------------
# Refusals (exit 2): checked before the case is read


def test_refuses_another_profile(fed, tmp_path, capsys):
    path = _save_model(tmp_path / "model.pt", fed["state"], fed["features"], run_id=RUN)
    doc = torch.load(path, weights_only=True)
    doc["profile_sha256"] = "0" * 64
    torch.save(doc, path)
    code, _, err = _run(["--model", str(path), "--site", str(fed["site"]), "--case-id", NEW], capsys)
    assert code == 2
    assert "refused" in err and PROFILE.sha256 in err and "0" * 64 in err
    assert "site.yaml" in err and "fix:" in err


def test_refuses_another_protocol(fed, tmp_path, capsys):
    path = _save_model(tmp_path / "model.pt", fed["state"], fed["features"], run_id=RUN)
    doc = torch.load(path, weights_only=True)
    doc["protocol"] = "0"
    torch.save(doc, path)
    code, out, _ = _run(["--model", str(path), "--site", str(fed["site"]), "--case-id", NEW, "--json"], capsys)
    assert code == 2
    result = json.loads(out)
    assert result["status"] == "refused" and result["exit_code"] == 2
    assert "protocol 0" in result["reason"] and f"protocol {PROTOCOL_VERSION}" in result["reason"]
    assert "release" in result["fix"]


def test_refuses_missing_harmonisation_naming_the_file(fed, tmp_path, capsys):
    path = _save_model(tmp_path / "20250102-090000-run99" / "model.pt", fed["state"], fed["features"])
    code, _, err = _run(["--model", str(path), "--site", str(fed["site"]), "--case-id", NEW], capsys)
    assert code == 2
    assert str(fed["site"] / ".radfed" / "harmonization" / "run-99.json") in err
    # a site that did not take part is told the exact command that makes it a late joiner
    joined = f"radfed site join {path.parent / 'harmonization.json'} --site {Path(fed['site']).resolve()}"
    assert joined in " ".join(err.split()) and "--no-harmonization" in err
    # a model that says it was harmonised does not offer to skip it
    path = _save_model(tmp_path / "m2" / "model.pt", fed["state"], fed["features"], run_id=99, harmonization="combat")
    code, _, err = _run(["--model", str(path), "--site", str(fed["site"]), "--case-id", NEW], capsys)
    assert code == 2 and "run-99.json" in err and "--no-harmonization" not in err


def test_refuses_a_harmonisation_file_for_other_features(fed, tmp_path, capsys):
    doc = json.loads(fed["harm"].read_text())
    drop = fed["agreed"].index(fed["features"][2])
    for key in ("grand_mean", "var_pooled", "gamma_star", "delta_star", "unadjusted", "features"):
        doc[key] = doc[key][:drop] + doc[key][drop + 1:]
    doc["beta_cov"] = []
    other = tmp_path / "run-7.json"
    other.write_text(json.dumps(doc))
    code, out, _ = _run(["--model", str(fed["model"]), "--site", str(fed["site"]), "--case-id", NEW,
                         "--harmonization", str(other), "--json"], capsys)
    assert code == 2
    result = json.loads(out)
    assert str(other) in result["reason"] and "lacks 1 of the model's 8 features" in result["reason"]
    assert fed["features"][2] in result["reason"] and "--run-id" in result["fix"]


def test_run_identification(fed, tmp_path):
    """No run id anywhere: the only fitting file is used; two fitting files are ambiguous until --run-id."""
    path = _save_model(tmp_path / "plain" / "model.pt", fed["state"], fed["features"])
    loaded = predict.load_model_file(path)
    assert loaded.run_id is None
    work = tmp_path / "work"
    (work / "harmonization").mkdir(parents=True)
    shutil.copy(fed["harm"], work / "harmonization" / "run-7.json")
    one = predict.resolve_harmonization(loaded, work)
    assert one.run_id == "7" and one.path == work / "harmonization" / "run-7.json" and one.notes

    doc = json.loads(fed["harm"].read_text())
    (work / "harmonization" / "run-8.json").write_text(json.dumps({**doc, "run_id": 8}))
    with pytest.raises(predict.PredictRefusal) as refused:
        predict.resolve_harmonization(loaded, work)
    assert "runs 7, 8" in refused.value.reason and "--run-id" in refused.value.fix
    assert predict.resolve_harmonization(loaded, work, run_id="8").run_id == "8"

    named = predict.load_model_file(_save_model(tmp_path / "named" / "model.pt", fed["state"], fed["features"],
                                                run_id=7))
    with pytest.raises(predict.PredictRefusal, match="--run-id 8 but .* run 7"):
        predict.resolve_harmonization(named, work, run_id="8")
    with pytest.raises(predict.PredictRefusal, match="holds ComBat parameters of run 7"):
        predict.resolve_harmonization(named, work, skip=True)
    combat_model = predict.load_model_file(_save_model(tmp_path / "c" / "model.pt", fed["state"], fed["features"],
                                                       harmonization="combat"))
    with pytest.raises(predict.PredictRefusal, match="harmonised with ComBat"):
        predict.resolve_harmonization(combat_model, work, skip=True)
    with pytest.raises(predict.PredictRefusal, match="holds the parameters of run 8, but the model is of run 7"):
        predict.resolve_harmonization(named, work, explicit=work / "harmonization" / "run-8.json")
    assert predict.resolve_harmonization(loaded, tmp_path / "empty", skip=True).method == "none"
    # the proposed agreed_features_sha256 pins the exact agreed list
    pinned = predict.load_model_file(_save_model(tmp_path / "p" / "model.pt", fed["state"], fed["features"], run_id=7,
                                                 agreed_features_sha256=sha256_json(fed["agreed"])))
    assert predict.resolve_harmonization(pinned, work).run_id == "7"
    pinned.agreed_sha256 = sha256_json(fed["agreed"][1:])
    with pytest.raises(predict.PredictRefusal, match="is not the run's agreed list"):
        predict.resolve_harmonization(pinned, work)
    none_model = predict.load_model_file(_save_model(tmp_path / "n" / "model.pt", fed["state"], fed["features"],
                                                     harmonization="none"))
    assert predict.resolve_harmonization(none_model, tmp_path / "empty").method == "none"


# --------------------------------------------------------------------------------------------------------
# Bad cases (exit 1): the message names the case and the fix


def _write_like(reference: Path, array: np.ndarray, path: Path, spacing: tuple[float, ...] | None = None) -> Path:
    ref = sitk.ReadImage(str(reference))
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ref)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("how, expected, fix", [
    ("empty-mask", "mask is empty", "segment the lesion"),
    ("missing-image", "is missing", "restore the file"),
    ("wrong-labels", "label(s) [5] outside the profile's regions", "relabel the mask"),
    ("geometry", "different grids", "resample mask"),
    ("nan-voxels", "NaN/Inf voxel", "replace the non-finite voxels"),
])
def test_bad_case_is_named_with_the_fix(fed, tmp_path, capsys, how, expected, fix):
    case = fed["case"]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask)))
    override: dict[str, Path] = {}
    if how == "empty-mask":
        override["mask"] = _write_like(case.mask, np.zeros_like(mask), tmp_path / "empty.nii.gz")
    elif how == "missing-image":
        override["flair"] = tmp_path / "nowhere_flair.nii.gz"
    elif how == "wrong-labels":
        override["mask"] = _write_like(case.mask, np.where(mask == 3, 5, mask).astype(mask.dtype),
                                       tmp_path / "labels.nii.gz")
    elif how == "geometry":
        override["mask"] = _write_like(case.mask, mask, tmp_path / "grid.nii.gz", spacing=(2.0, 2.0, 4.0))
    else:  # NRRD: SimpleITK's NIfTI writer does not keep NaN
        adc = sitk.GetArrayFromImage(sitk.ReadImage(str(case.images["adc"])))
        adc[adc.shape[0] // 2, 3, 3] = np.nan
        override["adc"] = _write_like(case.images["adc"], adc, tmp_path / "adc.nrrd")
    code, _, err = _run(["--model", str(fed["model"]), "--site", str(fed["site"]), *_files(case, **override),
                         "--case-name", "P-BAD"], capsys)
    assert code == 1, err
    assert "cannot score the case: case P-BAD:" in err and expected in err
    assert fix in err.split("fix:")[1]


def test_bad_case_json_and_unnamed_case(fed, tmp_path, capsys):
    """Without --case-name the case is named after its mask file."""
    empty = _write_like(fed["case"].mask, np.zeros((16, 40, 40), dtype=np.uint8), tmp_path / "P-33_seg.nii.gz")
    code, out, _ = _run(["--model", str(fed["model"]), "--site", str(fed["site"]),
                         *_files(fed["case"], mask=empty), "--json"], capsys)
    assert code == 1
    result = json.loads(out)
    assert result["status"] == "bad-input" and result["case"] == "P-33_seg"
    assert result["reason"].startswith("case P-33_seg: mask is empty")


def test_non_finite_feature_is_refused_with_the_case(fed):
    loaded = predict.load_model_file(fed["model"])
    harmonization = predict.resolve_harmonization(loaded, fed["site"] / ".radfed")
    features = dict(fed["new_features"])
    features[fed["features"][0]] = float("nan")
    with pytest.raises(predict.CaseRefusal) as refused:
        predict.score(features, loaded, harmonization, "P-NAN")
    assert refused.value.exit_code == 1
    assert "case P-NAN" in refused.value.reason and fed["features"][0] in refused.value.reason
    # a non-finite feature the model does not use is no obstacle
    unused = next(n for n in fed["agreed"] if n not in fed["features"])
    features = {**fed["new_features"], unused: float("nan")}
    probability, _, _ = predict.score(features, loaded, harmonization, "P-OK")
    assert probability == pytest.approx(_direct(fed), rel=1e-12)
    # a federation without harmonisation: the model sees the raw features
    without = predict.Harmonization("none", "test")
    probability, _, _ = predict.score(fed["new_features"], loaded, without, "P-OK")
    assert probability == pytest.approx(_direct(fed, harmonize=False), rel=1e-12)


def test_usage_refusals(fed, capsys):
    base = ["--model", str(fed["model"]), "--site", str(fed["site"])]
    code, _, err = _run([*base, "--case-id", "nobody"], capsys)
    assert code == 2 and "no case 'nobody'" in err
    code, _, err = _run([*base, "--image", f"t1c={fed['case'].images['t1c']}", "--mask", str(fed["case"].mask)],
                        capsys)
    assert code == 2 and "no image for flair, adc" in err
    code, _, err = _run([*base, "--case-id", NEW, "--mask", str(fed["case"].mask)], capsys)
    assert code == 2 and "not both" in err
    code, _, err = _run(["--model", str(fed["root"] / "none.pt"), "--site", str(fed["site"]), "--case-id", NEW],
                        capsys)
    assert code == 2 and "does not exist" in err


def test_offline_blocks_connections_and_restores_them():
    with predict.offline(), pytest.raises(OSError, match="offline"):
        socket.create_connection(("127.0.0.1", 9))
    with predict.offline(), socket.socket() as sock, pytest.raises(OSError, match="offline"):
        sock.connect(("127.0.0.1", 9))
    assert socket.create_connection.__name__ == "create_connection"


def test_combat_covariates_are_coded_from_the_manifest_or_the_command_line(fed, tmp_path, capsys):
    """A run that adjusted ComBat for age and sex: the new case's values come from the site's manifest or
    --covariate, are coded as in the run, and change the probability; a missing or unknown value is named."""
    spec = cv.parse("age,sex=F|M")
    x_a = np.array([[f[n] for n in fed["agreed"]] for f in fed["train_features"]])
    c_a, c_b = np.array([[0, 50.0], [1, 60.0], [0, 71.0]]), np.array([[1, 44.0], [0, 58.0]])
    _, params = combat.federated_combat([x_a, fed["x_b"]], [c_a, c_b])
    run = 8
    harm = fed["site"] / ".radfed" / "harmonization" / f"run-{run}.json"
    harm.write_text(json.dumps({**params[0].to_dict(), "features": fed["agreed"], "run_id": run,
                                "covariates": cv.describe(spec)}), encoding="utf-8")
    model_path = _save_model(tmp_path / f"20250101-120000-run{run}" / "model.pt", fed["state"], fed["features"])
    index = {n: i for i, n in enumerate(fed["agreed"])}

    def direct(age: float, male: bool) -> float:
        x = params[0].apply(np.array([[fed["new_features"][n] for n in fed["agreed"]]]),
                            np.array([[float(male), age]]))[:, [index[n] for n in fed["features"]]]
        return float(model.predict_proba(model.model_from_state(fed["state"]), x)[0])

    base = ["--model", str(model_path), "--site", str(fed["site"]), "--json"]
    code, out, err = _run([*base, "--case-id", NEW, "--covariate", "age=63", "--covariate", "sex=M"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["probability_hgg"] == pytest.approx(direct(63.0, True), rel=1e-12)
    assert result["harmonization"]["covariates"] == "sex=F|M,age"
    assert abs(direct(63.0, True) - direct(40.0, False)) > 1e-6  # the covariates matter

    manifest = fed["case"].covariates  # synth wrote age and sex for every case
    code, out, err = _run([*base, "--case-id", NEW], capsys)
    assert code == 0, err
    assert json.loads(out)["probability_hgg"] == pytest.approx(
        direct(float(manifest["age"]), manifest["sex"] == "M"), rel=1e-12)

    code, out, _ = _run([*base, "--case-id", NEW, "--covariate", "sex=X"], capsys)
    refused = json.loads(out)
    assert code == 1 and "sex 'X' is not one of the agreed levels F|M" in refused["reason"]
    assert "--covariate age=..." in refused["fix"]
    code, out, _ = _run([*base, "--case-id", NEW, "--covariate", "agee=63"], capsys)  # a typo is not ignored
    refused = json.loads(out)
    assert code == 2 and "--covariate agee: the run's ComBat adjusted for sex=F|M,age" in refused["reason"]
    code, out, _ = _run(["--model", str(fed["model"]), "--site", str(fed["site"]), "--json", "--case-id", NEW,
                         "--covariate", "age=63"], capsys)  # run 7 had no covariates
    assert code == 2 and "adjusted for no covariates" in json.loads(out)["reason"]
    code, out, _ = _run([*base, *_files(fed["case"]), "--covariate", "sex=F"], capsys)  # files carry no age
    refused = json.loads(out)
    assert code == 1 and "no age value" in refused["reason"] and "adjusts for sex=F|M,age" in refused["reason"]


def test_a_feature_far_outside_the_training_data_is_named(fed, tmp_path, capsys):
    """Moving one feature's training mean 10 standard deviations away from the case (everything else equal) adds
    exactly that feature to the note naming far-off features, with its distance; the case is still scored."""
    argv = ["--site", str(fed["site"]), "--case-id", NEW, "--json"]

    def far_features(model_path: Path) -> tuple[list[str], list[str], dict]:
        code, out, err = _run(["--model", str(model_path), *argv], capsys)
        assert code == 0, err
        result = json.loads(out)
        notes = [n for n in result["notes"] if "standard deviations from the federation's training mean" in n]
        return [c["feature"] for c in result["contributions"] if abs(c["z"]) > 4], notes, result

    before, notes, plain = far_features(fed["model"])
    assert len(notes) == (1 if before else 0)
    j = min(range(N_MODEL_FEATURES), key=lambda i: abs(plain["contributions"][i]["z"]))  # the most ordinary one
    state = {k: v.clone() for k, v in fed["state"].items()}
    state["mean"][j] -= 10 * state["scale"][j]
    shifted = _save_model(tmp_path / f"20250101-120000-run{RUN}" / "model.pt", state, fed["features"])
    after, notes, result = far_features(shifted)
    assert sorted(after) == sorted([*before, fed["features"][j]])
    (note,) = notes
    z = result["contributions"][j]["z"]
    assert 9 < z < 11 and note.startswith(f"{len(after)} of the model's {N_MODEL_FEATURES} features lie more than 4")
    assert f"{fed['features'][j]} at {z:+.1f} SD" in note  # the farthest is named first
