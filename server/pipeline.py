"""Fitting one model on one cohort: everything that learns from data, in order.

(robustness filter, when on) -> ComBat (pooled estimates; each site fits its own location/scale) -> moments
(standardisation) -> selection (+ LASSO; without the features the robustness filter removed) -> training of every
family the run lists (``models``, common/families.py). The main
run, each leave-one-site-out fold and each local-only baseline call ``fit`` on their own cohort, so no statistic of
a site outside the cohort enters any step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from common import selection
from server import phases, training
from server.federation import Cohort, Run
from server.phases import Harmonization, PooledMoments
from server.robustness import RobustnessResult, robustness_phase

log = logging.getLogger("flwr.radfed.server")


@dataclass
class Fitted:
    """What fitting on a cohort produced: its ComBat estimates (None without ComBat), pooled moments,
    chosen features, the trained model of every family (``models``, in the run's ``models`` order), and (main run
    only) the harmonisation histograms. ``family`` is the model in use (the first listed, until the run's
    ``model-choice`` picks one); ``trained`` is its model."""

    harmonization: Harmonization | None
    pooled: PooledMoments
    chosen: selection.Selection
    models: dict[str, training.Trained]
    pos_weight: float
    histograms: dict[str, object] | None = None
    robustness: RobustnessResult | None = None
    family: str = ""

    def __post_init__(self) -> None:
        self.family = self.family or next(iter(self.models))

    @property
    def trained(self) -> training.Trained:
        return self.models[self.family]

    def config(self, family: str | None = None) -> dict[str, object]:
        """What a train/evaluate message about ``family``'s model (default: the one in use) carries."""
        return training.shared_config(self.chosen, self.pos_weight, family or self.family)


def fit(run: Run, cohort: Cohort, covariates: str = "", evaluate_rounds: bool = True,
        histograms: bool = False) -> Fitted:
    """Fit the run's model on ``cohort``. ``evaluate_rounds``: each site scores every round's model on its
    held-out split; ``histograms``: collect before/after-ComBat histograms of a few model features."""
    robust = robustness_phase(run, cohort) if run.config.robustness_min_icc > 0 else None
    harmonization = phases.harmonization_phase(run, cohort, covariates) if run.config.combat else None
    pooled = phases.moments_phase(run, cohort, harmonization.per_node if harmonization else None,
                                  harmonization.late_joiner if harmonization else None)
    # the class weight of the cohort's own training cases (a cross-validation fold's differ from the run's)
    n_hgg, n_bm = pooled.classwise[1][0], pooled.classwise[0][0]
    cohort = replace(cohort, agreement=replace(cohort.agreement, pos_weight=n_bm / max(n_hgg, 1)))
    chosen = phases.selection_phase(run, cohort, pooled, frozenset(robust.removed) if robust else frozenset())
    chosen = training.select_l1(run, cohort, pooled, chosen)
    drawn = None
    if histograms and harmonization is not None and chosen.names and not run.config.dp_query:  # withheld under DP
        drawn = phases.histograms_phase(run, cohort, pooled, chosen.names[:4])
    # every family on the same harmonised, standardised, selected features: the rows of the comparison differ
    # only in the model
    models = {family: training.train(run, cohort, pooled, chosen, evaluate_rounds, family)
              for family in run.config.families}
    return Fitted(harmonization, pooled, chosen, models, cohort.agreement.pos_weight, drawn, robust)
