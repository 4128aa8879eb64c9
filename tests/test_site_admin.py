"""A site administrator's day: approvals an ethics board can follow, what changed between two plans in words,
the outbox per run, and a site check whose rows add up and name every problem of a case at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from client.approvals import approvals_file
from client.guard import record_outgoing
from client.sitecheck import check_site
from common.plan import plan_sha256
from radfed import synth
from radfed.cli import main


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return synth.write_site(tmp_path / "sites", synth.tiny_sites(1, 6)[0], seed=5)


def _plan(tmp_path: Path, capsys, name: str, *settings: str) -> tuple[Path, str]:
    path = tmp_path / f"{name}.json"
    argv = ["plan", "write", "--output", str(path), "--json"]
    argv += ["--run-config", " ".join(settings)] if settings else []
    assert main(argv) == 0
    return path, json.loads(capsys.readouterr().out)["plan_sha256"]


def _lines(site: Path) -> list[dict]:
    return [json.loads(line) for line in approvals_file(site).read_text(encoding="utf-8").splitlines()]


def test_approving_twice_and_revoking_what_was_never_approved_say_so(site, tmp_path, capsys):
    _, plan_hash = _plan(tmp_path, capsys, "plan")
    assert main(["site", "approve", plan_hash, "--site", str(site), "--note", "ethics board 2026-11"]) == 0
    assert "approved run plan" in capsys.readouterr().out
    assert main(["site", "approve", plan_hash, "--site", str(site)]) == 0
    out = capsys.readouterr().out
    assert f"run plan {plan_hash} was already approved" in out and "nothing changed" in out
    assert [e["action"] for e in _lines(site)] == ["approve"]  # no second record

    other = "ab" * 32
    assert main(["site", "revoke", other, "--site", str(site)]) == 2
    err = capsys.readouterr().err
    assert f"run plan {other} was never approved" in err and "radfed site approvals --site" in err
    assert main(["site", "revoke", plan_hash, "--site", str(site)]) == 0
    assert main(["site", "revoke", plan_hash, "--site", str(site)]) == 0
    assert "was already revoked" in capsys.readouterr().out
    assert [e["action"] for e in _lines(site)] == ["approve", "revoke"]


def test_approvals_lists_each_decision_with_when_who_and_why(site, tmp_path, capsys):
    _, first = _plan(tmp_path, capsys, "first")
    _, second = _plan(tmp_path, capsys, "second", "num-server-rounds=4")
    assert main(["site", "approve", first, "--site", str(site), "--note", "board 11/2026"]) == 0
    assert main(["site", "approve", second, "--site", str(site)]) == 0
    assert main(["site", "revoke", first, "--site", str(site), "--note", "superseded"]) == 0
    capsys.readouterr()
    assert main(["site", "approvals", "--site", str(site), "--json"]) == 0
    rows = {r["plan_sha256"]: r for r in json.loads(capsys.readouterr().out)["plans"]}
    assert set(rows) == {first, second}
    assert rows[first]["state"] == "revoke" and rows[first]["note"] == "superseded" and rows[first]["by"]
    assert rows[second]["state"] == "approve" and rows[second]["time"]
    assert main(["site", "approvals", "--site", str(site)]) == 0
    out = capsys.readouterr().out
    assert "1 plan(s) approved" in out and f"{first}  revoked" in out and "(superseded)" in out
    assert main(["site", "approvals", "--site", str(site), "--all", "--json"]) == 0
    decisions = json.loads(capsys.readouterr().out)["decisions"]
    assert [(d["action"], d["plan_sha256"]) for d in decisions] == [("approve", first), ("approve", second),
                                                                     ("revoke", first)]
    # plan show --site lists approved plans too, not only refused ones
    assert main(["site", "plan", "show", "--site", str(site), "--json"]) == 0
    assert {r["plan_sha256"] for r in json.loads(capsys.readouterr().out)["plans"]} == {first, second}


def test_plan_diff_says_in_words_what_changed(tmp_path, capsys):
    old, old_hash = _plan(tmp_path, capsys, "old")
    new, new_hash = _plan(tmp_path, capsys, "new", "test-fraction=0.4", "training='fedavg'")
    assert main(["site", "plan", "diff", str(old), str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["changes"] == []
    assert main(["site", "plan", "diff", str(old), str(new)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"from plan {old_hash[:12]} to plan {new_hash[:12]}, 2 change(s)" in out
    assert "test-fraction changed from 0.3 to 0.4: this changes which of your cases are summed together" in out
    assert "training changed from 'exact' to 'fedavg'." in out
    # a reply field added to a message: named, with the message
    plan = json.loads(new.read_text())
    plan["messages"]["query.moments"]["metrics"]["extra"] = "one more number per feature"
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(plan))
    assert main(["site", "plan", "diff", str(new), str(changed), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["changes"] == ["Message type query.moments adds extra."] and doc["new"] == plan_sha256(plan)
    assert main(["site", "plan", "diff", str(old), str(tmp_path / "absent.json")]) == 2
    assert "neither a plan file nor a saved plan hash" in capsys.readouterr().err


def _sent(site: Path, run_id: int, kind: str, **metrics: int) -> int:
    """What the guard logs for one reply (through its own logging function); returns the bytes of its arrays."""
    content = RecordDict({"metrics": MetricRecord(dict(metrics))})
    if kind == "query.moments":
        content["arrays"] = ArrayRecord([np.zeros(10)])
    record_outgoing(site, run_id, kind, content)
    return sum(len(a.data) for a in content["arrays"].values()) if "arrays" in content else 0


def test_outbox_summarises_each_run_and_names_an_unknown_one(site, capsys):
    _sent(site, 11, "query.features", **{"n-cases": 12})
    size = _sent(site, 11, "query.moments", n=8, **{"n-hgg": 5, "n-bm": 5})
    _sent(site, 12, "query.features", **{"n-cases": 12})
    assert main(["site", "outbox", "--site", str(site)]) == 0
    out = capsys.readouterr().out
    assert "3 message(s) in 2 run(s)" in out
    assert "run 11" in out and f"2 message(s), {size:,} bytes of arrays; every statistic over >= 5 cases" in out
    assert "1 query.features, 1 query.moments" in out
    assert main(["site", "outbox", "--site", str(site), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["run_id"], r["messages"], r["fewest_cases"]) for r in runs] == [("11", 2, 5), ("12", 1, 12)]
    assert main(["site", "outbox", "--site", str(site), "--run", "12"]) == 0
    assert "query.features: metrics.n-cases=12" in capsys.readouterr().out
    assert main(["site", "outbox", "--site", str(site), "--run", "99"]) == 1
    assert "run 99: this site sent nothing in it (runs in" in capsys.readouterr().err


def test_site_check_rows_add_up_and_every_problem_of_a_case_is_named(site, capsys):
    manifest = site / "manifest.csv"
    lines = manifest.read_text().splitlines()
    first = lines[1].split(",")
    lines.append(lines[1])  # the same case again: the first row stays usable
    lines.append("oops;this;is;not;csv")  # a garbage row
    lines.append(",".join([first[0].replace("1", "9") + "x", "LGG", "images/none_t1c.nii.gz", *first[3:]]))
    lines.append(",".join(["z-001", "BM", "images/none_t1c.nii.gz", "images/none_flair.nii.gz", *first[4:]]))
    manifest.write_text("\n".join(lines) + "\n")
    check = check_site(site)
    problems: dict[str, list[str]] = {}
    for p in check.problems:
        problems.setdefault(p.case_id, []).append(p.reason)
    assert check.n_cases == len(lines) - 1 == len(check.usable) + len(problems)  # every row counted once
    assert first[0] in {c.case_id for c in check.usable} and f"{first[0]} (again)" in problems
    garbage = problems[f"<line {len(lines) - 2}>"]
    assert "is not a manifest row: 1 field(s) where the header has" in garbage[0] and "oops;this" in garbage[0]
    unknown = problems[first[0].replace("1", "9") + "x"]
    assert any("unknown diagnosis 'LGG'" in r for r in unknown) and any("no file for t1c" in r for r in unknown)
    # z-001 reuses the first case's ADC (same patient) and lacks two files: both problems, each file named
    shared, missing = problems["z-001"]
    assert f"same images as case {first[0]}" in shared
    assert "t1c file" in missing and "flair file" in missing and "are missing" in missing
    assert main(["site", "check", "--site", str(site)]) == 3  # too few usable cases left for two blocks
    out = capsys.readouterr().out
    assert "<line" in out and "oops;this" not in out.split("problem")[0]
