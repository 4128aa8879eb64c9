"""`radfed audit verify` compares the run files with the hashes run-end signed, and each site's receipts
with the rounds the log says the site took part in.

The run folder is written as ``server/app.py`` writes it: the real plan (``common.plan``), the real report
(``server.report.write_outputs``), a torch ``model.pt``, and a signed log whose run-end names every file's
sha256 (``server.audit.artifact_hashes``). Receipts are written in the client's format.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.model import build_model
from common.plan import plan_sha256, run_plan
from common.profile import load_profile
from radfed.cli import main as cli
from server import report
from server.audit import ARTIFACTS, AuditLog, artifact_hashes, load_or_create_key, verify

RUN_ID = 42
SITES = ("hospital-a", "hospital-b")
ROUNDS = 3


def _model(r: int) -> str:
    """The sha256 the log names for the global model after round r (0: the initial model)."""
    return hashlib.sha256(f"global model {r}".encode()).hexdigest()


def _fold_model(fold: str, r: int) -> str:
    return hashlib.sha256(f"fold {fold} model {r}".encode()).hexdigest()


def _config() -> dict[str, Any]:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    return dict(tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"])


def _write_run(folder: Path, key, harmonization: bool = True) -> Path:
    """A completed run: 2 sites x ROUNDS FedAvg rounds (train + evaluate), then one leave-one-site-out fold
    per site (the other site trains, the held-out one scores the fold's last model)."""
    cfg = _config()
    profile = load_profile(str(cfg["profile"]))
    audit = AuditLog(folder / "audit.jsonl", key)
    plan = run_plan(cfg, profile, code="c" * 64)
    (folder / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True), encoding="utf-8")
    audit.append("run-start", run_id=RUN_ID, config=cfg, plan_sha256=plan_sha256(plan))
    if harmonization:
        (folder / "harmonization.json").write_text(json.dumps({"run_id": RUN_ID, "grand_mean": [0.5]}),
                                                   encoding="utf-8")
    audit.append("model-init", model_sha256=_model(0), n_features=2, training="fedavg")
    for r in range(1, ROUNDS + 1):
        audit.append("round-train", round=r, sites={s: {"n": 20, "loss": 0.6 / r} for s in SITES},
                     aggregated_sha256=_model(r))
        audit.append("round-evaluate", round=r, sites={s: {"n": 10, "auc": 0.8} for s in SITES})
    for held in SITES:
        (other,) = [s for s in SITES if s != held]
        audit.append("model-init", model_sha256=_fold_model(held, 0), n_features=2, training="fedavg", fold=held)
        for r in range(1, ROUNDS + 1):
            audit.append("round-train", round=r, sites={other: {"n": 20, "loss": 0.5}}, fold=held,
                         aggregated_sha256=_fold_model(held, r))
        audit.append("external-validation", fold=held, trained_on=[other], model_sha256=_fold_model(held, ROUNDS))
    net = build_model(np.zeros(2), np.ones(2))
    torch.save({"state_dict": net.state_dict(), "features": ["f1", "f2"], "run_id": RUN_ID}, folder / "model.pt")
    result = report.RunResult(run_id=RUN_ID, folder=folder, config=cfg, profile=profile, status="completed")
    report.write_outputs(result)
    signed = artifact_hashes(folder)
    audit.append("run-end", status="completed", error="", artifacts=signed, metrics_sha256=signed["metrics.json"])
    return folder / "audit.jsonl"


def _receipts(site: str) -> list[dict[str, Any]]:
    """Every receipt the client writes at ``site`` during the run above (and one of an earlier run)."""
    rows = [{"run_id": 7, "site": site, "type": "train", "round": 1, "fold": "", "model_sha256": "0" * 64}]
    for r in range(1, ROUNDS + 1):
        rows.append({"run_id": RUN_ID, "site": site, "type": "train", "round": r, "fold": "",
                     "model_sha256": _model(r - 1)})
        rows.append({"run_id": RUN_ID, "site": site, "type": "evaluate", "round": r, "fold": "",
                     "model_sha256": _model(r)})
    for held in SITES:
        if held == site:
            rows.append({"run_id": RUN_ID, "site": site, "type": "evaluate", "round": ROUNDS, "fold": held,
                         "model_sha256": _fold_model(held, ROUNDS)})
        else:
            rows += [{"run_id": RUN_ID, "site": site, "type": "train", "round": r, "fold": held,
                      "model_sha256": _fold_model(held, r - 1)} for r in range(1, ROUNDS + 1)]
    return rows


