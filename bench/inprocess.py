"""radfed's pipeline in one process, from the pure functions the federation itself calls (benchmarks only).

``fit(tables, run)`` computes what ``server.pipeline.fit`` computes on a cohort of sites with ``training =
"exact"``: d-ComBat (pooled estimates over the cohort, sites indexed by sorted name, each site its own
location/scale), pooled moments on the harmonised features, selection from aggregates (near-constant, Welch's t,
the pooled correlation of the top candidates from site cross-products, greedy decorrelation; as
``server.phases.selection_phase``), the class weight of the cohort's cases and the exact L2 logistic fit
standardised with the pooled mean and std. ``Fitted.predict`` is a site outside the cohort joining its ComBat
from all its cases (no labels, ``radfed site join``) and scoring the model, as a leave-one-site-out fold's
held-out site and a local-only model's other sites do.

Every case of each table trains: that is the federation with ``internal-validation = "cv"`` (its folds and
baselines train on every case; under "split" a site passes its training split only). Optional LASSO selection
(``select-l1``) and ComBat covariates are not mirrored here.

``pooled_centralised`` is the textbook counterpart on the concatenated data (scipy's Welch t, numpy's
correlation, scikit-learn's logistic regression) for checks: reading every site into one process, which a real
federation never does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from client.compute import combat_options, scores
from client.extract import FeatureTable
from common import combat, exact, metrics, moments, selection
from common.runconfig import RunConfig

Tables = Mapping[str, FeatureTable]


def agreed_features(tables: Tables) -> list[str]:
    """The features phase of a cohort: names finite at every case of every site, sorted."""
    finite = [{n for n, ok in zip(t.names, np.all(np.isfinite(t.values), axis=0), strict=True) if ok}
              for t in tables.values()]
    return sorted(set.intersection(*finite))


def max_features(n_cases: int, run: RunConfig) -> int:
    """The most features exact training allows a site with ``n_cases`` training cases: it needs more than
    exact-min-cases-per-coefficient x (features + 1) (``common.exact.check_dimensions``)."""
    return exact.max_features(n_cases, run.exact_min_cases_per_coefficient)


@dataclass
class Fitted:
    """A cohort's model: its agreed features, ComBat pooled estimates (None without ComBat), the chosen
    features, their pooled mean and std, the exact coefficients [b, w...] and the class weight."""

    agreed: list[str]
    pooled: combat.PooledEstimates | None
    names: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    pos_weight: float
    options: dict[str, bool]

    def predict(self, table: FeatureTable) -> np.ndarray:
        """P(HGG) (n,) at a site outside the cohort: it joins the cohort's ComBat from all its cases, then
        scores every case (client.compute.combat_join_fit, then client.compute.scores)."""
        x = table.columns(self.agreed)
        if self.pooled is not None:
            p = self.pooled
            joiner = combat.PooledEstimates.for_joiner(p.n_sites, p.n, p.grand_mean, p.var_pooled, p.beta_cov,
                                                       p.zero_variance.astype(np.float64))
            x = combat.fit_site(x, joiner, **self.options).apply(x)
        index = {n: i for i, n in enumerate(self.agreed)}
        return scores(x[:, [index[n] for n in self.names]], exact.to_state_dict(self.coef, self.mean, self.scale))

    def evaluate(self, table: FeatureTable) -> dict[str, float]:
        """What a scoring site sends: n, AUC and its DeLong variance."""
        y, prob = table.labels, self.predict(table)
        return {"n": float(len(y)), "auc": metrics.roc_auc(y, prob), "auc_var": metrics.delong_variance(y, prob)}


def _harmonise(xs: list[np.ndarray], run: RunConfig) -> tuple[list[np.ndarray], combat.PooledEstimates | None]:
    """d-ComBat rounds 1-2 over the cohort, then each site's own fit (server.harmonization.harmonization_phase)."""
    if not run.combat:
        return xs, None
    n_sites, options = len(xs), combat_options(run)
    means = combat.pool_moments([combat.site_moments(x, i, n_sites) for i, x in enumerate(xs)])
    pooled = combat.pool_residuals(means, [combat.site_residuals(x, means, i) for i, x in enumerate(xs)])
    return [combat.fit_site(x, pooled, site=i, **options).apply(x) for i, x in enumerate(xs)], pooled


