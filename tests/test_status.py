"""`radfed status`: where a run is, read from its audit log while it runs (phase, round, fold, sites, time left).
The deployment case is in tests/test_deploy.py (a site crashes mid-run)."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from federation_helpers import run_federation_in

from radfed import synth
from radfed.cli import main
from server.audit import AuditLog
from server.progress import progress, read_entries

CONFIG = {"num-server-rounds": 4, "training": "fedavg", "external-validation": "loso", "local-only": "none",
          "internal-validation": "split"}


def _log(path: Path) -> AuditLog:
    audit = AuditLog(path, Ed25519PrivateKey.generate())
    audit.append("run-start", run_id=9, config=CONFIG, plan_sha256="ab" * 32)
    return audit


def test_progress_follows_the_log_entry_by_entry(tmp_path):
    log = tmp_path / "audit.jsonl"
    audit = _log(log)
    for site in ("b", "a", "c"):
        audit.append("site-plan", site=site)
    audit.append("dropout", site="c", phase="plan", reason="ineligible: 3 BM cases, fewer than k = 5")
    state = progress(read_entries(log))
    assert (state["status"], state["phase"], state["round"]) == ("running", "plan", 0)
    assert state["sites"]["taking_part"] == ["a", "b"]
    assert state["sites"]["left"] == [{"site": "c", "phase": "plan", "reason": "ineligible: 3 BM cases, fewer than "
                                                                                   "k = 5"}]
    audit.append("features-agreed", split_counts={"a": {}, "b": {}})
    audit.append("model-init", model_sha256="0" * 64, training="fedavg")
    audit.append("round-train", round=1, sites={"a": {}, "b": {}})
    audit.append("round-train", round=2, sites={"b": {}})
    state = progress(read_entries(log))
    assert (state["phase"], state["round"], state["rounds"], state["folds"]) == ("training", 2, 4, 2)
    assert state["sites"]["answered_last_round"] == ["b"] and state["fold"] is None
    audit.append("fold-start", kind="leave-one-site-out", fold="a", index=1, of=2)
    audit.append("round-train", round=1, sites={"b": {}}, fold="a")
    state = progress(read_entries(log))
    assert state["phase"] == "leave-one-site-out" and state["round"] == 1
    assert state["fold"] == {"kind": "leave-one-site-out", "fold": "a", "index": 1, "of": 2}
    audit.append("external-validation", fold="a")
    with log.open("a") as fh:
        fh.write('{"event": "round-tr')  # the writer is mid-line: the reader stops before it
    state = progress(read_entries(log))
    assert state["folds_done"] == 1 and state["status"] == "running"


def test_folds_run_together_are_shown_as_one_group_with_the_furthest_round(tmp_path):
    """fold-batching: one fold-start for the group; the folds' rounds interleave and every entry carries its fold
    (from the log's fold context, thread by thread); time left is what remains of one main fit."""
    log = tmp_path / "audit.jsonl"
    audit = _log(log)
    audit.append("features-agreed", split_counts={"a": {}, "b": {}})
    audit.append("model-init", model_sha256="0" * 64, training="fedavg")
    audit.append("round-train", round=4, sites={"a": {}, "b": {}})
    audit.append("fold-start", kind="leave-one-site-out", fold="2 folds together", index=None, of=2,
                 together=["a", "b"])
    written = []

    def fold(name: str, rounds: int) -> None:
        with audit.fold_context(name):
            for r in range(1, rounds + 1):
                written.append(audit.append("round-train", round=r, sites={}))

    threads = [threading.Thread(target=fold, args=(name, n)) for name, n in (("a", 3), ("b", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = read_entries(log)
    assert len(written) == 5 and [e["seq"] for e in entries] == list(range(len(entries)))  # one chain, no gaps
    assert sorted(e["data"]["fold"] for e in entries if e["event"] == "round-train" and "fold" in e["data"]) == \
        ["a", "a", "a", "b", "b"]
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for i, entry in enumerate(entries):  # the main fit took 30 s; the folds began at 30 s
        entry["time"] = (t0 + timedelta(seconds=min(i * 10, 30) if i < 5 else 30)).isoformat()
    state = progress(entries, now=t0 + timedelta(seconds=40))
    assert state["phase"] == "leave-one-site-out" and state["round"] == 3
    assert state["fold"] == {"kind": "leave-one-site-out", "fold": "2 folds together", "index": None, "of": 2}
    assert state["remaining_s"] == pytest.approx(30 - 10)  # one main fit (30 s, to the folds) less 10 s in them
    from server.progress import describe

    assert "2 folds at once, in the same rounds (leave-one-site-out)" in describe(state)


def test_the_estimate_of_time_left_follows_the_pace(tmp_path):
    """Two rounds of ten seconds with two more to go and two folds as long as the main fit: 20 s + 2 x 40 s."""
    log = tmp_path / "audit.jsonl"
    audit = _log(log)
    audit.append("features-agreed", split_counts={"a": {}, "b": {}})
    audit.append("model-init", model_sha256="0" * 64, training="fedavg")
    audit.append("round-train", round=1, sites={})
    audit.append("round-train", round=2, sites={})
    entries = read_entries(log)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for entry, seconds in zip(entries, (0, 0, 0, 10, 20), strict=True):
        entry["time"] = (t0 + timedelta(seconds=seconds)).isoformat()
    state = progress(entries, now=t0 + timedelta(seconds=20))
    assert state["elapsed_s"] == 20 and state["remaining_s"] == pytest.approx(20 + 2 * 40)
    audit.append("run-end", status="failed", error="only 1 site remains")
    state = progress(read_entries(log))
    assert state["status"] == "failed" and state["remaining_s"] == 0 and "1 site" in state["error"]
    (tmp_path / "other.jsonl").write_text('{"event": "hello"}\n')
    with pytest.raises(ValueError, match="not a radfed audit log"):
        progress(read_entries(tmp_path / "other.jsonl"))


def test_status_of_a_run_whose_log_is_not_yet_written_says_starting(tmp_path, capsys):
    """The run creates its audit log before the first line is whole: a look in between (CI caught one) is a run
    starting, not a broken log; once run-start is whole the run has its number."""
    folder = tmp_path / "runs" / "20261201T000000-run7"
    folder.mkdir(parents=True)
    log = folder / "audit.jsonl"
    log.write_text("")
    for text in ("", '{"event": "run-st'):
        log.write_text(text)
        assert main(["status", "--output-dir", str(tmp_path / "runs"), "--json"]) == 0
        state = json.loads(capsys.readouterr().out)
        assert (state["status"], state["phase"], state["run_id"]) == ("running", "starting", None)
        assert main(["status", str(folder)]) == 0
        assert "run (not yet numbered): running, starting" in capsys.readouterr().out
    log.unlink()
    _log(log)
    assert main(["status", str(folder), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert (state["status"], state["phase"], state["run_id"]) == ("running", "plan", 9)


def test_status_watches_a_running_simulation(tmp_path, capsys):
    root = tmp_path / "data"
    for i, spec in enumerate(synth.tiny_sites(3, 10)):
        synth.write_site(root, spec, seed=700 + i)
    done: list[Path] = []
    # 8 FedAvg rounds, watched every 0.1 s: a site's train round now takes tens of milliseconds (torch is loaded
    # before it), so a few rounds watched every 0.5 s could pass unseen
    runner = threading.Thread(target=lambda: done.append(run_federation_in(
        tmp_path, root, 3, **{**CONFIG, "num-server-rounds": 8})))
    runner.start()
    seen: list[dict] = []
    out = tmp_path / "runs"
    while runner.is_alive():
        time.sleep(0.1)
        if any(out.glob("*-run*/audit.jsonl")):
            assert main(["status", "--output-dir", str(out), "--json"]) == 0
            seen.append(json.loads(capsys.readouterr().out))
    runner.join()
    assert done, "the federation did not finish"
    running = [s for s in seen if s["status"] == "running"]
    assert any(s["phase"] == "training" and s["round"] >= 1 for s in running), [s["phase"] for s in seen]
    folds = [s["fold"] for s in running if s["fold"]]
    assert folds and {f["kind"] for f in folds} == {"leave-one-site-out"} and {f["of"] for f in folds} == {3}
    assert all(s["sites"]["taking_part"] == sorted(p.name for p in root.iterdir()) for s in running if s["round"])
    assert main(["status", str(done[0])]) == 0
    final = capsys.readouterr().out
    assert f"run {json.loads((done[0] / 'metrics.json').read_text())['run_id']}: completed" in final
    assert "folds done 3 of 3" in final


def test_status_estimates_every_listed_family(tmp_path, capsys):
    """Several families are fitted in turn in the main run: each one's round trips and messages (planned and so
    far), its time, and the time left as the sum of what each family has left at its own pace (a family not yet
    started at the mean pace of those fitted so far)."""
    config = {**CONFIG, "external-validation": "none", "models": "logistic-l2,svm,gbt", "training": "exact",
              "exact-max-rounds": 10, "tree-rounds": 5, "tree-depth": 2, "evaluate-every": 0}
    log = tmp_path / "audit.jsonl"
    audit = AuditLog(log, Ed25519PrivateKey.generate())
    audit.append("run-start", run_id=9, config=config, plan_sha256="ab" * 32)
    sites = {"a": {}, "b": {}, "c": {}}
    audit.append("features-agreed", split_counts=sites)
    audit.append("model-init", model_sha256="0" * 64, training="exact", family="logistic-l2")
    audit.append("newton-round", round=1, sites=sites, family="logistic-l2")
    audit.append("newton-round", round=2, sites=sites, family="logistic-l2")
    audit.append("round-train", round=2, sites=sites, family="logistic-l2")  # the exact fit's closing entry
    audit.append("round-evaluate", round=2, sites=sites, family="logistic-l2")
    audit.append("newton-round", round=1, sites=sites, stage="lasso")  # not a family's fit: left out
    audit.append("model-init", model_sha256="0" * 64, training="fedavg", family="svm")
    audit.append("round-train", round=1, sites=sites, family="svm")
    audit.append("round-train", round=2, sites=sites, family="svm")
    entries = read_entries(log)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for entry, seconds in zip(entries, (0, 0, 0, 2, 4, 4, 5, 5, 5, 10, 15), strict=True):
        entry["time"] = (t0 + timedelta(seconds=seconds)).isoformat()
    state = progress(entries, now=t0 + timedelta(seconds=15))
    fam = state["families"]
    assert list(fam) == ["logistic-l2", "svm", "gbt"]
    assert {n: (f["training"], f["state"], f["round"], f["rounds"], f["rounds_are_a_cap"]) for n, f in fam.items()} == {
        "logistic-l2": ("exact", "done", 2, 10, True), "svm": ("fedavg", "training", 2, 4, False),
        "gbt": ("gbt", "waiting", 0, 10, True)}
    # planned: (round trips + the final evaluation) x 3 sites; so far: the replies logged
    assert {n: (f["messages"], f["messages_so_far"]) for n, f in fam.items()} == {
        "logistic-l2": (33, 9), "svm": (15, 6), "gbt": (33, 0)}
    assert (fam["logistic-l2"]["seconds"], fam["svm"]["seconds"]) == (5, 10)
    # svm: 5 s a round, 2 rounds left; gbt: 10 round trips at the mean pace (2.5 s and 5 s a round) 3.75 s
    assert (fam["svm"]["seconds_left"], fam["gbt"]["seconds_left"]) == (pytest.approx(10), pytest.approx(37.5))
    assert state["rounds"] == 4 and state["remaining_s"] == pytest.approx(10 + 37.5)
    assert main(["status", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    for line in ("logistic-l2 (exact, at most 10 round trips): done in 2 round(s); 9 of at most 33 messages",
                 "svm (fedavg, exactly 4 round trips): round 2; 6 of 15 messages",
                 "gbt (gbt, at most 10 round trips): waiting; 0 of at most 33 messages"):
        assert line in shown, shown
    # before the features phase the sites are not known: no message count is made up
    assert progress(entries[:1], now=t0)["families"]["svm"]["messages"] is None
