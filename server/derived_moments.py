"""A leave-one-site-out fold's moments and selection correlation, worked out from what its sites sent for the main
run: no query.

Without ComBat covariates a fold pools its sites' main-run ComBat sums again (``harmonization.harmonization_phase``
``reuse``): each site's count, feature means and residual sum of squares over its training split, the same
cases in every fold. With parametric ComBat a site's own location/scale against any cohort's pooled estimates is
a function of exactly those sums (common.combat_moments), and harmonising is an affine map per feature: the
moments a site would send for a fold are its moments before ComBat, overall (from the sums) and per class (which
the main run's moments query asked for, ``raw-classes``), mapped through its location/scale for the fold. The
coordinator works them out instead of asking each site for every fold it is in (47 x 48 requests at 48 sites: the
folds' largest share of the sites' CPU, and their largest messages); each site still fits and keeps its own ComBat
for the fold from its data, with the fold's next query (``query.combat_keep``), for the fold's later queries.

The fold's selection correlation follows the same way: what a site sends for a correlation query is Σ z zᵀ over
its training cases, z = (a·x + b − mean)/std per candidate, (a, b) its ComBat's affine map and mean, std the pooled
ones, so it is a function of its count, raw means (the sums) and centred cross-products before ComBat, which the
main run's correlation query asked for (``raw-crossproducts``) for the main run's candidates. A fold's greedy walk
reads the correlations among the candidates it examines only; when those are all among the main run's, the walk
runs on the worked-out correlation and the sites are not asked (else the fold asks, as before).

The coordinator learns nothing new of a site: its per-class moments and cross-products before ComBat are its
harmonised ones (which it sends in the main run) mapped back through its main-run location/scale, which the sums
give too. A fold reads only its own sites' numbers (never the main run's pooled estimates, which saw the held-out
site; hence the numbers before ComBat), so its model stays bit-identical whatever the held-out site holds.
Not used where the moments do not follow: ComBat covariates (a site's harmonisation then depends on
each case's covariates), non-parametric ComBat (its prior reads every case), noised query phases, clinical model
inputs (not harmonised, not in the sums), a site the main run did not hear from.
"""

from __future__ import annotations

import numpy as np

from common import combat, combat_moments, selection
from server.federation import Cohort, Run
from server.harmonization import Harmonization
from server.phases import PooledMoments, SiteMoments, model_inputs


def wanted(run: Run, cohort: Cohort) -> bool:
    """Whether the run's folds can work their moments out (the main run then asks for the per-class moments before
    ComBat with its moments query)."""
    config = run.config
    return config.loso_derived_moments and config.external_validation == "loso" and config.combat \
        and config.combat_parametric and not config.combat_covariates.strip() and not config.dp_query \
        and model_inputs(run, cohort.agreement) == cohort.agreement.names


def _fit(run: Run, sums: tuple[int, np.ndarray, np.ndarray, np.ndarray],
         pooled: combat.PooledEstimates) -> tuple[int, np.ndarray, combat_moments.SiteFit]:
    """A site's count, raw feature means (d,) and its ComBat against ``pooled``, from its ComBat sums."""
    n, _, xty, ss = sums
    mean = xty[0] / n  # the site's column of XᵀY: its feature sums
    return n, mean, combat_moments.fit_from_sums(n, mean, ss, pooled.grand_mean, pooled.var_pooled,
                                                 pooled.zero_variance, eb=run.config.combat_eb,
                                                 mean_only=run.config.combat_mean_only)


class FoldDerivation:
    """A fold's moments (``moments(site)``) and selection correlation (``correlation``) worked out from the main
    run's; each site's ComBat for the fold is fitted once and shared by both."""

    def __init__(self, run: Run, cohort: Cohort, fold: combat.PooledEstimates, main_harmonization: Harmonization,
                 main_moments: PooledMoments, raw: selection.RawCrossproducts | None) -> None:
        self.sites, self.pooled = sorted(cohort.fed.sites.values()), fold
        self._run, self._sums, self._raw_classwise = run, main_harmonization.sums, main_moments.raw_classwise
        self.raw = raw  # the main run's cross-products before ComBat (server.fold_prefetch sets them later)
        self._index = {name: i for i, name in enumerate(cohort.agreement.names)}
        self._fits: dict[str, tuple[int, np.ndarray, combat_moments.SiteFit]] = {}
        self._moments: dict[str, SiteMoments] = {}

    def _fit(self, site: str) -> tuple[int, np.ndarray, combat_moments.SiteFit]:
        if site not in self._fits:
            self._fits[site] = _fit(self._run, self._sums[site], self.pooled)
        return self._fits[site]

    def moments(self, site: str) -> SiteMoments:
        """What ``site`` would send for the fold's moments query (worked out once)."""
        if site not in self._moments:
            n, mean, fit = self._fit(site)
            _, _, ss = self._sums[site][1:]
            classes = {label: (n_c, *combat_moments.harmonise(fit, mean_c, m2_c))
                       for label, (n_c, mean_c, m2_c) in self._raw_classwise[site].items()}
            self._moments[site] = (n, *combat_moments.harmonise(fit, mean, ss)), classes  # type: ignore[assignment]
        return self._moments[site]

    def correlation(self, names: list[str], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """The fold's pooled correlation (p, p) of ``names[:p]``, the longest prefix of the candidates ``names``
        (pooled mean and std (m,)) whose cross-products every site sent for the main run; p = 0 without them."""
        raw = self.raw
        if raw is None or any(site not in raw.sites or raw.sites[site][0] != self._sums[site][0]
                              for site in self.sites):  # a site the main run's correlation did not hear from
            return np.zeros((0, 0))
        at = {name: i for i, name in enumerate(raw.names)}
        p = next((i for i, name in enumerate(names) if name not in at), len(names))
        if p == 0:
            return np.zeros((0, 0))
        rows, cols = [at[name] for name in names[:p]], [self._index[name] for name in names[:p]]
        cross, total = [], 0
        for site in self.sites:  # in site-name order, as the moments
            n, centred = raw.sites[site]
            _, raw_mean, fit = self._fit(site)
            a, b = combat_moments.affine(fit)
            cross.append(combat_moments.crossproducts(centred[np.ix_(rows, rows)], n, raw_mean[cols], a[cols],
                                                      b[cols], mean[:p], std[:p]))
            total += n
        return selection.pooled_correlation(cross, total)


def derivation(run: Run, cohort: Cohort, fold: Harmonization | None, main_harmonization: Harmonization | None,
               main_moments: PooledMoments | None, raw: selection.RawCrossproducts | None = None,
               ahead: FoldDerivation | None = None) -> FoldDerivation | None:
    """The fold's moments and correlation from the main run's, when they follow from them, else None. ``ahead``: the
    same worked out already (server.fold_prefetch), used when it is for the fold's very pooled estimates and sites."""
    if not wanted(run, cohort) or fold is None or not fold.reused or fold.pooled is None \
            or main_harmonization is None or main_moments is None:
        return None
    if any(s not in main_moments.raw_classwise or s not in main_harmonization.sums for s in cohort.fed.sites.values()):
        return None
    if ahead is not None and ahead.pooled is fold.pooled and ahead.sites == sorted(cohort.fed.sites.values()):
        ahead.raw = raw
        return ahead
    return FoldDerivation(run, cohort, fold.pooled, main_harmonization, main_moments, raw)