def _select(xs: list[np.ndarray], ys: list[np.ndarray], mean: np.ndarray, std: np.ndarray,
            run: RunConfig) -> list[int]:
    """server.phases.selection_phase on the sites' aggregates: indices into the agreed features."""
    classwise = selection.pool_classwise([{c: moments.site_moments(x[y == c]) for c in (0, 1)}
                                          for x, y in zip(xs, ys, strict=True)])
    constant = selection.near_constant(std, mean)
    t = selection.welch_t(classwise[1], classwise[0])
    order = [int(i) for i in np.argsort(-np.abs(t), kind="stable") if not constant[i]]
    if run.select_features <= 0:
        return sorted(order)
    cand = order[: max(run.select_features, run.select_candidates)]
    cross = [selection.site_crossproducts(x[:, cand], mean[cand], std[cand]) for x in xs]
    corr = selection.pooled_correlation(cross, sum(len(y) for y in ys))
    kept = selection.greedy_decorrelate(range(len(cand)), corr, run.select_max_correlation, run.select_features)
    return [cand[i] for i in kept]


def fit(tables: Tables, run: RunConfig) -> Fitted:
    """The federation's fit on the cohort ``tables`` (site -> its cases), every case training."""
    if run.select_l1 > 0 or run.combat_covariates or run.model_covariates:
        raise ValueError("the in-process pipeline mirrors neither select-l1 nor ComBat or model covariates")
    sites = sorted(tables)
    agreed = agreed_features(tables)
    ys = [tables[s].labels for s in sites]
    xs, pooled = _harmonise([tables[s].columns(agreed) for s in sites], run)
    mean, std = moments.pooled_mean_std(*zip(*(moments.site_moments(x) for x in xs), strict=True))
    y = np.concatenate(ys)
    pos_weight = float(np.sum(y == 0) / max(int(np.sum(y == 1)), 1))
    cols = _select(xs, ys, mean, std, run)
    fitted = exact.fit_exact([((x[:, cols] - mean[cols]) / std[cols], yy) for x, yy in zip(xs, ys, strict=True)],
                             pos_weight, run.exact_l2, run.exact_l1, run.exact_tol, run.exact_max_rounds,
                             run.exact_min_cases_per_coefficient)
    return Fitted(agreed, pooled, [agreed[i] for i in cols], mean[cols], std[cols], fitted.coef, pos_weight,
                  combat_options(run))


def leave_one_site_out(tables: Tables, run: RunConfig) -> dict[str, dict[str, float]]:
    """Per held-out site h: the model fitted on every other site, scored on all of h's cases."""
    return {h: fit({s: t for s, t in tables.items() if s != h}, run).evaluate(tables[h]) for h in sorted(tables)}


def local_only(tables: Tables, run: RunConfig) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Per site s: its own pipeline alone (its own ComBat, standardisation, selection, model), scored at every
    other site; shaped as metrics.json's ``validation.local_only`` ({s: {"external": {h: record}}})."""
    out = {}
    for s in sorted(tables):
        alone = fit({s: tables[s]}, run)
        out[s] = {"external": {h: alone.evaluate(t) for h, t in sorted(tables.items()) if h != s}}
    return out


def pooled_centralised(tables: Tables, run: RunConfig) -> Fitted:
    """The same model from textbook tools on the concatenated harmonised data: scipy's Welch t, numpy's
    correlation, scikit-learn's LogisticRegression(C = 1 / exact-l2, class_weight = {0: 1, 1: pos_weight}).
    ComBat is the shared d-ComBat (itself checked against neuroCombat on pooled data in tests/test_combat.py)."""
    from scipy import stats
    from sklearn.linear_model import LogisticRegression

    if run.exact_l1 > 0 or run.select_features <= 0:
        raise ValueError("the centralised check covers L2 training with a feature budget only")
    sites = sorted(tables)
    agreed = agreed_features(tables)
    xs, pooled = _harmonise([tables[s].columns(agreed) for s in sites], run)
    x, y = np.vstack(xs), np.concatenate([tables[s].labels for s in sites])
    mean, std = x.mean(axis=0), x.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.nan_to_num(stats.ttest_ind(x[y == 1], x[y == 0], equal_var=False).statistic)
    order = [int(i) for i in np.argsort(-np.abs(t), kind="stable") if std[i] > 1e-9 * max(1.0, abs(mean[i]))]
    cand = order[: max(run.select_features, run.select_candidates)]
    corr = np.corrcoef(x[:, cand], rowvar=False)
    kept: list[int] = []
    for i in range(len(cand)):
        if len(kept) < run.select_features and all(abs(corr[i, j]) <= run.select_max_correlation for j in kept):
            kept.append(i)
    cols = [cand[i] for i in kept]
    pos_weight = float(np.sum(y == 0) / np.sum(y == 1))
    model = LogisticRegression(C=1.0 / run.exact_l2, class_weight={0: 1.0, 1: pos_weight}, solver="newton-cholesky",
                               tol=1e-12, max_iter=1000)
    model.fit((x[:, cols] - mean[cols]) / std[cols], y)
    coef = np.concatenate([model.intercept_, model.coef_.ravel()])
    return Fitted(agreed, pooled, [agreed[i] for i in cols], mean[cols], std[cols], coef, pos_weight,
                  combat_options(run))
