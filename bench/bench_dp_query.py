"""What differential privacy on the query phases costs: AUC at an unseen hospital vs the noise multiplier.

    python bench/bench_dp_query.py [--demo DIR] [--z 0,0.5,1,2,4,8] [--draws 5] [--rounds 5] [--clip 3]

The demo hospitals (``radfed demo`` writes them to ~/.radfed/demo; their cached features are read, nothing is
written). Leave-one-site-out: each hospital in turn is the unseen one; the others fit radfed's pipeline with
training = "exact" (as bench/inprocess.py, from the federation's own pure functions) with the query phases
noised as the sites noise them (common/dp_query.py): d-ComBat (not noised), noised per-class moments in the units
of ComBat's pooled estimates, selection from them with a noised correlation, then ``--rounds`` Newton rounds on
noised gradients and Hessians (the server's Hessian made PSD, no loss safeguard). The unseen hospital joins the
fold's ComBat and scores every case. z = 0 is the exact pipeline. AUC: mean over unseen hospitals and noise
draws (sd over draws of that mean); "Newton noised only": the same with exact moments and correlation (a
diagnosis of where the accuracy goes, not a setting radfed offers). epsilon: what one such fit costs each site,
at dp-delta = 1e-5, for one case added or removed (moments + correlation + rounds x Newton), and for one case
changed; a run with leave-one-site-out folds spends it once per fold a site trains in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import inprocess  # noqa: E402
from bench.bench_value import feature_table  # noqa: E402
from bench.table import print_columns  # noqa: E402
from client.compute import combat_options  # noqa: E402
from common import combat, dp_query, exact, protocol, selection  # noqa: E402
from common.dp import zcdp_to_epsilon  # noqa: E402
from common.runconfig import RunConfig, parse  # noqa: E402
from radfed.launch import app_run_config  # noqa: E402


def fit_noised(tables: inprocess.Tables, run: RunConfig, rng: np.random.Generator,
               newton_only: bool = False) -> inprocess.Fitted:
    """server.pipeline.fit on the cohort ``tables`` with the query phases noised (every case trains);
    ``newton_only``: moments and correlation exact (noise-free selection, for the diagnosis column)."""
    z, c = run.dp_query_noise_multiplier, run.dp_query_clip
    if newton_only:
        exact_fit = inprocess.fit(tables, run)
        cols = [exact_fit.agreed.index(n) for n in exact_fit.names]
        return _newton(tables, run, rng, exact_fit.agreed, exact_fit.pooled, cols, exact_fit.mean, exact_fit.scale,
                       exact_fit.pos_weight)
    sites = sorted(tables)
    agreed = inprocess.agreed_features(tables)
    ys = [tables[s].labels for s in sites]
    raw = [tables[s].columns(agreed) for s in sites]
    means = combat.pool_moments([combat.site_moments(x, i, len(raw)) for i, x in enumerate(raw)])
    pooled = combat.pool_residuals(means, [combat.site_residuals(x, means, i) for i, x in enumerate(raw)])
    xs = [combat.fit_site(x, pooled, site=i, **combat_options(run)).apply(x) for i, x in enumerate(raw)]
    loc, scale = dp_query.reference(pooled.grand_mean, pooled.var_pooled)
    sent = [{**a, **m} for a, m in (dp_query.private_moments(dp_query.clip_standardised(x, loc, scale, c), y, z, c, rng)
                                    for x, y in zip(xs, ys, strict=True))]
    noised = dp_query.pool_noised_moments(sent, loc, scale, pooled.zero_variance, run.min_cases_per_class * len(xs))
    pos_weight = noised.classwise[0][0] / max(noised.classwise[1][0], 1)
    constant = selection.near_constant(noised.std, noised.mean)
    t = selection.welch_t(noised.classwise[1], noised.classwise[0])
    order = [int(i) for i in np.argsort(-np.abs(t), kind="stable") if not constant[i]]
    cand = order[: max(run.select_features, run.select_candidates)]
    cross = [dp_query.private_crossproducts(dp_query.clip_standardised(x[:, cand], noised.mean[cand],
                                                                      noised.std[cand], c), z, c, rng) for x in xs]
    corr = dp_query.noised_correlation(cross, noised.n)
    cols = [cand[i] for i in selection.greedy_decorrelate(range(len(cand)), corr, run.select_max_correlation,
                                                          run.select_features)]
    return _newton(tables, run, rng, agreed, pooled, cols, noised.mean[cols], noised.std[cols], pos_weight)


def _newton(tables: inprocess.Tables, run: RunConfig, rng: np.random.Generator, agreed: list[str],
            pooled: combat.PooledEstimates | None, cols: list[int], mean: np.ndarray, std: np.ndarray,
            pos_weight: float) -> inprocess.Fitted:
    """``exact-max-rounds`` Newton rounds on noised site terms over the harmonised, clipped features."""
    z, c = run.dp_query_noise_multiplier, run.dp_query_clip
    assert pooled is not None
    sites = sorted(tables)
    ys = [tables[s].labels for s in sites]
    raw = [tables[s].columns(agreed) for s in sites]
    xs = [combat.fit_site(x, pooled, site=i, **combat_options(run)).apply(x) for i, x in enumerate(raw)]
    newton = exact.ExactNewton(len(cols), run.exact_l2, run.exact_l1, run.exact_tol, run.exact_max_rounds,
                               safeguard=False)
    while not newton.done:
        terms = []
        for x, y in zip(xs, ys, strict=True):
            full = exact.site_terms(dp_query.clip_standardised(x[:, cols], mean, std, c), y, newton.coef, pos_weight)
            grad, hess = dp_query.private_newton(full.grad, full.hess, len(cols), pos_weight, z, c, rng)
            terms.append(exact.SiteTerms(grad, hess, 0.0, 0, 0, 0))
        total = exact.sum_terms(terms)
        newton.update(exact.SiteTerms(total.grad, dp_query.psd(total.hess), 0.0, 0, 0, 0))
    return inprocess.Fitted(agreed, pooled, [agreed[i] for i in cols], mean, std, newton.coef, pos_weight,
                            combat_options(run))


def epsilon(z: float, rounds: int, changed: bool = False) -> float:
    rho = sum(dp_query.rho_per_release(t, z, changed) * n
              for t, n in ((protocol.MOMENTS, 1), (protocol.CORRELATION, 1), (protocol.NEWTON, rounds)))
    return zcdp_to_epsilon(rho, 1e-5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("~/.radfed/demo").expanduser())
    parser.add_argument("--z", default="0,0.5,1,2,4,8", help="noise multipliers (0: exact)")
    parser.add_argument("--draws", type=int, default=5, help="noise draws per multiplier")
    parser.add_argument("--rounds", type=int, default=5, help="Newton rounds under noise (exact-max-rounds)")
    parser.add_argument("--clip", type=float, default=3.0, help="dp-query-clip")
    args = parser.parse_args()
    dirs = sorted(p for p in args.demo.iterdir() if (p / "manifest.csv").exists())
    if len(dirs) < 3:
        print(f"{args.demo} holds {len(dirs)} hospitals; run 'radfed demo' first (it needs 3 or more)")
        return 2
    tables = {d.name: feature_table(d) for d in dirs}
    base = parse(app_run_config({"training": "exact", "exact-max-rounds": args.rounds, "dp-query-clip": args.clip}))
    least = min(len(t.labels) for t in tables.values())
    base = base.model_copy(update={"select_features": min(base.select_features, inprocess.max_features(least, base))})
    rows = []
    for z in [float(v) for v in args.z.split(",")]:
        run = base.model_copy(update={"dp_query_noise_multiplier": z})
        aucs, newton_aucs = [], []
        for draw in range(args.draws if z > 0 else 1):
            rng = np.random.default_rng(draw)
            per_site, newton_only = [], []
            for h in sorted(tables):
                others = {s: t for s, t in tables.items() if s != h}
                model = fit_noised(others, run, rng) if z > 0 else inprocess.fit(others, base)
                per_site.append(model.evaluate(tables[h])["auc"])
                if z > 0:
                    newton_only.append(fit_noised(others, run, rng, newton_only=True).evaluate(tables[h])["auc"])
            aucs.append(float(np.mean(per_site)))
            newton_aucs.append(float(np.mean(newton_only)) if newton_only else aucs[-1])
        rows.append([f"{z:g}" if z else "0 (exact)", f"{np.mean(aucs):.3f}", f"{np.std(aucs):.3f}" if z else "-",
                     f"{np.mean(newton_aucs):.3f}",
                     f"{epsilon(z, args.rounds):.3g}" if z else "-",
                     f"{epsilon(z, args.rounds, changed=True):.3g}" if z else "-"])
    print_columns(f"AUC at the unseen hospital vs dp-query-noise-multiplier ({len(tables)} demo hospitals, "
                  f"{base.select_features} features, clip {args.clip}, {args.rounds} Newton rounds, "
                  f"{args.draws} noise draws)",
                  ["z", "AUC (mean)", "sd over draws", "AUC, Newton noised only",
                   "epsilon per fit (case added/removed)", "epsilon (case changed)"],
                  rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
