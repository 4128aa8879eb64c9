"""The robustness filter's phase: each site of a cohort sends ICC sums of every agreed feature over its training
cases (originals and the profile's perturbed copies); the server pools them into each feature's ICC(1,1)
(common.icc) and names the features below ``robustness-min-icc``, which then leave before selection.

It runs in ``server.pipeline.fit``, so the main run and every leave-one-site-out, local-only and cross-validation
cohort measure robustness on their own sites' training cases only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from common import icc, protocol
from common.canon import arrays_sha256, sha256_json
from common.profile import Profile, Robustness
from server.federation import Cohort, Run, RunRefused

log = logging.getLogger("flwr.radfed.server")


@dataclass
class RobustnessResult:
    """Each agreed feature's ICC (NaN: not measurable at some site, or constant), the threshold, and which left."""

    names: list[str]
    icc: np.ndarray
    threshold: float
    removed: list[str]
    n_cases: int
    measurements: int
    sites: list[str]

    def summary(self) -> dict[str, object]:
        """For metrics.json: quantiles per sequence/region, the removed features, and every ICC."""
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            groups.setdefault("/".join(name.split("/")[:2]), []).append(i)
        removed = set(self.removed)
        return {
            "threshold": self.threshold, "form": "ICC(1,1), cases nested in sites (site-centred)",
            "n_cases": self.n_cases, "measurements": self.measurements, "sites": self.sites,
            "n_features": len(self.names), "n_removed": len(self.removed), "removed": self.removed,
            "quantiles": [0.0, 0.25, 0.5, 0.75, 1.0],
            "groups": {g: {"n": len(ix), "removed": sum(self.names[i] in removed for i in ix),
                           "not_measurable": int(np.sum(~np.isfinite(self.icc[ix]))),
                           "icc_quantiles": icc.quantiles(self.icc[ix])} for g, ix in sorted(groups.items())},
            "icc": {n: (float(v) if np.isfinite(v) else None) for n, v in zip(self.names, self.icc, strict=True)},
        }


def require_perturbations(threshold: float, profile: Profile) -> Robustness:
    """The profile's perturbations; RunRefused, in words, when the filter is on and the profile declares none
    (checked before any site extracts anything, and again by the phase)."""
    if profile.robustness is None:
        raise RunRefused(f"robustness-min-icc = {threshold} but profile {profile.name} v{profile.version} declares "
                         "no perturbations: add a 'robustness' block to the profile (see common/profiles/default.yaml) "
                         "or set robustness-min-icc = 0")
    return profile.robustness


def robustness_phase(run: Run, cohort: Cohort) -> RobustnessResult:
    """Pooled ICC of every agreed feature over the cohort's sites; the features below the threshold, or not
    measurable (NaN), are named in ``removed``. Audit ``robustness``."""
    robust = require_perturbations(run.config.robustness_min_icc, run.profile)
    threshold = run.config.robustness_min_icc
    agreement = cohort.agreement
    config = {"features": agreement.names, "features-sha256": agreement.sha256}
    replies = cohort.ask(run, "robustness", protocol.ROBUSTNESS, config)
    sums, unmeasured = [], np.zeros(len(agreement.names), dtype=bool)
    for reply in replies.values():
        arrays = reply.content["arrays"]
        sums.append(icc.IccSums(int(reply.content["metrics"]["n"]), arrays["ssb"].numpy(),  # type: ignore[arg-type, union-attr]
                                arrays["ssw"].numpy()))  # type: ignore[union-attr]
        unmeasured |= arrays["unmeasured"].numpy() > 0.5  # type: ignore[union-attr]
    values = icc.icc_from_sums(sums, robust.measurements)
    values[unmeasured] = np.nan
    keep = np.isfinite(values) & (values >= threshold)
    removed = [n for n, ok in zip(agreement.names, keep, strict=True) if not ok]
    result = RobustnessResult(agreement.names, values, threshold, removed, sum(s.n for s in sums),
                              robust.measurements, sorted(cohort.fed.sites[n] for n in replies))
    run.audit.append("robustness", threshold=threshold, n_cases=result.n_cases, measurements=robust.measurements,
                     perturbations=[p.describe() for p in robust.draws()], sites=result.sites,
                     n_features=len(agreement.names), n_removed=len(removed), not_measurable=int(unmeasured.sum()),
                     removed_sha256=sha256_json(removed), icc_sha256=arrays_sha256({"icc": values}), **cohort.tag)
    log.info("%sRobustness: %d of %d feature(s) have ICC below %.2f under %d perturbed copies (%d not measurable) "
             "and leave before selection", f"Fold {cohort.fold}: " if cohort.fold else "", len(removed),
             len(agreement.names), threshold, robust.measurements - 1, int(unmeasured.sum()))
    return result
