"""The radfed wire protocol: every message type, every key a site may send, and what it aggregates.

Both sides import this. The client's privacy guard refuses any reply key not declared here and
any statistic computed over fewer than k cases; the server reads replies by these names only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROTOCOL_VERSION = "1"
DEFAULT_K = 5

PLAN = "query.plan"
FEATURES = "query.features"
MOMENTS = "query.moments"
TRAIN = "train"
EVALUATE = "evaluate"

# Array shapes are declared in symbols fixed by the run, never by a site's number of cases:
# "d" = agreed features, "q" = ComBat design columns (sites + covariates).
Shape = tuple[str | int, ...]


@dataclass(frozen=True)
class ArraySpec:
    description: str
    shape: Shape


# The model's state dict (common.model.RadiomicsLogistic): the only arrays a train reply holds.
MODEL_ARRAYS = {
    "mean": ArraySpec("pooled feature mean the model standardises with", ("d",)),
    "scale": ArraySpec("pooled feature std the model standardises with", ("d",)),
    "linear.weight": ArraySpec("coefficients after local training on the training split", (1, "d")),
    "linear.bias": ArraySpec("intercept after local training on the training split", (1,)),
}


@dataclass(frozen=True)
class ReplySpec:
    """What a site's reply to one message type may hold.

    Attributes:
        config: ConfigRecord key -> description (site metadata, never per-case values).
        metrics: MetricRecord key -> description (counts or statistics over ``count_key`` cases).
        arrays: key inside the ArrayRecord -> description and declared shape (in run symbols).
        count_key: the metric holding the number of cases the reply aggregates over (>= k), or None
            for replies holding counts only.
        record_names: the RecordDict keys allowed in the reply.
    """

    config: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    arrays: dict[str, ArraySpec] = field(default_factory=dict)
    count_key: str | None = None
    record_names: tuple[str, ...] = ("config", "metrics", "arrays")


REPLIES: dict[str, ReplySpec] = {
    PLAN: ReplySpec(
        config={
            "site-name": "the site's display name",
            "profile-sha256": "hash of the extraction profile the site uses",
            "profile-version": "version of that profile",
            "pyradiomics": "pyradiomics version at the site",
            "protocol": "protocol version the site speaks",
            "status": "'ok' or 'ineligible'",
            "reason": "why the site cannot take part (empty when ok)",
        },
        metrics={
            "n-hgg": "cases with diagnosis HGG in the manifest",
            "n-bm": "cases with diagnosis BM in the manifest",
            "n-problems": "manifest rows that cannot be used",
        },
    ),
    FEATURES: ReplySpec(
        config={"features": "names of features finite for every usable case (a property of all cases)"},
        metrics={
            "n-cases": "usable cases after extraction",
            "n-train-hgg": "HGG cases in the training split",
            "n-train-bm": "BM cases in the training split",
            "n-test-hgg": "HGG cases in the held-out split",
            "n-test-bm": "BM cases in the held-out split",
            "n-failed": "cases that failed checks or extraction",
        },
        count_key="n-cases",
    ),
    MOMENTS: ReplySpec(
        arrays={"mean": ArraySpec("per-feature mean over training cases", ("d",)),
                "m2": ArraySpec("per-feature sum of squared deviations from that mean", ("d",))},
        metrics={"n": "training cases the moments aggregate over"},
        count_key="n",
    ),
    TRAIN: ReplySpec(
        arrays=MODEL_ARRAYS,
        metrics={"num-examples": "training cases", "train-loss": "mean class-weighted loss"},
        count_key="num-examples",
    ),
    EVALUATE: ReplySpec(
        metrics={
            "num-examples": "held-out cases",
            "tp": "HGG called HGG", "fp": "BM called HGG", "tn": "BM called BM", "fn": "HGG called BM",
            "auc": "ROC AUC over the held-out cases",
            "loss": "mean class-weighted log loss over the held-out cases",
        },
        count_key="num-examples",
    ),
}
