"""A run's outputs: metrics.json (machines), report.html and report.md (people)."""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import metrics
from common.canon import json_safe
from common.profile import Profile

METRICS_SCHEMA = "radfed.metrics/1"
SHOWN = ("auc", "sensitivity", "specificity", "balanced_accuracy")


@dataclass
class RunResult:
    run_id: int
    folder: Path
    config: dict[str, Any]
    profile: Profile
    status: str = "running"
    error: str = ""
    seconds: float = 0.0
    site_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    dropouts: list[dict[str, Any]] = field(default_factory=list)
    features: dict[str, Any] = field(default_factory=dict)
    training: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    evaluations: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    model_sha256: str | None = None

    def rounds(self) -> list[dict[str, Any]]:
        return [{
            "round": r,
            "train": {"sites": self.training.get(r, {})},
            "evaluate": {"sites": sites, "aggregate": metrics.combine_sites(list(sites.values()))},
        } for r, sites in sorted(self.evaluations.items())]

    def final_aggregate(self) -> dict[str, float] | None:
        if not self.evaluations:
            return None
        return metrics.combine_sites(list(self.evaluations[max(self.evaluations)].values()))

    def as_json(self) -> dict[str, Any]:
        last = self.evaluations[max(self.evaluations)] if self.evaluations else {}
        return json_safe({
            "schema": METRICS_SCHEMA,
            "run_id": self.run_id,
            "status": self.status,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "profile": {"name": self.profile.name, "version": self.profile.version, "sha256": self.profile.sha256},
            "config": self.config,
            "sites": {name: {"manifest": self.site_counts.get(name, {}), "split": self.split_counts.get(name, {})}
                      for name in sorted(set(self.site_counts) | set(self.split_counts))},
            "dropouts": self.dropouts,
            "features": self.features,
            "model_sha256": self.model_sha256,
            "rounds": self.rounds(),
            "final": {"round": max(self.evaluations) if self.evaluations else None, "sites": last,
                      "aggregate": self.final_aggregate()},
            "notes": {
                "aggregate": "sensitivity, specificity and balanced accuracy from confusion counts summed over "
                             "sites; AUC is the mean of site AUCs weighted by held-out cases",
                "positive_class": "HGG",
                "threshold": 0.5,
            },
        })


def file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def write_outputs(result: RunResult) -> None:
    doc = result.as_json()
    (result.folder / "metrics.json").write_text(json.dumps(doc, indent=2, allow_nan=False), encoding="utf-8")
    (result.folder / "report.md").write_text(render_markdown(doc), encoding="utf-8")
    (result.folder / "report.html").write_text(render_html(doc), encoding="utf-8")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def final_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the final per-site table (last row: the federation)."""
    header = ["site", "held-out cases", "AUC", "sensitivity", "specificity", "balanced acc."]
    rows = []
    for name, m in sorted(doc["final"]["sites"].items()):
        rows.append([name, _fmt(m["n"]), *(_fmt(m.get(k)) for k in SHOWN)])
    agg = doc["final"]["aggregate"]
    if agg:
        rows.append(["federation", _fmt(agg["n"]), *(_fmt(agg.get(k)) for k in SHOWN)])
    return header, rows


def _summary_lines(doc: dict[str, Any]) -> list[tuple[str, str]]:
    prof = doc["profile"]
    return [
        ("status", doc["status"] + (f": {doc['error']}" if doc["error"] else "")),
        ("run", str(doc["run_id"])),
        ("profile", f"{prof['name']} v{prof['version']} ({prof['sha256'][:12]})"),
        ("rounds", str(len(doc["rounds"]))),
        ("features", f"{doc['features'].get('n', 'n/a')} selected of {doc['features'].get('agreed', 'n/a')} "
                     f"({doc['features'].get('constant', 0)} near-constant, "
                     f"{doc['features'].get('dropped_correlated', 0)} dropped as correlated)"),
        ("model sha256", str(doc["model_sha256"])),
        ("wall time", f"{doc['seconds']:.1f} s"),
    ]


def render_markdown(doc: dict[str, Any]) -> str:
    lines = ["# radfed run report", ""]
    lines += [f"- **{k}**: {v}" for k, v in _summary_lines(doc)]
    header, rows = final_table(doc)
    lines += ["", "## Final held-out metrics (threshold 0.5, HGG positive)", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Held-out AUC per round", "", "| round | federation | "
              + " | ".join(sorted(doc["final"]["sites"])) + " |", "|" + "---|" * (2 + len(doc["final"]["sites"]))]
    for rnd in doc["rounds"]:
        sites = rnd["evaluate"]["sites"]
        lines.append(f"| {rnd['round']} | {_fmt(rnd['evaluate']['aggregate']['auc'])} | "
                     + " | ".join(_fmt(sites.get(s, {}).get("auc")) for s in sorted(doc["final"]["sites"])) + " |")
    selected = doc["features"].get("selected") or {}
    if selected:
        lines += ["", "## Selected features (Welch's t, HGG vs BM, pooled training data)", "",
                  "| feature | t |", "|---|---|"]
        lines += [f"| `{name}` | {t:+.2f} |" for name, t in selected.items()]
    lines += ["", f"_{doc['notes']['aggregate']}._", "",
              "Research use only: not a diagnostic device.", ""]
    return "\n".join(lines)


def _features_html(doc: dict[str, Any]) -> str:
    selected = doc["features"].get("selected") or {}
    if not selected:
        return ""
    rows = "".join(f"<tr><td><code>{html.escape(n)}</code></td><td>{t:+.2f}</td></tr>" for n, t in selected.items())
    return ("<h2>Selected features (Welch's t, HGG vs BM, pooled training data)</h2>"
            f"<table><tr><th>feature</th><th>t</th></tr>{rows}</table>")


def render_html(doc: dict[str, Any]) -> str:
    esc = html.escape
    header, rows = final_table(doc)
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _summary_lines(doc))
    table = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    sites = sorted(doc["final"]["sites"])
    curve = "<tr><th>round</th><th>federation</th>" + "".join(f"<th>{esc(s)}</th>" for s in sites) + "</tr>"
    for rnd in doc["rounds"]:
        cells = [_fmt(rnd["evaluate"]["aggregate"]["auc"])]
        cells += [_fmt(rnd["evaluate"]["sites"].get(s, {}).get("auc")) for s in sites]
        curve += f"<tr><td>{rnd['round']}</td>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>radfed run {esc(str(doc['run_id']))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}th{{background:#f4f4f4}}</style></head>
<body><h1>radfed run report</h1>
<table>{summary}</table>
<h2>Final held-out metrics (threshold 0.5, HGG positive)</h2><table>{table}</table>
<h2>Held-out AUC per round</h2><table>{curve}</table>
{_features_html(doc)}
<p><em>{esc(doc['notes']['aggregate'])}.</em></p>
<p>Research use only: not a diagnostic device.</p></body></html>
"""
