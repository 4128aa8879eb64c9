"""Reading the site's outbox (``<output_dir>/outbox.jsonl``, written by the privacy guard): what left, per run.

``summary`` is what an administrator asks first: per run, how many messages of which types, how many bytes of
arrays, and the fewest cases any statistic covered (the k that held).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from client.sitefiles import read_jsonl
from common.protocol import REPLIES


def read(outbox: Path) -> list[dict[str, Any]]:
    """Every entry, in the order sent; [] when the site has sent nothing. A damaged line is named."""
    return read_jsonl(outbox, lambda e: "run_id" in e and "type" in e, "an outbox entry (run id and message type)",
                      "the guard appends one JSON line per reply: was the file edited?")


def _fewest_cases(entry: dict[str, Any]) -> int | None:
    spec = REPLIES.get(str(entry["type"]))
    metrics = entry.get("records", {}).get("metrics", {})
    counts = [int(metrics[k]) for k in (spec.count_keys if spec else ()) if isinstance(metrics.get(k), int | float)]
    return min(counts) if counts else None


def summary(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run (in the order first seen): ``run_id``, ``first``/``last`` time, ``messages``, ``types`` (count per
    message type), ``array_bytes`` and ``fewest_cases`` (the smallest case count any statistic covered; None when
    only counts from the manifest left)."""
    runs: dict[str, dict[str, Any]] = {}
    for e in entries:
        run = runs.setdefault(str(e["run_id"]), {"run_id": str(e["run_id"]), "first": e.get("time"), "messages": 0,
                                                  "types": Counter(), "array_bytes": 0, "fewest_cases": None})
        run["last"] = e.get("time")
        run["messages"] += 1
        run["types"][str(e["type"])] += 1
        run["array_bytes"] += sum(int(a.get("bytes", 0)) for a in e.get("records", {}).get("arrays", {}).values()
                                  if isinstance(a, dict))
        fewest = _fewest_cases(e)
        if fewest is not None:
            run["fewest_cases"] = fewest if run["fewest_cases"] is None else min(run["fewest_cases"], fewest)
    return [{**r, "types": dict(r["types"])} for r in runs.values()]
