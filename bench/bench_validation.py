"""What the federation gains at unseen hospitals, on the default demo, and what the protocol costs.

    python bench/bench_validation.py [--work DIR]

Three federation runs on the same sites: the default (leak-free leave-one-site-out + each site's own pipeline
alone, "local-only"), then without the local-only baselines, then without either, for the cost of each.
Beside them, in one process on the same features (a real federation never does this):

- pooled-centralised: one model on the fold's training sites' data together, same fold features and the
  same (leak-free) harmonisation, the same fit (exact training, the default: the pooled maximum-likelihood fit;
  FedAvg: rounds x local epochs full-batch steps);
- the protocol before protocol 3, where ComBat was fitted once with every site, so the held-out site's
  features shaped its own fold's harmonisation: same pooled fit, to show what that changed;
- "site alone with the federation's features" (the old baseline, kept as a second row): each site's model
  on the features the whole federation selected, which a hospital alone could not have chosen.

Goals (issue 17): federated leave-one-site-out AUC >= mean local-only (own pipeline) AUC at unseen sites + 0.05;
federated = pooled-centralised within 0.005 AUC on the same protocol.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import load_sites, local_at_other_sites, pooled_loso  # noqa: E402
from bench.demo_run import default_config, demo_sites, federate  # noqa: E402
from bench.table import print_table  # noqa: E402


def _cost(doc: dict[str, Any], folder: Path, site_dirs: list[Path], wall: float) -> str:
    """Wall seconds, training rounds (FedAvg rounds and Newton steps, all folds) and replies the sites sent."""
    events = [json.loads(line)["event"] for line in (folder / "audit.jsonl").read_text().splitlines()]
    rounds = events.count("round-train") + events.count("newton-round")
    replies = 0
    for d in site_dirs:
        outbox = d / ".radfed" / "outbox.jsonl"
        replies += sum(1 for line in outbox.read_text().splitlines() if json.loads(line)["run_id"] == doc["run_id"])
    return f"{wall:.0f} s, {rounds} rounds, {replies} replies"


def _mean_auc(records: dict[str, dict[str, Any]]) -> float:
    return float(np.mean([r["auc"] for r in records.values() if "auc" in r]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-bench-"))
    site_dirs = demo_sites(work)
    runs = {}
    for tag, overrides in (("full", {}), ("loso", {"local-only": "none"}),
                           ("main", {"local-only": "none", "external-validation": "none"})):
        doc, wall, folder = federate(work, site_dirs, f"validation-{tag}", **overrides)
        if doc["status"] != "completed":
            print(f"federation ({tag}) {doc['status']}: {doc['error']}")
            return 1
        runs[tag] = (doc, _cost(doc, folder, site_dirs, wall))
    doc = runs["full"][0]
    config = {**default_config(), "data-root": str(work / "demo")}
    sites = load_sites(site_dirs, config)
    loso = {s: r for s, r in doc["validation"]["loso"].items() if "auc" in r}
    gain = doc["validation"]["federation_gain"]
    local = doc["validation"]["local_only"]
    folds = {s: r["features"] for s, r in loso.items()}
    pooled = pooled_loso(sites, folds, config)
    before = pooled_loso(sites, folds, config, leak_free=False)
    borrowed = local_at_other_sites(sites, list(doc["features"]["selected"]), config)

    fed_ext, local_ext = gain["overall"]["federated_auc"], gain["overall"]["local_only_auc"]
    lo, hi = gain["overall"]["gain_ci"]
    pooled_mean = _mean_auc(pooled)
    rows = [
        ("cost: main run only", runs["main"][1]),
        ("cost: + leave-one-site-out (leak-free: ComBat refitted per fold, held-out site joins)", runs["loso"][1]),
        ("cost: + local-only baselines (default)", runs["full"][1]),
        ("internal (held-out splits): federated AUC, case-weighted", f"{doc['final']['aggregate']['auc']:.3f}"),
        ("internal: local-only (own pipeline) AUC, mean of sites",
         f"{np.mean([r['internal']['auc'] for r in local.values() if 'internal' in r]):.3f}"),
        ("unseen site: federated AUC, case-weighted", f"{fed_ext:.3f}"),
        ("unseen site: local-only (own pipeline) AUC, case-weighted mean", f"{local_ext:.3f}"),
        ("unseen site: gain (95% CI, conservative)", f"{fed_ext - local_ext:+.3f} ({lo:+.3f} to {hi:+.3f})"),
        ("unseen site: goal gain >= +0.05", "met" if fed_ext - local_ext >= 0.05 else "NOT met"),
        ("unseen site: federated AUC, mean of sites", f"{_mean_auc(loso):.3f}"),
        ("unseen site: pooled-centralised AUC, same protocol, mean", f"{pooled_mean:.3f}"),
        ("unseen site: goal |federated - pooled| <= 0.005",
         f"{'met' if abs(_mean_auc(loso) - pooled_mean) <= 0.005 else 'NOT met'} "
         f"({_mean_auc(loso) - pooled_mean:+.3f})"),
        ("unseen site: pooled, protocol before 3 (ComBat fitted with the held-out site)", f"{_mean_auc(before):.3f}"),
        ("unseen site: site alone with the federation's features (borrowed), mean", f"{_mean_auc(borrowed):.3f}"),
    ]
    print_table(f"radfed: federation vs each hospital alone, default demo (work folder {work})", rows)
    print("\n  unseen site     n   federated   alone (own)  gain (95% CI)            pooled   before-3  borrowed")
    for s, g in sorted(gain["sites"].items()):
        glo, ghi = g["gain_ci"]
        print(f"  {s:<14} {int(g['n']):>4}   {g['federated_auc']:.3f}       {g['local_only_auc']:.3f}        "
              f"{g['gain']:+.3f} ({glo:+.2f} to {ghi:+.2f})   {pooled[s]['auc']:.3f}    {before[s]['auc']:.3f}     "
              f"{borrowed[s]['auc']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
