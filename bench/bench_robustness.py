"""Robustness filter benchmark: what the perturbed extractions cost, and what the filter does to external AUC.

    python bench/bench_robustness.py [--work DIR] [--thresholds 0,0.75] [--workers 2]

On the default demo (radfed.synth.make_demo, seed 0, four hospitals, the default profile with its robustness
block) it measures:

- extraction seconds per case: the originals (extract_site, cold cache) and the profile's perturbed copies of each
  site's training cases (client.robustness, cold cache), both one process per site with ``--workers`` sites at
  once; the ratio is what turning the filter on adds to a site's first run (later runs read both caches);
- one real federation per ``--thresholds`` value (robustness-min-icc; 0 = off), every other knob the app's
  default (external-validation = "loso", local-only = "own-pipeline"): features removed by the filter, the
  external (leave-one-site-out) AUC at each hospital and their case-weighted mean, and the federation's held-out
  AUC. The runs find the perturbed copies in the sites' caches, so their wall time is the filter's cost once
  extracted.

Reuse ``--work`` to skip extraction. The first run extracts for ~15-25 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.demo_run import default_config, demo_sites, federate  # noqa: E402
from bench.table import print_columns  # noqa: E402


def perturb_site(site_dir: str) -> tuple[str, int, float]:
    """A site's training cases under the profile's perturbations, cold: (site, cases, seconds)."""
    from client.robustness import perturbed_features
    from client.steps import load_site_data

    data = load_site_data(Path(site_dir), default_config())
    ids = [c for c, held in zip(data.table.case_ids, data.held_out, strict=True) if not held]
    start = time.perf_counter()
    perturbed_features(data.site, data.profile, ids)
    return data.site.name, len(ids), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--thresholds", default="0,0.75")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="radfed-robust-"))
    print(f"work folder: {work}")

    from client.site import load_site
    from common.profile import load_profile

    profile = load_profile("default")
    assert profile.robustness is not None
    fresh = not any((work / "demo").glob("*/.radfed/features-*.csv"))
    start = time.perf_counter()
    site_dirs = demo_sites(work, workers=args.workers)
    original_seconds = time.perf_counter() - start
    n_cases = sum(len(load_site(d, profile.sequences).cases) for d in site_dirs)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        perturbed = list(pool.map(perturb_site, [str(d) for d in site_dirs]))
    perturbed_wall = time.perf_counter() - start

    rows = []
    per_case = [(name, n, s / n) for name, n, s in perturbed if s > 1.0]
    if per_case:
        mean_perturbed = sum(s for _, _, s in per_case) / len(per_case)
        rows.append(["perturbed copies (" + ", ".join(p.describe() for p in profile.robustness.draws()) + ")",
                     f"{mean_perturbed:.2f} s per training case ({len(profile.robustness.draws())} copies)",
                     f"{perturbed_wall:.0f} s wall, {sum(n for _, n, _ in per_case)} cases"])
    if fresh:  # each case's own extraction seconds, from the sites' extraction.log (the demo's writing excluded)
        times = [float(m) for d in site_dirs for m in re.findall(r"features in ([0-9.]+)s",
                                                                  (d / ".radfed" / "extraction.log").read_text())]
        rows.append(["originals (extract_site)", f"{sum(times) / len(times):.2f} s per case",
                     f"{original_seconds:.0f} s wall with writing the demo, {n_cases} cases"])
    print_columns("Extraction cost (cold caches, one process per site, "
                  f"{args.workers} at once on a shared machine)", ["what", "cost", "total"], rows or
                  [["(all cached: run with a new --work to measure)", "", ""]])

    results = []
    for threshold in (float(t) for t in args.thresholds.split(",")):
        doc, wall, _ = federate(work, site_dirs, f"icc{threshold:g}", **{"robustness-min-icc": threshold})
        assert doc["status"] == "completed", doc["error"]
        loso = doc["validation"]["loso"]
        n = {s: r["n"] for s, r in loso.items()}
        weighted = sum(r["auc"] * n[s] for s, r in loso.items()) / sum(n.values())
        rob = doc["features"].get("robustness", {})
        results.append([f"{threshold:g}" + (" (off)" if threshold == 0 else ""),
                        f"{rob.get('n_removed', 0)} of {doc['features']['agreed']}",
                        *(f"{loso[s]['auc']:.3f}" for s in sorted(loso)), f"{weighted:.3f}",
                        f"{doc['final']['aggregate']['auc']:.3f}", f"{wall:.0f}"])
        sites = sorted(loso)
    print_columns("Federated external validation (leave-one-site-out AUC at each unseen hospital)",
                  ["robustness-min-icc", "removed", *sites, "LOSO mean (case-weighted)", "held-out AUC", "run s"],
                  results)


if __name__ == "__main__":
    main()
