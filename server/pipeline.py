"""Fitting one model on one cohort: everything that learns from data, in order.

(robustness filter, when on) -> ComBat (pooled estimates; each site fits its own location/scale) -> moments
(standardisation) -> selection (+ LASSO; without the features the robustness filter removed) -> training of every
family the run lists (``models``, common/families.py). The main
run, each leave-one-site-out fold and each local-only baseline call ``fit`` on their own cohort, so no statistic of
a site outside the cohort enters any step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from common import families, selection
from common.covariates import is_clinical
from server import derived_moments, fold_prefetch, phases, training
from server.federation import Cohort, Run
from server.harmonization import Harmonization, harmonization_phase, keep_phase
from server.phases import PooledMoments
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
    inputs: dict[str, selection.Selection] = field(default_factory=dict)  # a variant's own inputs (default: chosen)
    # the main run's: its leave-one-site-out folds' first steps, worked out while it waits (server.fold_prefetch)
    prefetch: fold_prefetch.FoldPrefetch | None = None

    def __post_init__(self) -> None:
        self.family = self.family or next(iter(self.models))

    @property
    def trained(self) -> training.Trained:
        return self.models[self.family]

    def config(self, family: str | None = None) -> dict[str, object]:
        """What a train/evaluate message about ``family``'s model (default: the one in use) carries."""
        name = family or self.family
        return training.shared_config(self.inputs.get(name, self.chosen), self.pos_weight, name)

    def warm_starts(self) -> dict[str, training.WarmStart]:
        """Every exactly fitted model as a Newton start for another cohort (a leave-one-site-out fold)."""
        starts = {name: training.WarmStart.of(trained, self.inputs.get(name, self.chosen).names)
                  for name, trained in self.models.items()}
        return {name: start for name, start in starts.items() if start is not None}

    def compared_arrays(self, name: str) -> dict[str, np.ndarray]:
        """``name``'s model as one on the whole chosen input list (a variant's other inputs at weight 0), so every
        model of the comparison scores the same matrix."""
        arrays = {k: v.numpy() for k, v in self.models[name].arrays.items()}
        own = self.inputs.get(name)
        return arrays if own is None else families.widen(arrays, own.names, self.chosen.names)


def fit(run: Run, cohort: Cohort, covariates: str = "", evaluate_rounds: bool = True,
        histograms: bool = False, main: Fitted | None = None, start: fold_prefetch.FoldStart | None = None) -> Fitted:
    """Fit the run's model on ``cohort``. ``evaluate_rounds``: each site scores every round's model on its
    held-out split; ``histograms``: collect before/after-ComBat histograms of a few model features; ``main``: the
    main run's fit, for a leave-one-site-out fold: its ComBat sums are pooled again instead of asked for
    (harmonization_phase ``reuse``), and with ``loso-warm-start`` each exact fit starts from its model; ``start``: the
    fold's first steps worked out ahead (server.fold_prefetch), the same numbers."""
    warm = main.warm_starts() if main is not None and run.config.loso_warm_start else {}
    robust = robustness_phase(run, cohort) if run.config.robustness_min_icc > 0 else None
    harmonization = harmonization_phase(run, cohort, covariates, main.harmonization if main else None,
                                        start.pooled if start else None) if run.config.combat else None
    # a leave-one-site-out fold's moments and correlation follow from what its sites sent for the main run, if they can
    derived = derived_moments.derivation(run, cohort, harmonization, main.harmonization if main else None,
                                         main.pooled if main else None, main.chosen.raw if main else None,
                                         start.derivation if start else None)
    raw = main is None and cohort.fold == "" and derived_moments.wanted(run, cohort)  # the raw sums the folds need
    pooled = phases.moments_phase(run, cohort, harmonization.per_node if harmonization else None,
                                  harmonization.late_joiner if harmonization else None,
                                  derived.moments if derived else None, raw)
    # the main run's folds can start from its sums: their first steps worked out while it waits for its sites
    prefetch = fold_prefetch.FoldPrefetch(run, cohort, harmonization, pooled).start() \
        if raw and harmonization is not None and run.config.loso_prefetch else None
    # the class weight of the cohort's own training cases (a cross-validation fold's differ from the run's)
    n_hgg, n_bm = pooled.classwise[1][0], pooled.classwise[0][0]
    cohort = replace(cohort, agreement=replace(cohort.agreement, pos_weight=n_bm / max(n_hgg, 1)))
    # with worked-out moments each site keeps its own ComBat for the fold, for the features the fold will harmonise
    keep = (lambda columns: keep_phase(run, cohort, harmonization, columns)) \
        if derived is not None and harmonization is not None else None
    chosen = phases.selection_phase(run, cohort, pooled, frozenset(robust.removed) if robust else frozenset(),
                                    derived.correlation if derived else None, raw, keep)
    chosen = training.select_l1(run, cohort, pooled, chosen)
    # with clinical inputs: the first listed family again on the radiomics features alone and on the clinical inputs
    # alone, same cohort, ComBat, moments and selection; the comparison's rows then differ only in the inputs
    inputs = variants(chosen, run.config.compared[len(run.config.families):])
    drawn = None
    if histograms and harmonization is not None and chosen.names and not run.config.dp_query:  # withheld under DP
        radiomics = [n for n in chosen.names if not is_clinical(n)]  # ComBat's before/after: no clinical
        # each exact fit's first Newton round waits only for the selection: it travels with the histograms
        for family in run.config.families:
            training.prefetch_first_round(run, cohort, pooled, chosen, family)
        for name, own in inputs.items():
            training.prefetch_first_round(run, cohort, pooled, own, name)
        drawn = phases.histograms_phase(run, cohort, pooled, radiomics[:4])
    # every family on the same harmonised, standardised, selected features: the rows of the comparison differ
    # only in the model
    models = {family: training.train(run, cohort, pooled, chosen, evaluate_rounds, family, warm.get(family))
              for family in run.config.families}
    for name, own in inputs.items():
        models[name] = training.train(run, cohort, pooled, own, evaluate_rounds, name, warm.get(name))
    return Fitted(harmonization, pooled, chosen, models, cohort.agreement.pos_weight, drawn, robust, inputs=inputs,
                  prefetch=prefetch)


def variants(chosen: selection.Selection, names: list[str]) -> dict[str, selection.Selection]:
    """Each variant's inputs: ``<family>:radiomics-only`` the chosen radiomics features, ``<family>:clinical-only``
    the clinical inputs (model-covariates)."""
    out = {}
    for name in names:
        clinical = name.endswith(":clinical-only")
        keep = [i for i, n in enumerate(chosen.names) if is_clinical(n) == clinical]
        out[name] = replace(chosen, names=[chosen.names[i] for i in keep], t=[chosen.t[i] for i in keep])
    return out
