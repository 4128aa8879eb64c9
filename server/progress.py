"""Where a run is, read from its audit log while it runs (``radfed status``): phase, round, fold, sites, time.

The audit log (``audit.jsonl`` in the run folder) is appended as the run goes, in the simulation and in a
deployment alike, so it is the one source of truth for progress too: no second status file to keep in step.
Pure functions over the log's entries; a last line still being written is skipped.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.progress_families import describe_families, families_progress

# The phase an entry says the run has reached (the phase it starts or is in).
PHASES = {"run-start": "plan", "site-plan": "plan", "refusal": "plan", "features-agreed": "features",
          "harmonization": "harmonisation", "harmonization-join": "harmonisation (late joiner)",
          "moments": "standardisation", "selection": "feature selection", "histograms": "feature selection",
          "model-init": "training", "round-train": "training", "tree-level": "training", "round-evaluate": "training",
          "recalibration-round": "calibration", "recalibration": "calibration", "clinical-metrics": "clinical metrics",
          "external-validation": "leave-one-site-out", "local-only": "local-only baselines",
          "cross-validation": "cross-validation", "out-of-fold": "cross-validation", "run-end": "finished"}
FOLD_RESULTS = ("external-validation", "local-only", "cross-validation")


def read_entries(log: Path) -> list[dict[str, Any]]:
    """The log's entries in order; a line that is not (yet) whole JSON ends the reading."""
    entries = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return entries


