"""Query phases in one message (merge-phases, issue 20): a real simulated run with the independent phases merged
gives the same metrics, model hashes and audit entries as one with every phase in its own message, sends every
request it did, and needs fewer Flower messages per site."""

from __future__ import annotations

import json
from pathlib import Path

from federation_helpers import events, run_federation_in

from radfed import synth

# what says which run it was and how it was configured or sent, not what it found: its id and signing key, the plan
# (its hash names the config), the seconds, the messages and round trips, and the output files' hashes
# (metrics.json holds the config)
HOW = ("run_id", "audit_key_sha256", "config", "config_sha256", "plan_sha256", "seconds", "messages", "artifacts",
       "metrics_sha256")


def _entries(folder: Path) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    """The run's audit entries in order, and each fold's in order (the folds' entries interleave by round, and a
    fold's join travelling with its scoring changes which fold finishes first); the plan replies as a set (they
    are logged as they arrive)."""
    run, folds = [], {}
    for e in events(folder):
        data = {k: v for k, v in e["data"].items() if k not in HOW}
        if e["event"] == "folds-end":  # the folds' round trips are fewer
            data.pop("rounds", None)
        entry = (e["event"], json.dumps(data, sort_keys=True))
        fold = data.get("fold") if e["event"] != "fold-start" else None
        (folds.setdefault(fold, []) if fold else run).append(entry)
    plans = sorted(x for x in run if x[0] == "site-plan")
    return [x for x in run if x[0] != "site-plan"] + plans, folds


def _metrics(folder: Path) -> dict:
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    return {k: v for k, v in doc.items() if k not in ("config", "seconds", "run_id")}


def _outbox(site: Path) -> list[tuple[str, str]]:
    """What a site sent in its last run: each reply's type, fold and hash of its content, in order."""
    records = [json.loads(line) for line in (site / ".radfed" / "outbox.jsonl").read_text().splitlines()]
    last = records[-1]["run_id"]
    out = []
    for r in records:
        if r["run_id"] == last:
            r["records"].get("config", {}).pop("plan-sha256", None)  # the plan reply names the plan (its config)
            out.append((str(r["type"]), json.dumps({k: v for k, v in r.items() if k not in ("time", "run_id")},
                                                   sort_keys=True)))
    return sorted(out)


def test_merged_phases_equal_separate_phases_with_fewer_messages(tmp_path):
    root = tmp_path / "data"
    for i, spec in enumerate(synth.tiny_sites(3, 12)):
        synth.write_site(root, spec, seed=700 + i)
    sites = sorted(p for p in root.iterdir() if (p / "manifest.csv").exists())
    config = {"training": "exact", "select-features": 3, "external-validation": "loso", "local-only": "own-pipeline"}
    runs, sent = {}, {}
    for mode in ("separate", "merged"):
        runs[mode] = run_federation_in(tmp_path / mode, root, 3, **config, **{"merge-phases": mode == "merged"})
        sent[mode] = {s.name: _outbox(s) for s in sites}
    docs = {mode: _metrics(f) for mode, f in runs.items()}
    assert docs["merged"]["status"] == "completed", docs["merged"].get("error")

    # the same results: metrics (calibration fit and pooled metrics included), and every audit entry, in order,
    # with every model and statistic hash; each site sent the very same replies
    assert docs["merged"] == docs["separate"]
    assert _entries(runs["merged"]) == _entries(runs["separate"])
    assert sent["merged"] == sent["separate"]
    kinds = {t for replies in sent["merged"].values() for t, _ in replies}
    assert {"query.histograms", "query.newton", "evaluate", "query.recalibrate", "query.combat_join"} <= kinds

    # the same requests, in fewer Flower messages: the histograms with the first Newton round and the final
    # evaluation with the first calibration round (main run), and each fold's join with its scoring
    ends = {mode: next(e["data"] for e in events(f) if e["event"] == "run-end") for mode, f in runs.items()}
    merged, separate = ends["merged"]["messages"], ends["separate"]["messages"]
    assert merged["requests"] == separate["requests"]
    assert merged["sites"] == separate["sites"] == 3
    assert merged["messages"] <= separate["messages"] - 2 * 3 - 1, (merged, separate)
    assert merged["per_site_max"] < separate["per_site_max"]
