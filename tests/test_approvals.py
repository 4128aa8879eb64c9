"""Run-plan approvals at a site: hashes, the append-only file, refusals before any data is read."""

import json

import pytest

from client.approvals import NotApproved, check_approved, decide, decisions, pending_plans
from client.site import SiteError
from common.plan import code_sha256, plan_sha256, run_plan, summary
from common.profile import load_profile
from radfed import synth
from radfed.cli import main
from radfed.launch import app_run_config


@pytest.fixture
def site(tmp_path):
    spec = synth.tiny_sites(1, 10)[0]
    synth.write_site(tmp_path, spec, seed=1)
    return tmp_path / spec.name


def _hash(config):
    return plan_sha256(run_plan(config, load_profile("default")))


def test_one_changed_config_value_changes_the_plan_hash():
    base = app_run_config({})
    assert _hash(base) == _hash(dict(base))
    for key, value in (("num-server-rounds", 21), ("min-cases-per-class", 6), ("harmonization", "none")):
        assert _hash({**base, key: value}) != _hash(base), key
    plan = run_plan(base, load_profile("default"))
    assert plan["code_sha256"] == code_sha256() and "query.moments" in plan["messages"]
    text = summary(plan)
    assert plan_sha256(plan) in text and "min-cases-per-class = 5" in text and "crossproducts" in text
    assert "ComBat reads" not in text  # no covariates by default
    with_covariates = summary(run_plan({**base, "combat-covariates": "age,sex=F|M"}, load_profile("default")))
    assert "ComBat reads these columns of your manifest: age,sex=F|M" in with_covariates


def test_unapproved_plan_is_refused_naming_hash_and_command_and_saved_for_review(site):
    config = app_run_config({"num-server-rounds": 3})
    plan_hash = _hash(config)
    with pytest.raises(NotApproved) as err:
        check_approved(site, config)
    message = str(err.value)
    assert plan_hash in message and f"radfed site approve {plan_hash} --site {site}" in message
    assert "no data was read" in message
    assert not (site / ".radfed" / "cache").exists()
    saved = pending_plans(site)
    assert [p.stem for p in saved] == [plan_hash]
    assert plan_sha256(json.loads(saved[0].read_text())) == plan_hash


def test_approve_then_revoke_then_change_config(site):
    config = app_run_config({"num-server-rounds": 3})
    plan_hash = _hash(config)
    decide(site, plan_hash, "approve", note="reviewed by the data officer")
    assert check_approved(site, config) == (plan_hash, "approved")
    # one changed value is another plan: refused again
    with pytest.raises(NotApproved, match="not approved"):
        check_approved(site, {**config, "local-epochs": 6})
    decide(site, plan_hash, "revoke")
    with pytest.raises(NotApproved, match="has revoked run plan"):
        check_approved(site, config)
    lines = (site / ".radfed" / "approvals.jsonl").read_text().splitlines()
    assert [json.loads(line)["action"] for line in lines] == ["approve", "revoke"]
    assert decisions(site)[plan_hash]["action"] == "revoke"


def test_bad_hashes_and_damaged_file_are_named(site):
    with pytest.raises(SiteError, match="not a plan hash"):
        decide(site, "abc123", "approve")
    (site / ".radfed").mkdir(exist_ok=True)
    (site / ".radfed" / "approvals.jsonl").write_text("{not json\n")
    with pytest.raises(SiteError, match="line 1 is not an approval record"):
        decisions(site)


def test_approval_off_is_a_site_decision_and_says_so(site, caplog):
    (site / "site.yaml").write_text(f"name: {site.name}\nrequire_approval: false\n")
    config = app_run_config({})
    assert check_approved(site, config) == (_hash(config), "off")
    assert "WITHOUT approval" in caplog.text
    (site / "site.yaml").write_text(f"name: {site.name}\nrequire_approval: maybe\n")
    with pytest.raises(SiteError, match="require_approval"):
        check_approved(site, config)


def test_cli_plan_write_show_approve(site, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "write", "--output", str(plan_file), "--run-config", "num-server-rounds=4"]) == 0
    plan_hash = _hash(app_run_config({"num-server-rounds": 4}))
    assert plan_hash in capsys.readouterr().out
    assert main(["site", "plan", "show", str(plan_file), "--site", str(site)]) == 0
    assert "not approved" in capsys.readouterr().out
    assert main(["site", "approve", plan_hash, "--site", str(site)]) == 0
    assert main(["site", "plan", "show", str(plan_file), "--site", str(site)]) == 0
    assert f"at {site}: approve" in capsys.readouterr().out
    assert main(["plan", "write", "--output", str(plan_file), "--run-config", "no-such-key=1"]) == 2
    assert "no-such-key" in capsys.readouterr().err


def test_the_plan_hash_ignores_where_the_coordinator_keeps_its_files():
    base = app_run_config({})
    moved = {**base, "output-dir": "/srv/elsewhere/runs", "data-root": "/srv/other", "audit-key": "/keys/a.pem",
             "query-timeout": 60.0}
    assert _hash(moved) == _hash(base)
    assert "output-dir" not in run_plan(base, load_profile("default"))["run_config"]


@pytest.mark.parametrize(("override", "named"), [
    ("training='bogus'", "'training' is 'bogus'; it must be one of 'fedavg', 'exact'"),
    ("harmonization='ComBat'", "'harmonization' is 'ComBat'; it must be one of 'combat', 'none'"),
    ("min-cases-per-class=1", "'min-cases-per-class' is 1; it must be a whole number >= 5"),
    ("test-fraction=1.5", "'test-fraction' is 1.5; it must be a number > 0 and < 1"),
    ("combat-covariates='sex='", "give the levels after '='"),
    ("num-server-rounds=abc", "write numbers and true/false as they are and text in quotes"),
    # DP on model updates with the default exact training: refused before any site approves, naming the fix
    ("dp-noise-multiplier=1.0", "set training = 'fedavg' (DP on model updates)"),
])
def test_plan_write_refuses_a_bad_value_naming_the_key_and_what_it_allows(tmp_path, capsys, override, named):
    from radfed.cli import main

    assert main(["plan", "write", "--output", str(tmp_path / "plan.json"), "--run-config", override]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "plan.json").exists()


def test_plan_show_states_the_k_that_holds_at_the_site(site, tmp_path, capsys):
    from radfed.cli import main

    (site / "site.yaml").write_text("min_cases_per_class: 8\n")
    assert main(["plan", "write", "--output", str(tmp_path / "plan.json")]) == 0
    capsys.readouterr()
    assert main(["site", "plan", "show", str(tmp_path / "plan.json"), "--site", str(site)]) == 0
    out = capsys.readouterr().out
    assert "k = 8 at this site (the run asks 5, this site's own floor is 8)" in out.replace("\n", " ")
