"""``radfed status`` per model family: each listed family's plan (round trips, messages) and, from the audit log,
where its main-run fit is and how long it took or will take.

The main run fits the families one after the other in the order listed (server.pipeline.fit), each on the same
cohort; its entries name the family when the run lists several. Pure functions over the run-start config and the
log's entries, like server.progress.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

# The entry that marks one training round trip of a fit, by how the family is fitted (server.training.mode)
TRIP = {"exact": "newton-round", "gbt": "tree-level", "fedavg": "round-train"}
# Phases after the main training: once one of these appears, every family's main fit is over
AFTER_TRAINING = ("recalibration-round", "recalibration", "clinical-metrics", "model-choice", "fold-start", "run-end")


def listed(config: dict[str, Any]) -> list[str]:
    """The run's ``models`` list (one family when the config has none)."""
    return [n.strip() for n in str(config.get("models") or "logistic-l2").split(",") if n.strip()]


def mode(family: str, config: dict[str, Any]) -> str:
    """As server.training.mode: logistic-l2 follows ``training``, logistic-l1 is exact, gbt grows trees, svm and mlp
    are FedAvg."""
    if family == "gbt":
        return "gbt"
    if family == "logistic-l1" or (family == "logistic-l2" and str(config.get("training", "fedavg")) == "exact"):
        return "exact"
    return "fedavg"


def plan(family: str, config: dict[str, Any], n_sites: int) -> dict[str, Any]:
    """One family's main-run fit before it starts: round trips (a cap for the exact and tree fits, which may stop
    early), and messages = site replies to its training round trips and to its evaluations."""
    how = mode(family, config)
    if how == "gbt":  # one round trip per tree level, at most
        rounds = int(config.get("tree-rounds", 0)) * int(config.get("tree-depth", 0))
    else:
        rounds = int(config.get("exact-max-rounds" if how == "exact" else "num-server-rounds", 0))
    every = int(config.get("evaluate-every", 0) or 0)
    evaluations = 1 + (sum(1 for r in range(1, rounds) if r % every == 0) if how == "fedavg" and every > 0 else 0)
    return {"training": how, "rounds": rounds, "rounds_are_a_cap": how != "fedavg",
            "messages": (rounds + evaluations) * n_sites if n_sites else None}  # None: the sites are not known yet


def _time(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00"))


def families_progress(entries: list[dict[str, Any]], config: dict[str, Any], n_sites: int,
                      now: datetime) -> dict[str, dict[str, Any]]:
    """Per listed family: its ``plan`` and ``state`` (waiting, training, done), ``round`` (its round trips so far),
    ``messages_so_far``, ``seconds`` (done: what its fit took; else elapsed so far) and ``seconds_left`` (an
    estimate: its own pace once it has a round, else the mean round trip of the families fitted so far; None
    before any round trip)."""
    names = listed(config)
    out = {f: {**plan(f, config, n_sites), "state": "waiting", "round": 0, "messages_so_far": 0,
               "seconds": 0.0, "seconds_left": None} for f in names}
    started: dict[str, datetime] = {}
    last: dict[str, datetime] = {}
    over = None  # when the main training ended
    for entry in entries:
        event, data = entry.get("event"), entry.get("data") or {}
        if event in AFTER_TRAINING:
            over = over or _time(entry)
        if over or data.get("fold") or data.get("stage"):  # folds and the LASSO selection step are not the fits
            continue
        family = str(data.get("family") or names[0])
        if family not in out:
            continue
        if event == "model-init":
            started[family] = _time(entry)
            for earlier in started:  # the families are fitted in turn: a new one means the others are done
                if earlier != family:
                    out[earlier]["state"] = "done"
            out[family]["state"] = "training"
        elif family in started and event in (TRIP[out[family]["training"]], "round-evaluate"):
            out[family]["messages_so_far"] += len(data.get("sites") or {})
            if event == TRIP[out[family]["training"]]:
                out[family]["round"] += 1
        if family in started:
            last[family] = _time(entry)
    paces = []
    for family, f in out.items():
        if family not in started:
            continue
        if over is not None:
            f["state"] = "done"
        end = last[family] if f["state"] == "done" else now
        f["seconds"] = round((end - started[family]).total_seconds(), 1)
        if f["round"]:
            paces.append(f["seconds"] / f["round"])
    pace = sum(paces) / len(paces) if paces else None
    for f in out.values():
        if f["state"] == "done":
            f["seconds_left"] = 0.0
        elif f["state"] == "training" and f["round"]:
            f["seconds_left"] = round(f["seconds"] / f["round"] * max(f["rounds"] - f["round"], 0), 1)
        elif pace is not None:
            f["seconds_left"] = round(pace * f["rounds"], 1)
    return out


def describe_families(families: dict[str, dict[str, Any]]) -> list[str]:
    """One line per family for ``radfed status`` (only when the run lists several)."""
    if len(families) < 2:
        return []
    lines = ["  model families (main run, fitted in turn):"]
    for name, f in families.items():
        cap = " at most" if f["rounds_are_a_cap"] else ""
        where = {"waiting": "waiting", "training": f"round {f['round']}", "done": f"done in {f['round']} round(s)"}[
            f["state"]]
        took = f"{f['seconds']:.0f} s" + (" so far" if f["state"] == "training" else "")
        left = f", about {f['seconds_left']:.0f} s left" if f["seconds_left"] else ""
        planned = f"{f['messages_so_far']} of{cap} {f['messages']} messages" if f["messages"] is not None else \
            "messages once the sites are known"
        lines.append(f"    {name} ({f['training']}, {cap.strip() or 'exactly'} {f['rounds']} round trips): {where}; "
                     f"{planned}; {took if f['state'] != 'waiting' else 'not started'}{left}")
    return lines
