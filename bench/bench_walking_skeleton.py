"""Walking-skeleton benchmark on the default synthetic demo: prints one table.

    python bench/bench_walking_skeleton.py [--data-root DIR] [--rounds N]

Measures a cold extraction (fresh copy of the demo, so nothing is cached), the federation's wall time
on Flower's simulation engine, and the final federated held-out AUC beside a pooled-centralised
baseline and local-only models (same features, splits and model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import agreed_features, load_sites, local_only, pooled_centralised  # noqa: E402
from bench.table import print_table  # noqa: E402
from radfed import synth  # noqa: E402
from radfed.cli.coordinator import approve_demo_plan, extract_sites  # noqa: E402
from radfed.launch import run_federation  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-bench-"))
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    if args.rounds:
        config["num-server-rounds"] = args.rounds

    t = time.perf_counter()
    site_dirs = synth.make_demo(work / "demo", seed=0)
    generate_s = time.perf_counter() - t
    for d in site_dirs:  # cold: nothing cached
        shutil.rmtree(d / ".radfed", ignore_errors=True)
    t = time.perf_counter()
    results = extract_sites(site_dirs, "default", args.workers)
    extract_wall = time.perf_counter() - t
    n_cases = sum(r[1] for r in results)
    per_case = float(np.mean([r[5] for r in results]))

    # external validation has its own benchmark (bench_validation.py): this one times the main run
    run_config = {**config, "data-root": str(work / "demo"), "output-dir": str(work / "runs"),
                  "external-validation": "none"}
    t = time.perf_counter()
    approve_demo_plan(site_dirs, run_config)
    run_federation(run_config, num_supernodes=len(site_dirs), flwr_home=work / "flwr", echo=False)
    fed_wall = time.perf_counter() - t
    doc = json.loads(sorted((work / "runs").glob("*-run*"))[-1].joinpath("metrics.json").read_text())
    if doc["status"] != "completed":
        print(f"federation {doc['status']}: {doc['error']}")
        return 1
    fed = doc["final"]["aggregate"]

    sites = load_sites(site_dirs, run_config)
    names = list(doc["features"]["selected"])  # the federation's own selection: same features everywhere
    pooled = pooled_centralised(sites, names, run_config)
    local = local_only(sites, names, run_config)

    rows = [
        ("sites", f"{len(site_dirs)}"),
        ("cases usable / failed", f"{n_cases} / {sum(r[3] for r in results)}"),
        ("features per case (extracted / selected)", f"{len(agreed_features(sites))} / {len(names)}"),
        ("demo generation, s", f"{generate_s:.1f}"),
        ("extraction, s per case (1 core)", f"{per_case:.2f}"),
        (f"extraction wall, s ({args.workers} processes)", f"{extract_wall:.1f}"),
        (f"federation wall, s ({config['num-server-rounds']} rounds, cached features)", f"{fed_wall:.1f}"),
        ("  of which the ServerApp's phases, s", f"{doc['seconds']:.1f}"),
        ("federated AUC (held-out, case-weighted)", f"{fed['auc']:.3f}"),
        ("federated sensitivity / specificity", f"{fed['sensitivity']:.3f} / {fed['specificity']:.3f}"),
        ("pooled-centralised AUC", f"{pooled['auc']:.3f}"),
        ("pooled sensitivity / specificity", f"{pooled['sensitivity']:.3f} / {pooled['specificity']:.3f}"),
        ("local-only AUC, own held-out (mean of sites)", f"{np.mean([v['internal_auc'] for v in local.values()]):.3f}"),
        ("local-only AUC, other sites (mean of sites)", f"{np.mean([v['external_auc'] for v in local.values()]):.3f}"),
    ]
    print_table(f"radfed walking skeleton on the default demo (work folder {work})", rows)
    for name, v in sorted(local.items()):
        print(f"  local-only {name}: own {v['internal_auc']:.3f}, others {v['external_auc']:.3f}; "
              f"federated at {name}: {doc['final']['sites'][name]['auc']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