def _time(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00"))


def _folds_planned(config: dict[str, Any], n_sites: int) -> int:
    planned = 0
    if config.get("external-validation") == "loso":
        planned += n_sites
    if config.get("local-only") == "own-pipeline":
        planned += n_sites
    if config.get("internal-validation") == "cv":
        planned += int(config.get("cv-folds", 0)) * int(config.get("cv-repeats", 1))
    return planned


def progress(entries: list[dict[str, Any]], now: datetime | None = None) -> dict[str, Any]:
    """What a person watching the run wants to know, from its audit entries so far.

    Returns ``status`` (running, completed, failed, refused), ``phase``, ``round``/``rounds`` of the current
    training (the main model's or a fold's), ``fold`` (kind, name, index, of) or None, ``folds_done``/``folds``,
    ``sites`` (``taking_part``, ``answered_last_round``, ``left`` with phase and reason), ``started``,
    ``elapsed_s`` and ``remaining_s`` (an estimate from the pace so far; None until there is one)."""
    now = now or datetime.now(UTC)
    if not entries:  # the run has created its log and not yet written its first line whole
        return {"run_id": None, "status": "running", "phase": "starting", "round": 0, "rounds": 0,
                "rounds_are_a_cap": False, "fold": None, "folds_done": 0, "folds": 0, "started": None,
                "error": None, "elapsed_s": 0.0, "families": {}, "remaining_s": None,
                "sites": {"taking_part": [], "answered_last_round": [], "left": []}}
    if entries[0].get("event") != "run-start":
        raise ValueError("not a radfed audit log: it does not start with run-start")
    start = entries[0]["data"]
    config = dict(start.get("config") or {})
    # the first listed family is the reference whose rounds are counted (trees: "gbt")
    first = str(config.get("models", "")).split(",")[0].strip()
    training = "gbt" if first == "gbt" else str(config.get("training", "fedavg"))
    rounds = int(config.get("exact-max-rounds" if training == "exact" else "num-server-rounds", 0))
    if training == "gbt":  # one round trip per tree level, at most (a tree stops early when no split is allowed)
        rounds = int(config.get("tree-rounds", 0)) * int(config.get("tree-depth", 0))
    out: dict[str, Any] = {"run_id": start.get("run_id"), "status": "running", "phase": "plan", "round": 0,
                           "rounds": rounds, "rounds_are_a_cap": training in ("exact", "gbt"), "fold": None,
                           "folds_done": 0, "folds": 0, "started": entries[0]["time"], "error": None}
    taking_part: list[str] = []
    n_sites = 0
    left: list[dict[str, Any]] = []
    answered: list[str] = []
    main_done_at: datetime | None = None
    together_at: datetime | None = None  # when the current group of folds run together began
    started = 0  # folds begun so far
    for entry in entries:
        event, data = entry.get("event"), entry.get("data") or {}
        # once the folds begin, the run is in them until it ends (their phases are the fold's own steps)
        out["phase"] = out["fold"]["kind"] if out["fold"] and event != "run-end" else PHASES.get(str(event),
                                                                                                  out["phase"])
        if event == "site-plan":
            taking_part.append(str(data.get("site")))
        elif event in ("refusal", "dropout"):
            site = data.get("site") or f"node {data.get('node')}"
            left.append({"site": site, "phase": data.get("phase", "plan"), "reason": data.get("reason")})
            if site in taking_part:
                taking_part.remove(site)
        elif event == "features-agreed":
            n_sites = len(data.get("split_counts") or taking_part)
            out["folds"] = _folds_planned(config, n_sites)
        elif event == "model-init":
            out["round"] = 0
        elif event in ("round-train", "tree-level"):
            # folds run together (fold-batching): their rounds interleave; the furthest one says where they are
            rnd = int(data.get("round", 0))
            out["round"] = max(out["round"], rnd) if together_at else rnd
            answered = sorted(data.get("sites") or {})
        elif event == "fold-start":
            main_done_at = main_done_at or _time(entry)
            out["fold"] = {k: data.get(k) for k in ("kind", "fold", "index", "of")}
            out["phase"] = str(data.get("kind"))
            out["round"] = 0
            together_at = _time(entry) if data.get("together") else None
            started += int(data.get("of") or 1) if data.get("together") else 1
        elif event in FOLD_RESULTS:
            out["folds_done"] += 1
        elif event == "run-end":
            out["status"] = str(data.get("status"))
            out["error"] = data.get("error") or None
            out["fold"] = None
    last = _time(entries[-1]) if out["status"] != "running" else now
    elapsed = (last - _time(entries[0])).total_seconds()
    out["elapsed_s"] = round(elapsed, 1)
    out["families"] = families_progress(entries, config, len(taking_part) or n_sites, last)  # the sites still in
    training = [f for f in out["families"].values() if f["state"] == "training"]
    if training and main_done_at is None:  # the main run's rounds are the family being fitted's
        out["rounds"], out["rounds_are_a_cap"] = training[0]["rounds"], training[0]["rounds_are_a_cap"]
    out["remaining_s"] = _remaining(out, entries, main_done_at, last, together_at, started)
    out["sites"] = {"taking_part": sorted(taking_part), "answered_last_round": answered, "left": left}
    return out


def _remaining(out: dict[str, Any], entries: list[dict[str, Any]], main_done_at: datetime | None,
               now: datetime, together_at: datetime | None = None, started: int = 0) -> float | None:
    """Seconds left at the pace so far: the main training's rounds at its mean round time, then each fold at
    the main fit's duration (a fold refits the same pipeline on fewer sites: an upper estimate at first), then
    at the folds' own mean once one has finished. Folds run together (fold-batching) take about one main fit
    per group: what is left of this group's, plus one more if folds remain that have not begun."""
    if out["status"] != "running":
        return 0.0
    if together_at is not None and main_done_at is not None:
        main_fit = (main_done_at - _time(entries[0])).total_seconds()
        left = max(main_fit - (now - together_at).total_seconds(), 0.0)
        return round(left + (main_fit if out["folds"] > started else 0.0), 1)
    fits = [e for e in entries if e.get("event") == "model-init"]
    if not fits:
        return None
    first_fit = _time(fits[0])
    folds_left = max(out["folds"] - out["folds_done"], 0)
    if main_done_at is None:  # still in the main training
        if out["round"] == 0 or not out["rounds"]:
            return None
        per_round = (now - first_fit).total_seconds() / out["round"]
        main_left = per_round * max(out["rounds"] - out["round"], 0)
        left = [f["seconds_left"] for f in out["families"].values()]
        if len(left) > 1 and None not in left:  # several families, fitted in turn: what each has left
            main_left = sum(left)
        main_total = (now - _time(entries[0])).total_seconds() + main_left
        return round(main_left + folds_left * main_total, 1)
    if out["folds_done"]:
        per_fold = (now - main_done_at).total_seconds() / out["folds_done"]
    else:
        per_fold = (main_done_at - _time(entries[0])).total_seconds()
    return round(folds_left * per_fold, 1)


def latest_run(output_dir: Path) -> Path:
    """The newest run folder (``<time>-run<id>``, by name) under ``output_dir`` that has an audit log."""
    runs = sorted(p for p in output_dir.glob("*-run*") if (p / "audit.jsonl").is_file())
    if not runs:
        raise ValueError(f"no run folder with an audit log in {output_dir}: has a run started? (give the run "
                         "folder, or --output-dir where the coordinator's runs are written)")
    return runs[-1]


def describe(p: dict[str, Any]) -> str:
    """The progress as a few plain lines."""
    head = f"run {p['run_id'] if p['run_id'] is not None else '(not yet numbered)'}: {p['status']}"
    if p["status"] == "running":
        head += f", {p['phase']}"
        if p["phase"] in ("training", "leave-one-site-out", "local-only", "cross-validation") and p["round"]:
            cap = " (at most)" if p["rounds_are_a_cap"] else ""
            head += f", round {p['round']} of {p['rounds']}{cap}"
    elif p["error"]:
        head += f": {p['error']}"
    lines = [head]
    if p["fold"]:
        f = p["fold"]
        if f["index"] is None:  # fold-batching: the group's folds progress in the same rounds
            lines.append(f"  {f['of']} folds at once, in the same rounds ({f['kind']})")
        else:
            lines.append(f"  fold {f['index']} of {f['of']} ({f['kind']}): {f['fold']}")
    if p["folds"]:
        lines.append(f"  folds done {p['folds_done']} of {p['folds']}")
    lines += describe_families(p.get("families") or {})
    left = f", about {p['remaining_s']:.0f} s left" if p["remaining_s"] else ""
    lines.append(f"  elapsed {p['elapsed_s']:.0f} s{left if p['status'] == 'running' else ''}")
    sites = p["sites"]
    lines.append(f"  sites taking part: {', '.join(sites['taking_part']) or 'none yet'}")
    if sites["answered_last_round"]:
        lines.append(f"  answered the last round: {', '.join(sites['answered_last_round'])}")
    for d in sites["left"]:
        lines.append(f"  left: {d['site']} at the {d['phase']} phase: {d['reason']}")
    return "\n".join(lines)