def _write_receipts(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def key(tmp_path):
    return load_or_create_key(tmp_path / "keys" / "coordinator.pem")


@pytest.fixture
def log(tmp_path, key) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    return _write_run(folder, key)


@pytest.fixture
def receipts(tmp_path) -> dict[str, Path]:
    return {s: _write_receipts(tmp_path / s / ".radfed" / "receipts.jsonl", _receipts(s)) for s in SITES}


def _failed(result, *words: str) -> str:
    assert not result.ok, "verify passed a tampered run"
    assert result.bad_line is None, result.reason  # the chain itself is intact: the problem is a file
    assert all(w in result.reason for w in words), result.reason
    return result.reason


# ------------------------------------------------------------------------------------------- artifacts


def test_intact_run_verifies_every_artifact(log):
    end = json.loads(log.read_text(encoding="utf-8").splitlines()[-1])["data"]
    assert sorted(end["artifacts"]) == sorted(ARTIFACTS)  # every output of the folder is signed
    result = verify(log)
    assert result.ok, result.reason
    assert sorted(result.artifacts_checked) == sorted(ARTIFACTS) and result.problems == []


def test_altered_metrics_fail_naming_the_file(log):
    metrics = log.parent / "metrics.json"
    doc = json.loads(metrics.read_text(encoding="utf-8"))
    doc["status"] = "completed, AUC 0.99"
    metrics.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    reason = _failed(verify(log), "metrics.json", "differs from what run-end signed")
    actual = hashlib.sha256(metrics.read_bytes()).hexdigest()
    assert actual[:16] in reason  # expected vs actual hash prefixes are both named


def test_altered_model_fails(log):
    model = log.parent / "model.pt"
    doc = torch.load(model, weights_only=True)
    doc["state_dict"]["linear.weight"] = torch.ones_like(doc["state_dict"]["linear.weight"])
    torch.save(doc, model)
    _failed(verify(log), "model.pt", "differs")


def test_altered_report_html_fails(log):
    html = log.parent / "report.html"
    html.write_text(html.read_text(encoding="utf-8").replace("<body>", "<body><p>AUC 0.99</p>", 1), encoding="utf-8")
    _failed(verify(log), "report.html", "differs")


def test_deleted_report_html_fails(log):
    (log.parent / "report.html").unlink()
    result = verify(log)
    _failed(result, "report.html", "is missing")
    assert "report.html" not in result.artifacts_checked and "report.md" in result.artifacts_checked


def test_unsigned_extra_report_fails(tmp_path, key):
    # a run without ComBat signs no harmonization.json: one put there later is reported, not trusted
    folder = tmp_path / "run"
    folder.mkdir()
    log = _write_run(folder, key, harmonization=False)
    assert verify(log).ok
    (folder / "harmonization.json").write_text('{"grand_mean": [9.0]}', encoding="utf-8")
    _failed(verify(log), "harmonization.json", "is not signed")


def test_unsigned_report_beside_an_old_log_fails(tmp_path, key):
    # a log whose run-end names only metrics_sha256 (before artifacts were signed) proves nothing of report.html
    folder = tmp_path / "run"
    audit = AuditLog(folder / "audit.jsonl", key)
    audit.append("run-start", run_id=RUN_ID, config={})
    (folder / "metrics.json").write_text("{}", encoding="utf-8")
    audit.append("run-end", status="refused", metrics_sha256=hashlib.sha256(b"{}").hexdigest())
    result = verify(folder / "audit.jsonl")
    assert result.ok and result.artifacts_checked == ["metrics.json"], result.reason
    (folder / "report.html").write_text("<p>all good</p>", encoding="utf-8")
    _failed(verify(folder / "audit.jsonl"), "report.html", "is not signed")


def test_altered_plan_fails(log):
    plan_file = log.parent / "plan.json"
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    plan["run_config"]["min-cases-per-class"] = 1
    plan_file.write_text(json.dumps(plan, indent=2, sort_keys=True), encoding="utf-8")
    _failed(verify(log), "plan.json", "differs")


def test_plan_must_be_the_plan_run_start_names(tmp_path, key):
    # the coordinator signs a plan.json that is not the plan whose hash the sites approved
    folder = tmp_path / "run"
    audit = AuditLog(folder / "audit.jsonl", key)
    cfg = _config()
    plan = run_plan(cfg, load_profile(str(cfg["profile"])), code="c" * 64)
    audit.append("run-start", run_id=RUN_ID, config=cfg, plan_sha256=plan_sha256(plan))
    plan["run_config"]["min-cases-per-class"] = 1
    (folder / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True), encoding="utf-8")
    audit.append("run-end", status="refused", artifacts=artifact_hashes(folder))
    _failed(verify(folder / "audit.jsonl"), "plan.json", "not the plan the sites approved")


