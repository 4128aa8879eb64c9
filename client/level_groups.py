"""The case groups a categorical covariate defines at a site (each level; for the ComBat covariates and the model's
clinical inputs), which a reply's sums cover and the release ledger must therefore see, and the rule that each
such group holds 0 or at least k training cases (else the site refuses, naming the groups).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from client.site import SiteError
from common import covariates as cov

if TYPE_CHECKING:
    from client.steps import SiteData


def covariate_sets(data: SiteData, spec: list[cov.Covariate]) -> dict[str, frozenset[str]]:
    """The training cases of each categorical covariate level ("train|sex=F"): ComBat's XᵀY sums over them."""
    return _training_level_sets(data, data.covariates, spec, "train|")


def clinical_sets(data: SiteData, spec: list[cov.Covariate]) -> dict[str, frozenset[str]]:
    """The training cases of each categorical model-covariate level ("train|clinical/sex=M"): the correlation and
    training replies sum the model's other inputs over them (an indicator's cross-product with a feature is the
    feature's sum over the level's cases), as ComBat's XᵀY does. Per class only counts of a level leave (the
    class-wise moments of its indicator): sums over the class, like any feature's."""
    return _training_level_sets(data, data.clinical, spec, f"train|{cov.CLINICAL}")


def _training_level_sets(data: SiteData, design: np.ndarray | None, spec: list[cov.Covariate],
                         prefix: str) -> dict[str, frozenset[str]]:
    """``prefix + level`` -> the training cases at that level, from a coded design (n, p) of the site's cases."""
    if design is None or not spec:
        return {}
    rows = ~data.held_out
    ids = np.array(data.table.case_ids, dtype=object)[rows]
    return {f"{prefix}{level}": frozenset(ids[members])
            for level, members in cov.level_groups(spec, design[rows]).items()}


def refuse_small(data: SiteData, training: np.ndarray, spec: list[cov.Covariate], k: int, what: str,
                 knob: str) -> None:
    """Raise SiteError naming every level (or pair of levels) of ``spec`` with 1 to k - 1 cases among the
    training split's coded covariates ``training`` (n_train, p): sums over such a group would describe too few
    patients. ``what`` says what the site cannot do, ``knob`` which run-config key to change."""
    small = cov.small_groups(spec, training, k)
    if small:
        raise SiteError(f"site {data.site.name} cannot {what} {cov.describe(spec)}: its training split has fewer "
                        f"than k = {k} cases in {', '.join(small)}, and the sums over such a group would describe "
                        f"too few patients; add cases, or drop that covariate from {knob}")


def model_groups(data: SiteData, spec: list[cov.Covariate], k: int) -> dict[str, frozenset[str]]:
    """The level groups a reply over the model's inputs aggregates (``clinical_sets``), after checking that each
    level (and pair of levels) holds 0 or >= k training cases (the ComBat covariates' rule)."""
    if data.clinical is None or not spec:
        return {}
    refuse_small(data, data.clinical[~data.held_out], spec, k, "use the model covariates", "model-covariates")
    return clinical_sets(data, spec)
