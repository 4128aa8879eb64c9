"""The value of federation: AUC at an unseen hospital, federated vs each hospital alone, by cases and sites.

    python bench/bench_value.py [--work DIR] [--cases 20,40,80] [--sites 2,4,8] [--seed 0] [--no-check]

Synthetic tiny hospitals (radfed.synth.tiny_sites, distinct scanners), features from real pyradiomics, cached
per site under --work (reuse it to skip extraction: the first run extracts the pool, ~6 minutes on 2 cores).
One pool of hospitals is written, at least the default sweep's (8 hospitals x 80 cases), so a cell's numbers do
not depend on which other cells are asked for; a cell (n cases per site, S sites) takes the first S hospitals
and, at each, the first n // 2 HGG and n - n // 2 BM usable cases in manifest order (a random draw, nested
between cells). Per cell, leave-one-site-out: each hospital in turn is the unseen one and scores, on all its
cases:

- federated: radfed's protocol with exact training on the other S - 1 hospitals, computed in one process by
  bench/inprocess.py from the same pure functions the federation calls (fold-wise d-ComBat, the unseen hospital
  joining it; pooled moments; selection from aggregates; exact L2 logistic). That IS what the federation
  computes (with internal-validation = "cv", whose folds train on every case): the exact fit is the pooled
  maximum-likelihood fit. Confirmed on one small cell by a real federation run (printed below the table);
- local-only (own pipeline): each other hospital alone runs the same pipeline (its own ComBat, standardisation,
  selection with the same knobs, exact model) and the unseen hospital joins its ComBat; AUCs averaged over them;
- pooled-centralised: the same model from textbook tools on the concatenated data (scipy, numpy, scikit-learn);
  with exact training it equals federated, so it is printed only as a check column (largest |AUC difference|).

Knobs are the run's defaults (pyproject.toml) with training = "exact"; select-features is capped per cell by
exact training's limit (a site needs more than exact-min-cases-per-coefficient x (features + 1) training cases),
for both arms. Intervals: 95%, from the DeLong variances at each unseen hospital (the gain's interval adds the
two arms' variances, conservative: common.metrics.federation_gain). A real federation admits a hospital with at
least 2k = 10 patients per class; cells below 20 cases per site are computed but say so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import inprocess  # noqa: E402
from bench.demo_run import default_config, federate  # noqa: E402
from bench.table import print_columns  # noqa: E402
from client.extract import FeatureTable, extract_site  # noqa: E402
from client.steps import load_site_data, open_site, run_config  # noqa: E402
from common import metrics  # noqa: E402
from common.runconfig import RunConfig  # noqa: E402
from radfed import synth  # noqa: E402
from radfed.cli.coordinator import extract_one_site  # noqa: E402

SMALLEST_ADMITTED = 20  # two release blocks of k = 5 per class
POOL_SITES, POOL_PER_CLASS = 8, 40  # the default sweep's largest cell
CHECK_SITES, CHECK_PER_CLASS = 3, 12  # the real-federation check: 12 per class keeps two blocks if a case fails


@dataclass
class Cell:
    cases: int
    sites: int
    features: int
    federated: float
    federated_ci: tuple[float, float]
    local: float
    gain: float
    gain_ci: tuple[float, float]
    pooled_auc_diff: float  # the check column: largest |AUC| and |coefficient| difference, pooled vs federated
    pooled_coef_diff: float


def write_and_extract(root: Path, specs: list[synth.SiteSpec], seed: int) -> list[Path]:
    """Synthetic hospitals under ``root`` (reused when unchanged), features extracted and cached, 2 workers."""
    dirs = synth.make_demo(root, specs, seed=seed)
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(extract_one_site, [str(d) for d in dirs], ["default"] * len(dirs), [1] * len(dirs)))
    return dirs


def feature_table(site_dir: Path) -> FeatureTable:
    site, profile = open_site(site_dir, "default")
    return extract_site(site, profile)[0]


def first_cases(table: FeatureTable, n: int) -> FeatureTable:
    """The first n // 2 HGG and n - n // 2 BM usable cases, in manifest order (fewer if the site lacks them)."""
    left = {1: n // 2, 0: n - n // 2}
    rows = []
    for i, y in enumerate(table.labels.tolist()):
        if left[y] > 0:
            rows.append(i)
            left[y] -= 1
    return FeatureTable([table.case_ids[i] for i in rows], table.labels[rows], table.names, table.values[rows])


def interval(value: float, var: float) -> tuple[float, float]:
    half = metrics.Z95 * float(np.sqrt(max(var, 0.0)))
    return value - half, value + half


def measure(tables: dict[str, FeatureTable], run: RunConfig, n: int) -> Cell:
    """One cell: leave-one-site-out federated and local-only, the gain, and the pooled-centralised check."""
    least = min(len(t.labels) for t in tables.values())
    features = min(run.select_features, inprocess.max_features(least, run))
    cell_run = run.model_copy(update={"select_features": features})
    loso, check = {}, []
    for h in sorted(tables):
        others = {s: t for s, t in tables.items() if s != h}
        fed, pooled = inprocess.fit(others, cell_run), inprocess.pooled_centralised(others, cell_run)
        loso[h] = fed.evaluate(tables[h])
        coef = float(np.abs(fed.coef - pooled.coef).max()) if fed.names == pooled.names else float("inf")
        check.append((abs(pooled.evaluate(tables[h])["auc"] - loso[h]["auc"]), coef))
    gain = metrics.federation_gain(loso, inprocess.local_only(tables, cell_run))["overall"]
    w = np.array([r["n"] for r in loso.values()]) / sum(r["n"] for r in loso.values())  # as federation_gain
    fed_var = float(np.sum(w**2 * [r["auc_var"] for r in loso.values()]))
    return Cell(n, len(tables), features, gain["federated_auc"], interval(gain["federated_auc"], fed_var),
                gain["local_only_auc"], gain["gain"], tuple(gain["gain_ci"]),
                max(a for a, _ in check), max(c for _, c in check))


def check_with_federation(work: Path, run_values: dict[str, Any], seed: int) -> float:
    """One real federation (exact training, leak-free leave-one-site-out, local-only baselines; cv so that
    every case trains) on freshly written small hospitals, against the in-process numbers on the same cases:
    the largest |AUC difference| over every fold and every local-only model at every other site."""
    root = work / f"check-s{seed}"
    dirs = write_and_extract(root, synth.tiny_sites(CHECK_SITES, CHECK_PER_CLASS), seed + 1)
    overrides: dict[str, Any] = {"data-root": str(root), "training": "exact", "external-validation": "loso",
                                 "local-only": "own-pipeline", "internal-validation": "cv", "cv-folds": 2}
    config = {**run_values, **overrides}
    data = {d.name: load_site_data(d, config) for d in dirs}
    tables = {name: d.table for name, d in data.items()}  # the rows the sites use (whole release blocks)
    # the fewest cases any fit trains on: the main run's cross-validation folds train without one fold
    least = min(int(np.sum(d.cv_fold != v)) for d in data.values() for v in range(int(config["cv-folds"])))
    overrides["select-features"] = min(int(config["select-features"]),
                                       inprocess.max_features(least, run_config(config)))
    config.update(overrides)
    run = run_config(config)
    doc, wall, _ = federate(work, dirs, f"value-check-seed{seed}", **overrides)
    if doc["status"] != "completed":
        raise RuntimeError(f"the check federation {doc['status']}: {doc.get('error')}")
    loso, local = inprocess.leave_one_site_out(tables, run), inprocess.local_only(tables, run)
    fed_loso, fed_local = doc["validation"]["loso"], doc["validation"]["local_only"]
    diffs = [abs(fed_loso[h]["auc"] - r["auc"]) for h, r in loso.items()]
    diffs += [abs(fed_local[s]["external"][h]["auc"] - r["auc"]) for s, rec in local.items()
              for h, r in rec["external"].items()]
    print(f"\nCheck: a real federation ({CHECK_SITES} hospitals x {2 * CHECK_PER_CLASS} cases, "
          f"{run.select_features} features, {wall:.0f} s) vs in-process, {len(diffs)} AUCs "
          f"(leave-one-site-out folds and local-only models): max |difference| = {max(diffs):.2e}")
    return max(diffs)


def plot(cells: list[Cell], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, s in enumerate(sorted({c.sites for c in cells})):
        row = sorted((c for c in cells if c.sites == s), key=lambda c: c.cases)
        color = f"C{i}"
        ax.plot([c.cases for c in row], [c.federated for c in row], "-o", color=color, label=f"{s} sites: federated")
        ax.plot([c.cases for c in row], [c.local for c in row], "--s", color=color, label=f"{s} sites: local-only")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({c.cases for c in cells}), [str(n) for n in sorted({c.cases for c in cells})])
    ax.set_xlabel("cases per site")
    ax.set_ylabel("AUC at the unseen site (mean over held-out sites)")
    ax.set_title("Value of federation (leave-one-site-out, exact training)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(cells: list[Cell]) -> str:
    """Where federation helps and where not, in words, from the measured cells."""
    helps = [c for c in cells if c.gain_ci[0] > 0]
    unclear = [c for c in cells if c.gain_ci[0] <= 0 and c.sites > 2]
    name = lambda cs: ", ".join(f"{c.cases}x{c.sites}" for c in cs) or "none"  # noqa: E731
    parts = [f"Federation helps clearly (gain interval above 0) at {name(helps)} (cases per site x sites)."]
    two = [c for c in cells if c.sites == 2]
    if two and max(abs(c.gain) for c in two) < 1e-9:
        parts.append("With 2 sites it cannot help (gain 0): each leave-one-site-out fold trains on the one "
                     "remaining site, which is that site's own model.")
    if unclear:
        parts.append(f"Not clearly at {name(unclear)}: the gain's interval includes 0.")
    by_cases = sorted({c.cases for c in cells})
    for s in sorted({c.sites for c in cells if c.sites > 2}):
        row = {c.cases: c for c in cells if c.sites == s}
        lo, hi = row[by_cases[0]], row[by_cases[-1]]
        if lo is hi:
            continue
        parts.append(f"With {s} sites the gain goes from {lo.gain:+.3f} at {lo.cases} cases per site to "
                     f"{hi.gain:+.3f} at {hi.cases}: a site alone goes from {lo.local:.3f} to {hi.local:.3f} and the "
                     f"federation, training on {s - 1} sites' cases, from {lo.federated:.3f} to {hi.federated:.3f}.")
    parts.append("Why: a hospital alone must choose its features and fit its model from its own few cases (and "
                 "harmonise against itself only); the federation chooses and fits from every other hospital's "
                 "cases and scanners, so it helps most where each hospital has few cases and there are more "
                 "hospitals to pool, and less as one hospital's own data approaches what the pooled data show.")
    return " ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working folder, reused between runs (default: a fresh one)")
    parser.add_argument("--cases", default="20,40,80", help="cases per site, comma-separated")
    parser.add_argument("--sites", default="2,4,8", help="numbers of sites, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic hospitals' seed")
    parser.add_argument("--no-check", action="store_true", help="skip the real federation run of the check")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-value-"))
    cases = sorted(int(v) for v in args.cases.split(","))
    n_sites = sorted(int(v) for v in args.sites.split(","))
    if min(cases) < 4 or min(n_sites) < 2:
        parser.error("need at least 4 cases per site and 2 sites")
    values = {**default_config(), "training": "exact"}
    run = run_config(values)

    # one pool, at least the default's, so a cell's hospitals and cases do not depend on which cells are asked for
    pool_sites, per_class = max(POOL_SITES, *n_sites), max(POOL_PER_CLASS, -(-max(cases) // 2))
    dirs = write_and_extract(work / f"pool-s{args.seed}-{pool_sites}x{2 * per_class}",
                             synth.tiny_sites(pool_sites, per_class), args.seed)
    pool = {d.name: feature_table(d) for d in dirs}
    cells = []
    for s in n_sites:
        for n in cases:
            cell = measure({name: first_cases(pool[name], n) for name in list(pool)[:s]}, run, n)
            cells.append(cell)
            print(f"  {n} cases x {s} sites: federated {cell.federated:.3f}, local-only {cell.local:.3f}", flush=True)

    rows = [[str(c.cases) + (" (below admission)" if c.cases < SMALLEST_ADMITTED else ""), str(c.sites),
             str(c.features), f"{c.federated:.3f} ({c.federated_ci[0]:.3f} to {c.federated_ci[1]:.3f})",
             f"{c.local:.3f}", f"{c.gain:+.3f} ({c.gain_ci[0]:+.3f} to {c.gain_ci[1]:+.3f})",
             f"{c.pooled_auc_diff:.0e} / {c.pooled_coef_diff:.0e}"]
            for c in cells]
    print_columns(f"radfed: value of federation at an unseen hospital (leave-one-site-out AUC, mean over held-out "
                  f"sites, 95% CI; seed {args.seed}, work folder {work})",
                  ["cases/site", "sites", "features", "federated", "local-only (own)", "gain",
                   "check: pooled - fed, AUC / coef"],
                  rows)
    png = work / f"value-of-federation-seed{args.seed}.png"
    plot(cells, png)
    print(f"\nPlot: {png}")
    if not args.no_check:
        check_with_federation(work, values, args.seed)
    print("\n" + summary(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
