"""The radfed wire protocol: every message type, every key a site may send, and what it aggregates.

Both sides import this. The client's privacy guard refuses any reply key not declared here and
any statistic computed over fewer than k cases; the server reads replies by these names only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROTOCOL_VERSION = "3"
# Not a message: names a file the ServerApp waits for before anything (server/app.py ``wait_for_start``), set by
# radfed's launcher for a run it starts before its sites' inputs are ready (radfed/launch.py, the demo)
START_GATE = "RADFED_START_GATE"
# Not a message either: names a file the ServerApp writes its last lines to (JSON: status, lines) once every output and
# the signed run-end are written (server/app.py ``announce_end``), so the launcher stops the run's processes then,
# not when those lines come through Flower's log stream (radfed/launch.py ``follow_run``)
RUN_END_MARK = "RADFED_RUN_END_MARK"
DEFAULT_K = 5

PLAN = "query.plan"

# How a site that did not approve the run's plan says so (client.approvals writes it, server.phases reads the site's
# name from it: the site refuses before reading anything, so no plan reply carries its name).
NOT_APPROVED = "run plan not approved"


def not_approved_reason(site: str, revoked: bool, plan_hash: str, site_dir: str) -> str:
    return (f"{NOT_APPROVED}: site {site} has {'revoked' if revoked else 'not approved'} run plan {plan_hash}; "
            f"no data was read. Review it at the site with: radfed site plan show {plan_hash} --site {site_dir}; "
            f"approve it with: radfed site approve {plan_hash} --site {site_dir}")


def refusing_site(reason: str) -> str | None:
    """The site named in a :func:`not_approved_reason`, or None for any other text."""
    head = f"{NOT_APPROVED}: site "
    if not reason.startswith(head):
        return None
    name, sep, _ = reason[len(head):].partition(" has ")
    return name if sep and name else None

FEATURES = "query.features"
COMBAT_FIT = "query.combat_fit"
COMBAT_RESIDUALS = "query.combat_residuals"
COMBAT_JOIN = "query.combat_join"
COMBAT_KEEP = "query.combat_keep"
MOMENTS = "query.moments"
CORRELATION = "query.correlation"
HISTOGRAMS = "query.histograms"
NEWTON = "query.newton"
RECALIBRATE = "query.recalibrate"
CALIBRATION_FIT = "query.calibration_fit"
TRAIN = "train"
EVALUATE = "evaluate"
OUT_OF_FOLD = "query.out_of_fold"
COMPARE = "query.compare"
COMPARE_OUT_OF_FOLD = "query.compare_out_of_fold"
ROBUSTNESS = "query.robustness"
TREES = "query.trees"

# Array shapes are declared in symbols fixed by the run, never by a site's number of cases:
# "d" = agreed features, "q" = ComBat design columns a site holds (its own site column + covariates),
# "m" = selection candidates,
# "s" = features the model uses (after selection), "p" = curve points (run config ``curve-points``),
# "h" = features shown as histograms, "b" = histogram bins, "c" = model coefficients (s + 1, with the intercept),
# "g" = score-histogram bins (run config ``score-bins``), "t" = decision-curve thresholds (``decision-thresholds``),
# "u" = the mlp family's hidden units (``mlp-hidden``), "f" = models compared (``models``, then with
# ``model-covariates`` the first family's radiomics-only and clinical-only variants: RunConfig.compared),
# "o" = tree nodes open at one level (2^(``tree-depth`` - 1)), "v" = the trees' agreed bins (``tree-bins``).
Shape = tuple[str | int, ...]

# How the guard checks that an array of counts covers no fewer than k cases anywhere:
CUMULATIVE_ROWS = "cumulative-rows"  # rows are cumulative counts: every step adds 0 or >= k cases
FIRST_COLUMN = "first-column"  # column 0 counts the cases of each row: 0 or >= k
EACH_ENTRY = "each-entry"  # every entry is a count: 0 or >= k
# rows are per-class counts [HGG, BM] of nested sets (cases at or above increasing thresholds), released only at
# the rows the array "<key>-kept" marks 1 (0 elsewhere); from the class totals "<key>-totals" through each kept
# row to none, every step is 0 or >= k cases of each class (common.clinical.k_safe_thresholds)
NESTED_ROWS = "nested-rows"


@dataclass(frozen=True)
class ArraySpec:
    description: str
    shape: Shape
    k_rule: str = ""  # one of the rules above for arrays of counts; "" for statistics over count_keys cases


# A model's arrays (common.families): the only arrays a train reply holds. The linear families (logistic-l2, svm)
# hold mean, scale and linear.*; the mlp family mean, scale, hidden.* and output.*.
MODEL_ARRAYS = {
    "mean": ArraySpec("pooled feature mean the model standardises with", ("s",)),
    "scale": ArraySpec("pooled feature std the model standardises with", ("s",)),
    "linear.weight": ArraySpec("coefficients after local training on the training split", (1, "s")),
    "linear.bias": ArraySpec("intercept after local training on the training split", (1,)),
    "hidden.weight": ArraySpec("mlp: hidden-layer weights after local training on the training split", ("u", "s")),
    "hidden.bias": ArraySpec("mlp: hidden-layer biases after local training", ("u",)),
    "output.weight": ArraySpec("mlp: output weights after local training", (1, "u")),
    "output.bias": ArraySpec("mlp: output bias after local training", (1,)),
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
        counts_sent: False for the noised replies of the query phases (``NOISED_REPLIES``): their exact counts do
            not leave the site; each count key still names the true case set the handler declares, which the
            guard checks (>= k, release ledger) in their place.
    """

    config: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    arrays: dict[str, ArraySpec] = field(default_factory=dict)
    count_keys: tuple[str, ...] = ()
    record_names: tuple[str, ...] = ("config", "metrics", "arrays")
    counts_sent: bool = True


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
            "plan-sha256": "hash of the run plan the site computed from the code and run config it runs",
            "approval": "'approved' (the site approved that plan) or 'off' (approval disabled: development only)",
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
        arrays={"xtx": ArraySpec("design cross-products XᵀX over training cases (own site column, covariates)",
                                 ("q", "q")),
                "xty": ArraySpec("design-feature cross-products XᵀY over training cases", ("q", "d"))},
        metrics={"n": "training cases"},
        count_keys=("n",),
    ),
    COMBAT_RESIDUALS: ReplySpec(
        arrays={"ss": ArraySpec("per-feature sum of squared residuals of the pooled fit", ("d",))},
        metrics={"n": "training cases"},
        count_keys=("n",),
    ),
    COMBAT_JOIN: ReplySpec(
        metrics={"n": "usable cases the held-out site fitted its own ComBat location/scale on (kept at the site)"},
        count_keys=("n",),
    ),
    COMBAT_KEEP: ReplySpec(
        metrics={"n": "training cases the site fitted its own ComBat location/scale for a fold on (kept at the site; "
                      "the fold's moments were worked out from the sums it sent for the main run)"},
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
            # asked for in the main run when leave-one-site-out folds work their moments out from the main run's
            # (server/derived_moments.py): the same cases' moments before ComBat, which no cohort's ComBat changes
            **{f"raw-{kind}-{cls}": ArraySpec(f"per-feature {what} over {name} training cases, before ComBat", ("d",))
               for cls, name in (("hgg", "HGG"), ("bm", "BM"))
               for kind, what in (("mean", "mean"), ("m2", "centred sum of squares"))},
        },
        metrics={"n": "training cases", "n-hgg": "HGG training cases", "n-bm": "BM training cases"},
        count_keys=("n", "n-hgg", "n-bm"),
    ),
    CORRELATION: ReplySpec(
        arrays={"crossproducts": ArraySpec("sum over training cases of z zᵀ of the candidates, z standardised "
                                           "with the pooled mean and std", ("m", "m")),
                # asked for in the main run when leave-one-site-out folds work their correlation out from the main
                # run's (server/derived_moments.py): the same cases before ComBat, which no cohort's ComBat changes
                "raw-crossproducts": ArraySpec("sum over training cases of (x - x̄)(x - x̄)ᵀ of the candidates before "
                                               "ComBat, x̄ their mean over those cases", ("m", "m"))},
        metrics={"n": "training cases"},
        count_keys=("n",),
    ),
    HISTOGRAMS: ReplySpec(
        arrays={"before": ArraySpec("counts of training cases per bin, raw features; bins merged until each "
                                    "count is 0 or >= k", ("h", "b"), EACH_ENTRY),
                "after": ArraySpec("the same after the site's ComBat adjustment", ("h", "b"), EACH_ENTRY)},
        metrics={"n": "training cases"},
        count_keys=("n",),
    ),
    NEWTON: ReplySpec(
        arrays={"grad": ArraySpec("gradient of the class-weighted log-likelihood summed over training cases, at the "
                                  "server's coefficients", ("c",)),
                "hess": ArraySpec("its Hessian, summed over training cases (the site refuses when cases are too few "
                                  "for the coefficients, see common/exact.py)", ("c", "c"))},
        metrics={"n": "training cases", "n-hgg": "HGG training cases", "n-bm": "BM training cases",
                 "loss": "class-weighted log-likelihood summed over training cases"},
        count_keys=("n", "n-hgg", "n-bm"),
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
            "auc-var": "DeLong variance of that AUC",
            "loss": "mean class-weighted log loss over the held-out cases",
            "sse": "sum over the held-out cases of (HGG probability - label)^2 (the Brier score's numerator)",
        },
        arrays={"roc": ArraySpec("cumulative [HGG, BM] cases above each cut of the sorted scores, every cut "
                                 ">= k cases further", ("p", 2), CUMULATIVE_ROWS),
                "calibration": ArraySpec("per group of >= k cases by predicted probability: [cases, sum of "
                                         "predicted probability, HGG cases]", ("p", 3), FIRST_COLUMN),
                "score-start": ArraySpec("per class [BM, HGG], adjacent score bins of the run's grid merged into "
                                         "groups of >= k cases: each group's count at its first occupied bin",
                                         (2, "g"), EACH_ENTRY),
                "score-end": ArraySpec("the same groups' counts at their last occupied bin", (2, "g"), EACH_ENTRY),
                "decision": ArraySpec("[HGG, BM] cases with probability >= each of the run's thresholds, at the "
                                      "thresholds where every step between released counts is 0 or >= k cases "
                                      "of each class; 0 at the others", ("t", 2), NESTED_ROWS),
                "decision-kept": ArraySpec("1 at the thresholds whose counts are released, 0 at the others",
                                           ("t",)),
                "decision-totals": ArraySpec("[HGG, BM] held-out cases (as tp + fn and tn + fp)", (2,), EACH_ENTRY)},
        count_keys=("num-examples",),
    ),
    RECALIBRATE: ReplySpec(
        arrays={"gradient": ArraySpec("gradient of the summed log-likelihood of y ~ a + b logit(p) over the "
                                      "evaluated cases (held-out split, or every usable case at a held-out site), at "
                                      "the server's (a, b), p the model's scores", (2,)),
                "hessian": ArraySpec("its Hessian, summed over the same cases", (2, 2))},
        metrics={"n": "evaluated cases", "loss": "that negative log-likelihood summed over the evaluated cases"},
        count_keys=("n",),
    ),
    # at a site that is a cohort of its own (a leave-one-site-out fold's held-out site), the same Newton fit run at
    # the site: the fit only, a function of what the rounds of query.recalibrate would send (the final round's sums)
    CALIBRATION_FIT: ReplySpec(
        metrics={"n": "evaluated cases (every usable case of the site)",
                 "intercept": "a of y ~ a + b logit(p) fitted over those cases, p the model's scores",
                 "slope": "b of that fit", "intercept-se": "standard error of a (inverse Hessian)",
                 "slope-se": "standard error of b", "loss": "the fit's negative log-likelihood summed over the cases",
                 "rounds": "Newton steps the fit took (as the federated rounds count them)",
                 "converged": "1 when the fit converged, else 0"},
        count_keys=("n",),
    ),
}
# Cross-validation's internal validation: the same evaluation, over every usable case, each scored by the
# model of the fold that held it out (the scores stay at the site).
REPLIES[OUT_OF_FOLD] = ReplySpec(
    metrics={**REPLIES[EVALUATE].metrics, "num-examples": "usable cases (every one scored out of fold)",
             "auc": "ROC AUC of the out-of-fold scores over all usable cases"},
    arrays=REPLIES[EVALUATE].arrays, count_keys=REPLIES[EVALUATE].count_keys)
