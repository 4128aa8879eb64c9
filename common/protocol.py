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
COMBAT_FIT = "query.combat_fit"
COMBAT_RESIDUALS = "query.combat_residuals"
MOMENTS = "query.moments"
CORRELATION = "query.correlation"
TRAIN = "train"
EVALUATE = "evaluate"

# Array shapes are declared in symbols fixed by the run, never by a site's number of cases:
# "d" = agreed features, "q" = ComBat design columns (sites + covariates), "m" = selection candidates,
# "s" = features the model uses (after selection).
Shape = tuple[str | int, ...]


@dataclass(frozen=True)
class ArraySpec:
    description: str
    shape: Shape


# The model's state dict (common.model.RadiomicsLogistic): the only arrays a train reply holds.
MODEL_ARRAYS = {
    "mean": ArraySpec("pooled feature mean the model standardises with", ("s",)),
    "scale": ArraySpec("pooled feature std the model standardises with", ("s",)),
    "linear.weight": ArraySpec("coefficients after local training on the training split", (1, "s")),
    "linear.bias": ArraySpec("intercept after local training on the training split", (1,)),
}


@dataclass(frozen=True)
class ReplySpec:
    """What a site's reply to one message type may hold.

    Attributes:
        config: ConfigRecord key -> description (site metadata, never per-case values).
        metrics: MetricRecord key -> description (counts or statistics over ``count_key`` cases).
        arrays: key inside the ArrayRecord -> description and declared shape (in run symbols).
        count_keys: the metrics holding the numbers of cases the reply's statistics aggregate over
            (each must be >= k); empty for replies holding counts only.
        record_names: the RecordDict keys allowed in the reply.
    """

    config: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    arrays: dict[str, ArraySpec] = field(default_factory=dict)
    count_keys: tuple[str, ...] = ()
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
        count_keys=("n-cases",),
    ),
    COMBAT_FIT: ReplySpec(
        arrays={"xtx": ArraySpec("design cross-products XᵀX over training cases", ("q", "q")),
                "xty": ArraySpec("design-feature cross-products XᵀY over training cases", ("q", "d"))},
        metrics={"n": "training cases"},
        count_keys=("n",),
    ),
    COMBAT_RESIDUALS: ReplySpec(
        arrays={"ss": ArraySpec("per-feature sum of squared residuals of the pooled fit", ("d",))},
        metrics={"n": "training cases"},
        count_keys=("n",),
    ),
    MOMENTS: ReplySpec(
        arrays={
            "mean": ArraySpec("per-feature mean over training cases", ("d",)),
            "m2": ArraySpec("per-feature sum of squared deviations from that mean", ("d",)),
            "mean-hgg": ArraySpec("per-feature mean over HGG training cases", ("d",)),
            "m2-hgg": ArraySpec("per-feature centred sum of squares over HGG training cases", ("d",)),
            "mean-bm": ArraySpec("per-feature mean over BM training cases", ("d",)),
            "m2-bm": ArraySpec("per-feature centred sum of squares over BM training cases", ("d",)),
        },
        metrics={"n": "training cases", "n-hgg": "HGG training cases", "n-bm": "BM training cases"},
        count_keys=("n", "n-hgg", "n-bm"),
    ),
    CORRELATION: ReplySpec(
        arrays={"crossproducts": ArraySpec("sum over training cases of z zᵀ of the candidates, z standardised "
                                           "with the pooled mean and std", ("m", "m"))},
        metrics={"n": "training cases"},
        count_keys=("n",),
    ),
    TRAIN: ReplySpec(
        arrays=MODEL_ARRAYS,
        metrics={"num-examples": "training cases", "train-loss": "mean class-weighted loss"},
        count_keys=("num-examples",),
    ),
    EVALUATE: ReplySpec(
        metrics={
            "num-examples": "held-out cases",
            "tp": "HGG called HGG", "fp": "BM called HGG", "tn": "BM called BM", "fn": "HGG called BM",
            "auc": "ROC AUC over the held-out cases",
            "loss": "mean class-weighted log loss over the held-out cases",
        },
        count_keys=("num-examples",),
    ),
}
