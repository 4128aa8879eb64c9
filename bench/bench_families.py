"""Model families under one protocol, on the default demo: one federation fitting every family. Prints two tables.

    python bench/bench_families.py [--work DIR] [--models logistic-l2,logistic-l1,svm,mlp,gbt] [--features 10]
                                  [--long-rounds 1000]

Per family: the leave-one-site-out (external) AUC, mean over the held-out sites and at each; the main run's training
rounds (FedAvg rounds, Newton rounds for the exact fits, tree levels for gbt); the messages its training and
evaluation took (site replies, from the audit log); the seconds from its ``model-init`` to its last entry in the main
run (audit times); and the paired AUC difference to the first listed family (external, pooled over folds) with its
95% interval. A second table puts each FedAvg family (svm, mlp) beside the same family fitted on the pooled data
(bench/fedavg_pooled.py).
``training = "exact"`` (logistic-l2 by Newton), ``local-only = "none"``. The demo is generated and extracted under
``--work`` (kept between runs when reused).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.demo_run import demo_sites, federate  # noqa: E402
from bench.fedavg_pooled import TRAINED, compare, print_table  # noqa: E402
from bench.table import print_columns  # noqa: E402


def _time(entry: dict) -> datetime:
    return datetime.fromisoformat(str(entry["time"]))


def per_family_costs(folder: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """Main-run rounds, site messages and seconds per family, read from the signed audit log."""
    entries = [json.loads(line) for line in (folder / "audit.jsonl").read_text(encoding="utf-8").splitlines()]
    main = [e for e in entries if not e["data"].get("fold") and not e["data"].get("stage")]
    out = {}
    for name in names:
        own = [e for e in main if e["data"].get("family") == name]
        events = {e["event"] for e in own}
        # one entry per training round trip: Newton rounds (exact), tree levels (gbt), else FedAvg rounds; the
        # exact and gbt fits also log one closing round-train (no message of its own)
        trip = "newton-round" if "newton-round" in events else "tree-level" if "tree-level" in events else "round-train"
        counted = [e for e in own if e["event"] in (trip, "round-evaluate")]
        out[name] = {"rounds": sum(e["event"] == trip for e in own),
                     "messages": sum(len(e["data"].get("sites") or {}) for e in counted),
                     "seconds": (_time(own[-1]) - _time(own[0])).total_seconds() if own else float("nan")}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--models", default="logistic-l2,logistic-l1,svm,mlp,gbt")
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--long-rounds", type=int, default=1000, help="FedAvg rounds of the in-process long replay")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-bench-"))
    site_dirs = demo_sites(work)
    names = args.models.split(",")
    doc, wall, folder = federate(work, site_dirs, "families", models=args.models, training="exact",
                                 **{"select-features": args.features, "local-only": "none"})
    if doc["status"] != "completed":
        print(f"federation {doc['status']}: {doc['error']}")
        return 1
    fam, costs = doc["families"], per_family_costs(folder, names)
    sites = sorted(doc["validation"]["loso"])
    rows = []
    for name in names:
        ext = {s: doc["validation"]["loso"][s].get("families", {}).get(name, {}).get("auc") for s in sites}
        pair = fam["comparison"]["external"].get(name, {})
        diff = (f"{pair['auc_diff']:+.3f} ({pair['auc_diff_ci'][0]:+.3f} to {pair['auc_diff_ci'][1]:+.3f})"
                if pair else "reference")
        rows.append([name + (" (chosen)" if name == fam["chosen"] else ""),
                     f"{fam['rows'][name]['internal']['auc']:.3f}", f"{fam['rows'][name]['external']['auc']:.3f}",
                     " ".join(f"{ext[s]:.3f}" if ext[s] is not None else "n/a" for s in sites), diff,
                     str(costs[name]["rounds"]), str(costs[name]["messages"]), f"{costs[name]['seconds']:.1f}"])
    print_columns(f"Model families on the demo ({len(sites)} sites, {args.features} features, whole run {wall:.0f} s; "
                  f"external AUC per site: {', '.join(sites)})",
                  ["family", "internal AUC", "external AUC (mean)", "external AUC per site",
                   f"external AUC diff to {names[0]} (95% CI)", "rounds", "messages", "seconds (main run)"], rows)
    if any(n in TRAINED for n in names):  # the FedAvg families against the pooled fits (bench/fedavg_pooled.py)
        print()
        print_table(compare(folder, site_dirs, args.long_rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