# Paired comparison of the run's model families (common.delong): each site scores its evaluation cases with every
# family's model of the cohort and sends the AUCs, their paired DeLong covariance and the Brier sums.
REPLIES[COMPARE] = ReplySpec(
    arrays={"auc": ArraySpec("ROC AUC of each family's model over the evaluation cases", ("f",)),
            "auc-cov": ArraySpec("paired DeLong covariance of those AUCs (structural components over the same "
                                 "cases)", ("f", "f")),
            "sse": ArraySpec("per family, sum over the evaluation cases of e = (score - label)^2", ("f",)),
            "sse-cross": ArraySpec("per pair of families, sum over the same cases of e_a e_b (the Brier "
                                   "difference's variance)", ("f", "f"))},
    metrics={"num-examples": "evaluation cases", "n-hgg": "HGG evaluation cases", "n-bm": "BM evaluation cases"},
    count_keys=("num-examples", "n-hgg", "n-bm"),
)
# Cross-validation's paired comparison: the same sums as COMPARE over every usable case, each family's score of a case
# the one the model of the fold that held it out gave it in one repeat (the message names the repeat).
REPLIES[COMPARE_OUT_OF_FOLD] = ReplySpec(
    arrays={"auc": ArraySpec("ROC AUC of each family's out-of-fold scores (one repeat) over all usable cases", ("f",)),
            "auc-cov": ArraySpec("paired DeLong covariance of those AUCs (structural components over the same "
                                 "cases)", ("f", "f")),
            "sse": ArraySpec("per family, sum over the same cases of e = (out-of-fold score - label)^2", ("f",)),
            "sse-cross": ArraySpec("per pair of families, sum over the same cases of e_a e_b", ("f", "f"))},
    metrics={"num-examples": "usable cases (every one scored out of fold)", "n-hgg": "HGG usable cases",
             "n-bm": "BM usable cases"},
    count_keys=("num-examples", "n-hgg", "n-bm"),
)
# The robustness filter (profile ``robustness`` block, run config ``robustness-min-icc``): one-way ANOVA sums of
# each agreed feature over the training cases, each measured on its original and on m - 1 perturbed copies,
# centred on the site's own mean (common.icc).
REPLIES[ROBUSTNESS] = ReplySpec(
    arrays={"ssb": ArraySpec("per-feature between-case sum of squares m sum_i (case mean - site mean)^2 over the "
                             "training cases (original and perturbed copies of each)", ("d",)),
            "ssw": ArraySpec("per-feature within-case sum of squares sum_i sum_j (x_ij - case mean)^2 over the same "
                             "cases", ("d",)),
            "unmeasured": ArraySpec("1 where some copy of some training case has no finite value (then 0 in "
                                    "ssb and ssw), else 0", ("d",))},
    metrics={"n": "training cases"},
    count_keys=("n",),
)
# Gradient-boosted trees (the ``gbt`` family, common/trees.py): one level of the tree being grown. The site routes
# each of its training release blocks whole, by the block's mean z, so every entry sums whole blocks (each k to 2k - 1
# patients of one class); the handler declares every node's and bin's case set to the release ledger.
REPLIES[TREES] = ReplySpec(
    arrays={"grad": ArraySpec("per open node, model feature and agreed bin: sum of the logistic loss's gradient over "
                              "the training cases of the release blocks whose mean falls there", ("o", "s", "v")),
            "hess": ArraySpec("the same sums of the hessian", ("o", "s", "v")),
            "count": ArraySpec("the same blocks' training cases: every entry 0 or >= k", ("o", "s", "v"),
                               EACH_ENTRY)},
    metrics={"n": "training cases"},
    count_keys=("n",),
)

