"""External validation on the default demo: federated vs pooled-centralised vs local-only, on held-out
splits (internal) and leave-one-site-out (external). Prints one table.

    python bench/bench_validation.py [--work DIR]

The federation runs with its defaults (ComBat, 30 features, FedAvg, leave-one-site-out on). The
baselines use the same features, harmonisation, standardisation rule, model and optimiser steps:
pooled = all training splits in one place; local-only = each site alone on raw features.
Goals (issue 7): federated AUC within 0.01 of pooled; at least 0.05 above the mean local-only AUC.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import load_sites, local_at_other_sites, local_only, pooled_centralised, pooled_loso  # noqa: E402
from bench.demo_run import default_config, demo_sites, federate  # noqa: E402
from bench.table import print_table  # noqa: E402


def _weighted(records: dict[str, dict[str, float]]) -> float:
    n = sum(r["n"] for r in records.values())
    return sum(r["auc"] * r["n"] for r in records.values()) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-bench-"))
    site_dirs = demo_sites(work)
    doc, wall, _ = federate(work, site_dirs, "validation")
    if doc["status"] != "completed":
        print(f"federation {doc['status']}: {doc['error']}")
        return 1
    config = {**default_config(), "data-root": str(work / "demo")}
    sites = load_sites(site_dirs, config)
    names = list(doc["features"]["selected"])
    loso = doc["validation"]["loso"]

    fed_internal = doc["final"]["aggregate"]["auc"]
    pooled_internal = pooled_centralised(sites, names, config)["auc"]
    local = local_only(sites, names, config)
    local_internal = float(np.mean([v["internal_auc"] for v in local.values()]))
    fed_ext = {s: r for s, r in loso.items() if "auc" in r}
    pooled_ext = pooled_loso(sites, {s: r["features"] for s, r in fed_ext.items()}, config)
    local_ext = local_at_other_sites(sites, names, config)
    fed_ext_mean = float(np.mean([r["auc"] for r in fed_ext.values()]))
    pooled_ext_mean = float(np.mean([r["auc"] for r in pooled_ext.values()]))
    local_ext_mean = float(np.mean([r["auc"] for r in local_ext.values()]))
    fed_ext_bacc = float(np.mean([r["balanced_accuracy"] for r in fed_ext.values()]))
    local_ext_bacc = float(np.mean([r["balanced_accuracy"] for r in local_ext.values()]))

    def goal(fed: float, pooled: float, loc: float) -> str:
        ok = abs(fed - pooled) <= 0.01 and fed >= loc + 0.05
        return f"{'met' if ok else 'NOT met'} (fed-pooled {fed - pooled:+.3f}, fed-local {fed - loc:+.3f})"

    rows = [
        ("sites / federation wall, s (incl. 4 external folds)", f"{len(sites)} / {wall:.0f}"),
        ("internal (held-out splits): federated AUC, case-weighted", f"{fed_internal:.3f}"),
        ("internal: pooled-centralised AUC", f"{pooled_internal:.3f}"),
        ("internal: local-only AUC, own held-out, mean of sites", f"{local_internal:.3f}"),
        ("internal: goal", goal(fed_internal, pooled_internal, local_internal)),
        ("leave-one-site-out: federated AUC, mean of held-out sites", f"{fed_ext_mean:.3f}"),
        ("leave-one-site-out: federated AUC, case-weighted", f"{_weighted(fed_ext):.3f}"),
        ("leave-one-site-out: pooled-centralised AUC, mean", f"{pooled_ext_mean:.3f}"),
        ("leave-one-site-out: local-only at another site, mean", f"{local_ext_mean:.3f}"),
        ("leave-one-site-out: goal", goal(fed_ext_mean, pooled_ext_mean, local_ext_mean)),
        # AUC at one site is blind to a scanner's offset (it shifts every case alike); a fixed threshold is not
        ("leave-one-site-out: balanced accuracy at 0.5, federated / local-only, mean",
         f"{fed_ext_bacc:.3f} / {local_ext_bacc:.3f}"),
    ]
    print_table(f"radfed external validation on the default demo (work folder {work})", rows)
    print("\n  held-out site     n    federated AUC (95% CI)   sens / spec     pooled   local-only AUC / bal. acc.")
    for s, r in sorted(fed_ext.items()):
        lo, hi = r["ci"]["auc"]
        print(f"  {s:<14} {r['n']:>4}    {r['auc']:.3f} ({lo:.2f}-{hi:.2f})       "
              f"{r['sensitivity']:.2f} / {r['specificity']:.2f}     {pooled_ext[s]['auc']:.3f}    "
              f"{local_ext[s]['auc']:.3f} / {local_ext[s]['balanced_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
