"""Federated gradient-boosted trees (models = "gbt") vs xgboost pooled vs exact logistic, at an unseen hospital.

    python bench/bench_trees.py [--demo DIR] [--rounds 20] [--depth 3] [--bins 16] [--eta 0.3] [--k 5]

The demo hospitals (``radfed demo`` writes them to ~/.radfed/demo; their cached pyradiomics features are read,
nothing is written). Leave-one-site-out: each hospital in turn is unseen; the others run radfed's pipeline in one
process from the federation's own functions (bench/inprocess.py: d-ComBat, pooled moments, selection from
aggregates, every case training), then each model is scored on every case of the unseen hospital after it joins
the fold's ComBat. Models on the same harmonised, selected features:

- federated trees: common/trees.py on each site's release blocks (k to 2k - 1 cases of one class, cut in a keyed
  order as client.ledger cuts them), routed whole by their mean z, histograms summed over sites per tree level;
- the same trees, pooled: one process, the same bins and block routing (must equal the federated ones);
- per-case trees, pooled: the same code with every case its own row (what block routing costs; not federable);
- xgboost pooled: ``XGBClassifier`` (hist, the same rounds, depth, eta, lambda, max_bin = bins) on the pooled
  cases' z, reading every site into one process, which a federation never does;
- exact logistic (training = "exact"), the house reference.

Round trips: federation rounds after selection; messages = round trips x sites in the fold.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import inprocess  # noqa: E402
from bench.bench_value import feature_table  # noqa: E402
from bench.table import print_columns  # noqa: E402
from client.compute import combat_options  # noqa: E402
from common import combat, exact, metrics, release, trees  # noqa: E402
from common.runconfig import parse  # noqa: E402
from radfed.launch import app_run_config  # noqa: E402


def blocks_of(case_ids: list[str], labels: np.ndarray, k: int, secret: bytes) -> np.ndarray:
    """(n,) release block of each case: per class, the keyed order cut into blocks of k to 2k - 1 (leftovers of
    fewer than k cases sit out: block "")."""
    out = np.array([""] * len(case_ids), dtype=object)
    for label in (1, 0):
        ids = [c for c, y in zip(case_ids, labels, strict=True) if int(y) == label]
        for members in release.make_blocks(release.keyed_order(secret, ids, "blocks"), k):
            out[np.isin(case_ids, members)] = release.block_id(secret, members)
    return out


def harmonised(tables, fitted: inprocess.Fitted, run) -> dict[str, np.ndarray]:
    """Each cohort site's harmonised features over the chosen ones (its own ComBat fit, as the sites do)."""
    sites = sorted(tables)
    index = {n: i for i, n in enumerate(fitted.agreed)}
    cols = [index[n] for n in fitted.names]
    out = {}
    for i, s in enumerate(sites):
        x = tables[s].columns(fitted.agreed)
        if fitted.pooled is not None:
            x = combat.fit_site(x, fitted.pooled, site=i, **combat_options(run)).apply(x)
        out[s] = x[:, cols]
    return out


def unseen(table, fitted: inprocess.Fitted) -> np.ndarray:
    """The unseen hospital's features after joining the fold's ComBat (as ``Fitted.predict`` does)."""
    x = table.columns(fitted.agreed)
    if fitted.pooled is not None:
        p = fitted.pooled
        joiner = combat.PooledEstimates.for_joiner(p.n_sites, p.n, p.grand_mean, p.var_pooled, p.beta_cov,
                                                   p.zero_variance.astype(np.float64))
        x = combat.fit_site(x, joiner, **fitted.options).apply(x)
    index = {n: i for i, n in enumerate(fitted.agreed)}
    return x[:, [index[n] for n in fitted.names]]