# With differential privacy on the query phases (run config ``dp-query-noise-multiplier`` > 0, common/dp_query.py),
# these replies take the place of the exact ones: sums of each case's clipped contribution, in units the server
# fixed before the release, each with Gaussian noise added at the site. The exact counts are not sent.
NOISED_REPLIES: dict[str, ReplySpec] = {
    MOMENTS: ReplySpec(
        arrays={f"{kind}-{cls}": ArraySpec(f"noised sum over {name} training cases of {what}", ("d",))
                for cls, name in (("hgg", "HGG"), ("bm", "BM"))
                for kind, what in (("sum", "u = clip((x - reference location) / reference scale, -c, c)"),
                                   ("sumsq", "u squared"))},
        metrics={"n-hgg-noised": "HGG training cases plus Gaussian noise (std z)",
                 "n-bm-noised": "BM training cases plus Gaussian noise (std z)"},
        count_keys=("n", "n-hgg", "n-bm"), counts_sent=False,
    ),
    CORRELATION: ReplySpec(
        arrays={"crossproducts": ArraySpec("noised sum over training cases of z zᵀ, z = clip((x - pooled mean) / "
                                           "pooled std, -c, c) of the candidates", ("m", "m"))},
        count_keys=("n",), counts_sent=False,
    ),
    NEWTON: ReplySpec(
        arrays={"grad": ArraySpec("noised gradient of the class-weighted log-likelihood summed over training cases, "
                                  "features clipped to [-c, c] after standardising", ("c",)),
                "hess": ArraySpec("its noised Hessian (symmetric noise)", ("c", "c"))},
        count_keys=("n", "n-hgg", "n-bm"), counts_sent=False,
    ),
}

# not sent at all when the query phases are noised: the report's before/after histograms (counts per bin of
# single features have no useful noised form at these sizes)
WITHHELD_WHEN_NOISED = (HISTOGRAMS,)


def reply_spec(message_type: str, noised: bool = False) -> ReplySpec | None:
    """The reply a site may send to ``message_type``: the noised one when the run noises the query phases and
    the message type is one of them."""
    if noised and message_type in NOISED_REPLIES:
        return NOISED_REPLIES[message_type]
    return REPLIES.get(message_type)