def test_log_only_skips_the_run_files(log):
    (log.parent / "report.html").unlink()
    result = verify(log, artifacts=False)
    assert result.ok and result.artifacts_checked == [], result.reason


# -------------------------------------------------------------------------------------------- receipts


def test_full_receipts_of_every_site_pass(log, receipts):
    result = verify(log, receipts=list(receipts.values()))
    assert result.ok, result.reason
    # per site: ROUNDS x (train + evaluate), ROUNDS fold trains for the other site's fold, 1 fold evaluation
    assert result.receipt_files == 2 and result.receipts_checked == 2 * (2 * ROUNDS + ROUNDS + 1)


def test_empty_receipts_file_fails(log, receipts):
    receipts["hospital-b"].write_text("", encoding="utf-8")
    _failed(verify(log, receipts=list(receipts.values())), str(receipts["hospital-b"]), "is empty")


def test_receipts_of_another_run_fail(log, receipts):
    path = receipts["hospital-a"]
    _write_receipts(path, [{**row, "run_id": 7} for row in _receipts("hospital-a")])
    _failed(verify(log, receipts=[path]), str(path), f"holds no receipt of run {RUN_ID}", "wrong site folder")


def test_half_deleted_receipts_fail(log, receipts):
    path = receipts["hospital-b"]
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[: len(lines) // 2]) + "\n", encoding="utf-8")
    result = verify(log, receipts=[path])
    _failed(result, "site hospital-b has no receipt for", "(the log says it took part)")
    assert any("more receipt(s)" in p for p in result.problems), result.problems  # the rest counted


def test_one_missing_round_is_named(log, receipts):
    path = receipts["hospital-b"]
    rows = [r for r in _receipts("hospital-b")
            if not (r["run_id"] == RUN_ID and r["type"] == "evaluate" and r["round"] == 2 and not r["fold"])]
    _write_receipts(path, rows)
    result = verify(log, receipts=list(receipts.values()))
    _failed(result, str(path), "site hospital-b has no receipt for evaluate round 2 (the log says it took part)")
    assert len(result.problems) == 1, result.problems


def test_missing_fold_evaluation_is_named(log, receipts):
    path = receipts["hospital-a"]
    _write_receipts(path, [r for r in _receipts("hospital-a") if r["fold"] != "hospital-a"])
    _failed(verify(log, receipts=[path]),
            f"site hospital-a has no receipt for evaluate round {ROUNDS} of the leave-one-site-out fold without "
            "hospital-a")


def test_exact_training_needs_no_train_receipts(tmp_path, key):
    # exact training sends coefficients in Newton queries, which leave no receipt; only the evaluation does
    folder = tmp_path / "run"
    audit = AuditLog(folder / "audit.jsonl", key)
    audit.append("run-start", run_id=RUN_ID, config={})
    audit.append("model-init", model_sha256=_model(0), training="exact")
    audit.append("newton-round", round=1, sites={"hospital-a": {"n": 20}})
    audit.append("round-train", round=1, sites={"hospital-a": {"n": 20}}, aggregated_sha256=_model(1))
    audit.append("round-evaluate", round=1, sites={"hospital-a": {"n": 10}})
    audit.append("run-end", status="completed", artifacts=artifact_hashes(folder))
    path = _write_receipts(tmp_path / "r.jsonl", [{"run_id": RUN_ID, "site": "hospital-a", "type": "evaluate",
                                                    "round": 1, "fold": "", "model_sha256": _model(1)}])
    result = verify(folder / "audit.jsonl", receipts=[path])
    assert result.ok and result.receipts_checked == 1, result.reason
    _write_receipts(path, [{"run_id": RUN_ID, "site": "hospital-a", "type": "train", "round": 1, "fold": "",
                            "model_sha256": _model(0)}])
    _failed(verify(folder / "audit.jsonl", receipts=[path]), "no receipt for evaluate round 1")


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_says_what_it_checked_and_what_differs(log, receipts, capsys):
    sites = [str(p.parents[1]) for p in receipts.values()]  # site folders: receipts in <site>/.radfed/
    assert cli(["audit", "verify", str(log), "--receipts", *sites]) == 0
    out = capsys.readouterr().out
    assert f"{len(ARTIFACTS)} match the hashes run-end signed" in out and "in 2 receipts file(s)" in out, out
    (log.parent / "report.md").write_text("# edited\n", encoding="utf-8")
    assert cli(["audit", "verify", str(log), "--receipts", *sites]) == 1
    out = capsys.readouterr().out
    assert "audit FAILED: 1 problem(s)" in out and "report.md differs from what run-end signed" in out, out
    assert cli(["audit", "verify", str(log), "--log-only"]) == 0
