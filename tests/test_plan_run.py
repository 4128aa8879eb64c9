"""`radfed deploy run --plan`: the run takes its settings from the plan the sites approved, so the two cannot drift.
No processes: the plan-to-run-config step alone, on the real app folder and the real plan writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.plan import plan_sha256, run_plan
from common.profile import load_profile
from deploy.runs import plan_run_config
from radfed.cli import main
from radfed.launch import APP_DIR, app_run_config


def _written(tmp_path: Path, capsys, overrides: str) -> tuple[Path, str]:
    path = tmp_path / "plan.json"
    assert main(["plan", "write", "--output", str(path), "--run-config", overrides, "--json"]) == 0
    return path, json.loads(capsys.readouterr().out)["plan_sha256"]


def _hash_of(text: str) -> str:
    config = app_run_config(text, APP_DIR)
    return plan_sha256(run_plan(config, load_profile(str(config["profile"]))))


def test_the_run_config_from_a_plan_is_that_plan(tmp_path, capsys):
    plan, approved = _written(tmp_path, capsys, "num-server-rounds=7 training='exact' combat-covariates='age'")
    text = plan_run_config(plan, APP_DIR)
    assert _hash_of(text) == approved
    # where the coordinator keeps things may still be chosen: outside the plan hash
    local = plan_run_config(plan, APP_DIR, "output-dir='/srv/runs' query-timeout=60.0")
    assert _hash_of(local) == approved and app_run_config(local, APP_DIR)["output-dir"] == "/srv/runs"


def test_a_setting_beside_the_plan_is_refused(tmp_path, capsys):
    plan, _ = _written(tmp_path, capsys, "num-server-rounds=7")
    with pytest.raises(ValueError, match="--run-config sets num-server-rounds, test-fraction, which the approved "
                                         "plan fixes"):
        plan_run_config(plan, APP_DIR, "num-server-rounds=8 test-fraction=0.4 output-dir='/x'")


def test_a_plan_this_app_would_not_run_is_refused_naming_the_difference(tmp_path, capsys):
    plan, _ = _written(tmp_path, capsys, "")
    doc = json.loads(plan.read_text())
    doc["code_sha256"] = "0" * 64  # approved for another radfed version
    doc["run_config"]["min-cases-per-class"] = 7  # a setting in the file is simply used: the plan is the settings
    plan.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as refused:
        plan_run_config(plan, APP_DIR)
    text = str(refused.value)
    assert "would run another plan" in text and "The radfed code differs (sha256 000000000000" in text
    assert "min-cases-per-class" not in text  # the plan's own setting is used, so it is not a difference
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a run plan"):
        plan_run_config(tmp_path / "junk.json", APP_DIR)