def ledger_cost(x: np.ndarray, y: np.ndarray, case_ids: list[str], units: np.ndarray, params: trees.TreeParams,
                mean: np.ndarray, scale: np.ndarray, k: int) -> list[list[str]]:
    """One site growing the trees alone through its real site function and release ledger (a temporary one):
    replies, distinct case sets the ledger holds after, seconds of check + record, ledger.json size."""
    import tempfile

    from client.ledger import Ledger
    from client.trees import site_reply

    grower = trees.TreeGrower(params, mean, scale)
    seconds, replies, declared = 0.0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp), k)
        while not grower.done:
            level, open_nodes = grower.request()
            sent, sets = site_reply(x, y, case_ids, units, {**grower.arrays, "open": open_nodes}, level, params)
            started = time.perf_counter()
            why = ledger.check(sets)
            if why:
                raise RuntimeError(why)
            ledger.record(1, "query.trees", sets, None)
            seconds += time.perf_counter() - started
            replies, declared = replies + 1, declared + len(sets)
            grower.update(sent["grad"], sent["hess"], sent["count"])
        held = len(ledger.load()["sets"])
        size = (Path(tmp) / "ledger.json").stat().st_size
    per_reply = 1000 * seconds / max(replies, 1)
    return [["training cases / routing units", f"{len(y)} / {len(set(units))}"],
            ["replies (tree levels)", str(replies)],
            ["case sets declared / distinct in the ledger after", f"{declared} / {held}"],
            ["ledger check + record, total / per reply", f"{seconds:.2f} s / {per_reply:.0f} ms"],
            ["ledger.json size", f"{size / 1024:.0f} KiB"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("~/.radfed/demo").expanduser())
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--bins", type=int, default=16)
    parser.add_argument("--eta", type=float, default=0.3)
    parser.add_argument("--l2", type=float, default=1.0)
    parser.add_argument("--min-child-cases", type=int, default=10)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    from xgboost import XGBClassifier

    dirs = sorted(p for p in args.demo.iterdir() if (p / "manifest.csv").exists())
    if len(dirs) < 3:
        print(f"{args.demo} holds {len(dirs)} hospitals; run 'radfed demo' first (it needs 3 or more)")
        return 2
    tables = {d.name: feature_table(d) for d in dirs}
    run = parse(app_run_config({"training": "exact"}))
    least = min(len(t.labels) for t in tables.values())
    run = run.model_copy(update={"select_features": min(run.select_features, inprocess.max_features(least, run))})
    params = trees.TreeParams(rounds=args.rounds, depth=args.depth, bins=args.bins, learning_rate=args.eta,
                              l2=args.l2, min_child_cases=args.min_child_cases, min_child_hessian=1.0)
    secret = b"bench-trees"
    names = ["federated trees (blocks)", "pooled trees (blocks)", "pooled trees (per case)", "xgboost pooled",
             "exact logistic"]
    auc: dict[str, dict[str, float]] = {n: {} for n in names}
    cost: dict[str, list[float]] = {n: [0.0, 0.0, 0.0] for n in names}  # round trips, messages, seconds
    check = {"splits_equal": True, "leaf_diff": 0.0}
    for held in sorted(tables):
        cohort = {s: t for s, t in tables.items() if s != held}
        fitted = inprocess.fit(cohort, run)
        xs = harmonised(cohort, fitted, run)
        x_test, y_test = unseen(tables[held], fitted), tables[held].labels
        mean, scale = fitted.mean, fitted.scale
        rows, cases = [], []
        for s in sorted(cohort):
            b = blocks_of(list(cohort[s].case_ids), cohort[s].labels, args.k, secret)
            keep = b != ""
            z = trees.standardise(xs[s][keep], mean, scale)
            zb, yb, wb = trees.block_rows(z, cohort[s].labels[keep], b[keep])
            rows.append((trees.bin_of(zb, trees.z_edges(params.bins)), yb, wb))
            cases.append((z, cohort[s].labels[keep]))
        started = time.perf_counter()
        fed, trips = trees.fit_rows(rows, params, mean, scale)
        cost[names[0]] = [cost[names[0]][0] + trips, cost[names[0]][1] + trips * len(cohort),
                          cost[names[0]][2] + time.perf_counter() - started]
        auc[names[0]][held] = metrics.roc_auc(y_test, trees.predict_proba(fed, x_test))
        pooled_rows = [tuple(np.concatenate(p) for p in zip(*rows, strict=True))]
        started = time.perf_counter()
        pooled, _ = trees.fit_rows(pooled_rows, params, mean, scale)
        cost[names[1]][2] += time.perf_counter() - started
        check["splits_equal"] &= bool(np.array_equal(pooled["feature"], fed["feature"])
                                      and np.array_equal(pooled["split"], fed["split"]))
        check["leaf_diff"] = max(check["leaf_diff"], float(np.max(np.abs(pooled["leaf"] - fed["leaf"]))))
        auc[names[1]][held] = metrics.roc_auc(y_test, trees.predict_proba(pooled, x_test))
        z_all, y_all = np.vstack([c[0] for c in cases]), np.concatenate([c[1] for c in cases])
        started = time.perf_counter()
        per_case, _ = trees.fit_rows([(trees.bin_of(z_all, trees.z_edges(params.bins)), y_all, np.ones(len(y_all)))],
                                     params, mean, scale)
        cost[names[2]][2] += time.perf_counter() - started
        auc[names[2]][held] = metrics.roc_auc(y_test, trees.predict_proba(per_case, x_test))
        started = time.perf_counter()
        xgb = XGBClassifier(n_estimators=params.rounds, max_depth=params.depth, learning_rate=params.learning_rate,
                            reg_lambda=params.l2,
                            min_child_weight=1.0, tree_method="hist", max_bin=params.bins, base_score=0.5,
                            n_jobs=1, random_state=0)
        xgb.fit(z_all, y_all)
        cost[names[3]][2] += time.perf_counter() - started
        auc[names[3]][held] = metrics.roc_auc(y_test, xgb.predict_proba(trees.standardise(x_test, mean, scale))[:, 1])
        z_sites = [(trees.standardise(xs[s], mean, scale), cohort[s].labels) for s in sorted(cohort)]
        started = time.perf_counter()
        logistic = exact.fit_exact(z_sites, fitted.pos_weight, run.exact_l2, 0.0, run.exact_tol, run.exact_max_rounds,
                                   run.exact_min_cases_per_coefficient)
        cost[names[4]] = [cost[names[4]][0] + logistic.rounds, cost[names[4]][1] + logistic.rounds * len(cohort),
                          cost[names[4]][2] + time.perf_counter() - started]
        auc[names[4]][held] = inprocess.Fitted(fitted.agreed, fitted.pooled, fitted.names, mean, scale,
                                               logistic.coef, fitted.pos_weight, fitted.options
                                               ).evaluate(tables[held])["auc"]
    sites = sorted(tables)
    table = []
    for n in names:
        per = " / ".join(f"{auc[n][s]:.3f}" for s in sites)
        rounds, messages, seconds = cost[n]
        trips = f"{rounds / len(sites):.0f}" if rounds else "-"
        sent = f"{messages / len(sites):.0f}" if messages else "-"
        table.append([n, f"{np.mean(list(auc[n].values())):.3f}", per, trips, sent, f"{seconds / len(sites):.3f}"])
    print_columns(f"AUC at the unseen hospital ({len(sites)} demo hospitals, leave-one-site-out, "
                  f"{len(fitted.names)} features; trees: {params.rounds} rounds, depth {params.depth}, "
                  f"{params.bins} bins, eta {params.learning_rate}, lambda {params.l2}, blocks of k = {args.k})",
                  ["model", "AUC mean", "AUC " + " / ".join(s.rsplit("-", 1)[-1] for s in sites),
                   "round trips per fit", "messages per fit", "seconds per fit"], table)
    print(f"\nfederated == pooled (blocks): splits equal {check['splits_equal']}, "
          f"max |leaf difference| {check['leaf_diff']:.1e}")
    site = sorted(cohort)[0]  # the last fold's first site, alone, through its real site function and a fresh ledger
    keep = blocks_of(list(cohort[site].case_ids), cohort[site].labels, args.k, secret) != ""
    units = blocks_of(list(cohort[site].case_ids), cohort[site].labels, args.k, secret)[keep]
    print_columns(f"Release ledger cost at one site ({site}) growing the same trees alone", ["measure", "value"],
                  ledger_cost(xs[site][keep], cohort[site].labels[keep],
                              [str(c) for c in np.array(cohort[site].case_ids, dtype=object)[keep]], units, params,
                              mean, scale, args.k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
