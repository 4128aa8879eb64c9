"""The value of federation: AUC at an unseen hospital, federated vs each hospital alone, by cases and sites.

    python bench/bench_value.py [--work DIR] [--cases 20,40,80] [--sites 2,4,8] [--seed 0] [--draws 2] [--no-check]

Synthetic tiny hospitals (radfed.synth.tiny_sites, distinct scanners), features from real pyradiomics, cached
per site under --work (reuse it to skip extraction: the first run extracts ~6 minutes per draw on 2 cores). Each
draw is one pool of hospitals, at least the default sweep's (8 hospitals x 80 cases), so a cell's numbers do not
depend on which other cells are asked for. A cell (n cases per site, S sites) splits every pool into disjoint
federations of S hospitals (8 / S per pool of 8), so every hospital is the unseen one once in every cell, and
takes at each hospital the first n // 2 HGG and n - n // 2 BM usable cases in manifest order (a random draw,
nested between cells). Leave-one-site-out in each federation: each hospital in turn is the unseen one and
scores, on all its cases:

- federated: radfed's protocol with exact training on the other S - 1 hospitals, computed in one process by
  bench/inprocess.py from the same pure functions the federation calls (fold-wise d-ComBat, the unseen hospital
  joining it; pooled moments; selection from aggregates; exact L2 logistic). That IS what the federation
  computes (with internal-validation = "cv", whose folds train on every case): the exact fit is the pooled
  maximum-likelihood fit. Confirmed on one small cell by a real federation run (printed below the table);
- local-only (own pipeline): each other hospital alone runs the same pipeline (its own ComBat, standardisation,
  selection with the same knobs, exact model) and the unseen hospital joins its ComBat; AUCs averaged over them;
- pooled-centralised: the same model from textbook tools on the concatenated data (scipy, numpy, scikit-learn);
  with exact training it equals federated, so it is printed only as a check column (largest |AUC| and
  |coefficient| difference over the cell's folds).

Knobs are the run's defaults (pyproject.toml) with select-features = 30; select-features is capped per cell by
exact training's limit (a site needs more than exact-min-cases-per-coefficient x (features + 1) training cases),
for both arms. AUCs are means over every unseen hospital of the cell (all draws); intervals: 95%, from the
DeLong variances at each unseen hospital (the gain's interval adds the
two arms' variances, conservative: common.metrics.federation_gain). A real federation admits a hospital with at
least 2k = 10 patients per class; cells below 20 cases per site are computed but say so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
from radfed.cli.coordinator import extract_sites  # noqa: E402

SMALLEST_ADMITTED = 20  # two release blocks of k = 5 per class
POOL_SITES, POOL_PER_CLASS = 8, 40  # the default sweep's largest cell
CHECK_SITES, CHECK_PER_CLASS = 3, 12  # the real-federation check: 12 per class keeps two blocks if a case fails


@dataclass
class Cell:
    cases: int
    sites: int
    federations: int  # disjoint federations of ``sites`` hospitals drawn from the pool
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
    extract_sites(dirs, "default", 2)
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


def measure(groups: list[dict[str, FeatureTable]], run: RunConfig, n: int) -> Cell:
    """One cell: disjoint federations of the same size (every hospital of the pool serves as the unseen one
    once), leave-one-site-out federated and local-only in each, the gain over all unseen hospitals, and the
    pooled-centralised check."""
    least = min(len(t.labels) for tables in groups for t in tables.values())
    features = min(run.select_features, inprocess.max_features(least, run))
    cell_run = run.model_copy(update={"select_features": features})
    loso: dict[str, dict[str, float]] = {}
    local: dict[str, Any] = {}
    check = []
    for tables in groups:
        for h in sorted(tables):
            others = {s: t for s, t in tables.items() if s != h}
            fed, pooled = inprocess.fit(others, cell_run), inprocess.pooled_centralised(others, cell_run)
            loso[h] = fed.evaluate(tables[h])
            coef = float(np.abs(fed.coef - pooled.coef).max()) if fed.names == pooled.names else float("inf")
            check.append((abs(pooled.evaluate(tables[h])["auc"] - loso[h]["auc"]), coef))
        local.update(inprocess.local_only(tables, cell_run))
    gain = metrics.federation_gain(loso, local)["overall"]
    w = np.array([r["n"] for r in loso.values()]) / sum(r["n"] for r in loso.values())  # as federation_gain
    fed_var = float(np.sum(w**2 * [r["auc_var"] for r in loso.values()]))
    return Cell(n, len(groups[0]), len(groups), features, gain["federated_auc"],
                interval(gain["federated_auc"], fed_var), gain["local_only_auc"], gain["gain"],
                tuple(gain["gain_ci"]), max(a for a, _ in check), max(c for _, c in check))


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
    name = lambda cs: ", ".join(f"{c.cases}x{c.sites}" for c in cs) or "none"  # noqa: E731
    parts = [f"Federation helps clearly (gain interval above 0) at {name([c for c in cells if c.gain_ci[0] > 0])} "
             "(cases per site x sites)."]
    two = [c for c in cells if c.sites == 2]
    if two and max(abs(c.gain) for c in two) < 1e-9:
        parts.append("With 2 sites it cannot help (gain 0): each leave-one-site-out fold trains on the one "
                     "remaining site, which is that site's own model.")
    multi = [c for c in cells if c.sites > 2]
    shrinks = []
    for s in sorted({c.sites for c in multi}):
        row = sorted((c for c in multi if c.sites == s), key=lambda c: c.cases)
        lo, hi = row[0], row[-1]
        if lo is hi:
            continue
        shrinks.append(hi.gain < lo.gain)
        parts.append(f"With {s} sites the gain {'shrinks' if shrinks[-1] else 'grows'} from {lo.gain:+.3f} at "
                     f"{lo.cases} cases per site to {hi.gain:+.3f} at {hi.cases}: a site alone goes from "
                     f"{lo.local:.3f} to {hi.local:.3f}, the federation (training on {s - 1} sites' cases) from "
                     f"{lo.federated:.3f} to {hi.federated:.3f}.")
    if not multi:
        return " ".join(parts)
    mean = float(np.mean([c.gain for c in multi]))
    if mean > 0:
        parts.append(f"Why it helps (mean gain {mean:+.3f} with more than 2 sites): a hospital alone chooses its "
                     "features and fits its model from its own cases and scanner only, the federation from every "
                     "other hospital's, so its model transfers better to an unseen one.")
    else:
        parts.append(f"With more than 2 sites the mean gain is {mean:+.3f}: pooling other hospitals did not transfer "
                     "better to an unseen one here.")
    if shrinks and all(shrinks):
        parts.append("The gain is largest where each hospital has fewest cases: a hospital alone catches up as its "
                     "own data grow.")
    wide = [c for c in multi if c.gain_ci[0] <= 0]
    if wide:
        parts.append(f"Where the interval includes 0 ({name(wide)}), the unseen hospitals' cases are too few to "
                     "tell the two apart, or the federated model is not better there.")
    return " ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working folder, reused between runs (default: a fresh one)")
    parser.add_argument("--cases", default="20,40,80", help="cases per site, comma-separated")
    parser.add_argument("--sites", default="2,4,8", help="numbers of sites, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic hospitals' seed (of the first draw)")
    parser.add_argument("--draws", type=int, default=2, help="independent pools of hospitals (seeds seed, seed+1, ..)")
    parser.add_argument("--no-check", action="store_true", help="skip the real federation run of the check")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-value-"))
    cases = sorted(int(v) for v in args.cases.split(","))
    n_sites = sorted(int(v) for v in args.sites.split(","))
    if min(cases) < 4 or min(n_sites) < 2 or args.draws < 1:
        parser.error("need at least 4 cases per site, 2 sites and 1 draw")
    # select-features 30 (the default before exact training became the default), capped per cell: the README's
    # table was made so, and the cap, not the default, is what binds at small sites
    values = {**default_config(), "training": "exact", "select-features": 30}
    run = run_config(values)

    # each draw's pool is at least the default's, so a cell's numbers do not depend on the other cells asked for
    pool_sites, per_class = max(POOL_SITES, *n_sites), max(POOL_PER_CLASS, -(-max(cases) // 2))
    pools = []  # per draw, its hospitals' feature tables, named "s<seed>/<hospital>"
    for seed in range(args.seed, args.seed + args.draws):
        dirs = write_and_extract(work / f"pool-s{seed}-{pool_sites}x{2 * per_class}",
                                 synth.tiny_sites(pool_sites, per_class), seed)
        pools.append({f"s{seed}/{d.name}": feature_table(d) for d in dirs})
    cells = []
    for s in n_sites:
        for n in cases:
            groups = [{name: first_cases(pool[name], n) for name in list(pool)[g * s:(g + 1) * s]}
                      for pool in pools for g in range(len(pool) // s)]
            cell = measure(groups, run, n)
            cells.append(cell)
            print(f"  {n} cases x {s} sites: federated {cell.federated:.3f}, local-only {cell.local:.3f}", flush=True)

    rows = [[str(c.cases) + (" (below admission)" if c.cases < SMALLEST_ADMITTED else ""),
             f"{c.sites} x {c.federations}",
             str(c.features), f"{c.federated:.3f} ({c.federated_ci[0]:.3f} to {c.federated_ci[1]:.3f})",
             f"{c.local:.3f}", f"{c.gain:+.3f} ({c.gain_ci[0]:+.3f} to {c.gain_ci[1]:+.3f})",
             f"{c.pooled_auc_diff:.0e} / {c.pooled_coef_diff:.0e}"]
            for c in cells]
    print_columns(f"radfed: value of federation at an unseen hospital (leave-one-site-out AUC, mean over held-out "
                  f"sites, 95% CI; seeds {args.seed} to {args.seed + args.draws - 1}, work folder {work})",
                  ["cases/site", "sites x federations", "features", "federated", "local-only (own)", "gain",
                   "check: pooled - fed, AUC / coef"],
                  rows)
    png = work / f"value-of-federation-s{args.seed}-draws{args.draws}.png"
    plot(cells, png)
    print(f"\nPlot: {png}")
    if not args.no_check:
        check_with_federation(work, values, args.seed)
    print("\n" + summary(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
