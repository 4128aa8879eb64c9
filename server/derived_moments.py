"""A leave-one-site-out fold's moments, worked out from what its sites sent for the main run: no query.

Without ComBat covariates a fold pools its sites' main-run ComBat sums again (``phases.harmonization_phase``
``reuse``): each site's count, feature means and residual sum of squares over its training split, the same
cases in every fold. With parametric ComBat a site's own location/scale against any cohort's pooled estimates is
a function of exactly those sums (common.combat_moments), and harmonising is an affine map per feature: the
moments a site would send for a fold are its moments before ComBat, overall (from the sums) and per class (which
the main run's moments query asked for, ``raw-classes``), mapped through its location/scale for the fold. The
coordinator works them out instead of asking each site for every fold it is in (47 x 48 requests at 48 sites: the
folds' largest share of the sites' CPU, and their largest messages); each site still fits and keeps its own ComBat
for the fold from its data, with the fold's next query (``query.combat_keep``), for the fold's later queries.

Nothing new leaves a site: its per-class moments before ComBat are the main run's per-class moments mapped back
through its main-run location/scale, which the sums give too. A fold reads only its own sites' numbers (never the
main run's pooled estimates, which saw the held-out site), so its model stays bit-identical whatever the held-out
site holds. Not used where the moments do not follow: ComBat covariates (a site's harmonisation then depends on
each case's covariates), non-parametric ComBat (its prior reads every case), noised query phases, clinical model
inputs (not harmonised, not in the sums), a site the main run did not hear from.
"""

from __future__ import annotations

from collections.abc import Callable

from common import combat_moments
from server.federation import Cohort, Run
from server.phases import Harmonization, PooledMoments, SiteMoments, model_inputs


def wanted(run: Run, cohort: Cohort) -> bool:
    """Whether the run's folds can work their moments out (the main run then asks for the per-class moments before
    ComBat with its moments query)."""
    config = run.config
    return config.loso_derived_moments and config.external_validation == "loso" and config.combat \
        and config.combat_parametric and not config.combat_covariates.strip() and not config.dp_query \
        and model_inputs(run, cohort.agreement) == cohort.agreement.names


def derivation(run: Run, cohort: Cohort, fold: Harmonization | None, main_harmonization: Harmonization | None,
               main_moments: PooledMoments | None) -> Callable[[str], SiteMoments] | None:
    """``site -> its moments under the fold's ComBat`` when they follow from the main run's, else None."""
    if not wanted(run, cohort) or fold is None or not fold.reused or fold.pooled is None \
            or main_harmonization is None or main_moments is None:
        return None
    if any(s not in main_moments.raw_classwise or s not in main_harmonization.sums for s in cohort.fed.sites.values()):
        return None
    pooled = fold.pooled
    options = {"eb": run.config.combat_eb, "mean_only": run.config.combat_mean_only}

    def derived(site: str) -> SiteMoments:
        n, _, xty, ss = main_harmonization.sums[site]
        mean = xty[0] / n  # the site's column of XᵀY: its feature sums
        fit = combat_moments.fit_from_sums(n, mean, ss, pooled.grand_mean, pooled.var_pooled, pooled.zero_variance,
                                           **options)
        classes = {label: (n_c, *combat_moments.harmonise(fit, mean_c, m2_c))
                   for label, (n_c, mean_c, m2_c) in main_moments.raw_classwise[site].items()}
        return (n, *combat_moments.harmonise(fit, mean, ss)), classes  # type: ignore[return-value]

    return derived
