"""A run's state as the ServerApp fills it in (``RunResult``) and the document it becomes: metrics.json.

metrics.json (schema ``radfed.metrics/1``) is for machines: per round and final, per site and for the
federation, with counts, 95% intervals, ROC and calibration points, harmonisation histograms and
leave-one-site-out results. The human report (``server.report``) is built from this document alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import metrics
from common.canon import json_safe
from common.profile import Profile

log = logging.getLogger("flwr.radfed.server")

METRICS_SCHEMA = "radfed.metrics/1"


@dataclass
class RunResult:
    """Everything a run produced so far; ``as_json()`` is metrics.json."""

    run_id: int
    folder: Path
    config: dict[str, Any]
    profile: Profile
    status: str = "running"
    error: str = ""
    seconds: float = 0.0
    site_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    dropouts: list[dict[str, Any]] = field(default_factory=list)
    features: dict[str, Any] = field(default_factory=dict)
    training: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    evaluations: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    model_sha256: str | None = None
    # Optional (absent from metrics.json when empty):
    # curves[round][site] = {"roc": {"fpr", "tpr"}, "calibration": {"predicted", "observed", "n"}};
    # the last evaluated round's go into final.sites.
    curves: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # {"features": {name: {"edges": [...], "sites": {site: {"before": [...], "after": [...]}}}}}
    harmonization: dict[str, Any] | None = None
    # {"loso": {site: {n, auc, sensitivity, ..., "ci", "roc", "calibration_fit", ...} or {"error"}},
    #  "loso_calibration": the held-out sites' slopes pooled (common.metrics.pool_slopes), "baselines": {...}}
    validation: dict[str, Any] | None = None
    # the final evaluation's pooled clinical metrics (server.clinical.pooled) and the calibration fit
    pooled: dict[str, Any] | None = None
    # differential privacy spent in this run: {"model_updates": DPAccount, "query": QueryAccount} (to_dict each)
    privacy: dict[str, Any] | None = None
    # the model families compared (server.comparison.summary): chosen, rule, per family internal/external, paired
    families: dict[str, Any] | None = None

    def rounds(self) -> list[dict[str, Any]]:
        """Every round that trained or evaluated; a round without evaluation (e.g. an exact-fit Newton step)
        has ``evaluate = {"sites": {}, "aggregate": None}``."""
        out = []
        for r in sorted(set(self.training) | set(self.evaluations)):
            sites = self.evaluations.get(r, {})
            out.append({"round": r, "train": {"sites": self.training.get(r, {})},
                        "evaluate": {"sites": sites,
                                     "aggregate": metrics.combine_sites(list(sites.values())) if sites else None}})
        return out

    def final_aggregate(self) -> dict[str, float] | None:
        if not self.evaluations:
            return None
        return metrics.combine_sites(list(self.evaluations[max(self.evaluations)].values()))

    def final_sites(self) -> dict[str, dict[str, Any]]:
        """The last round's site records, with that round's curves and 95% intervals where available."""
        if not self.evaluations:
            return {}
        last = max(self.evaluations)
        curves = self.curves.get(last, {})
        out = {}
        for name, record in self.evaluations[last].items():
            site = {**record, **curves.get(name, {})}
            if "ci" not in site and "auc_var" in site:
                site["ci"] = _intervals(site)
            out[name] = site
        return out

    def as_json(self) -> dict[str, Any]:
        aggregate = self.final_aggregate()
        if aggregate is not None and "auc_var" in aggregate:
            aggregate["ci"] = _intervals(aggregate)
        doc = {
            "schema": METRICS_SCHEMA,
            "run_id": self.run_id,
            "status": self.status,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "profile": {"name": self.profile.name, "version": self.profile.version, "sha256": self.profile.sha256},
            "config": self.config,
            "sites": {name: {"manifest": self.site_counts.get(name, {}), "split": self.split_counts.get(name, {})}
                      for name in sorted(set(self.site_counts) | set(self.split_counts))},
            "dropouts": self.dropouts,
            "features": self.features,
            "model_sha256": self.model_sha256,
            "rounds": self.rounds(),
            "final": {"round": max(self.evaluations) if self.evaluations else None, "sites": self.final_sites(),
                      "aggregate": aggregate, **({"pooled": self.pooled} if self.pooled else {})},
            "notes": {
                "aggregate": "sensitivity, specificity and balanced accuracy from confusion counts summed over "
                             "sites; AUC is the mean of site AUCs weighted by held-out cases",
                "pooled": "final.pooled: the AUC of all sites' held-out cases together (not a mean of site AUCs), "
                          "from k-anonymous score histograms: the exact pooled AUC lies in [auc_low, auc_high], "
                          "within auc_bound of auc; Brier score, calibration slope and intercept and decision-curve "
                          "net benefit of the same pooled cases",
                "positive_class": "HGG",
                "threshold": 0.5,
                "internal_validation": _internal_validation(self.config),
            },
        }
        if self.harmonization:
            doc["harmonization"] = self.harmonization
        if self.validation:
            doc["validation"] = self.validation
        if self.privacy:
            doc["privacy"] = self.privacy
        if self.families:
            doc["families"] = self.families
        return json_safe(doc)


def _internal_validation(config: dict[str, Any]) -> str:
    """How the final per-site metrics were obtained, in words."""
    if config.get("internal-validation") == "cv":
        return (f"{config.get('cv-folds')}-fold cross-validation by whole release blocks: every usable case scored by "
                "a model refitted (ComBat, selection, training) without its fold; the final model is fitted on "
                "every case")
    return (f"one held-out split (test-fraction {config.get('test-fraction')}, whole release blocks) scored by the "
            "final model")


def _intervals(record: dict[str, Any]) -> dict[str, list[float]] | None:
    """95% intervals of a site or federation record; None rather than an exception (the outputs must be written)."""
    try:
        return metrics.intervals(record)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("no 95%% intervals for %s: %s", record, exc)
        return None


def write_metrics(result: RunResult) -> dict[str, Any]:
    """Write ``metrics.json`` to the run folder; returns the document written."""
    doc = result.as_json()
    (result.folder / "metrics.json").write_text(json.dumps(doc, indent=2, allow_nan=False), encoding="utf-8")
    return doc
