"""radfed ClientApp: one hospital's side of a run. Flower glue only: the site's data and splits are in
client.steps, what each message computes in client.compute.

What the site agrees to during a run (feature list, design size, candidates, model features) is kept
in ``context.state`` under ``SITE_STATE`` (name lists by hash, in client.nodestate); the privacy guard
(client.guard) reads it to check the exact shape of every array before a reply leaves the site.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import (
    agreements,
    combat_state,
    compute,
    ledger,
    level_groups,
    nodestate,
    outoffold,
    runcache,
    steps,
    warmup,
)
from client import trees as site_trees
from client.appref import ReferencedClientApp
from client.approvals import approval_check, check_approved
from client.dp import dp_query_mod, dp_update_mod
from client.guard import privacy_guard, redact_local_paths
from client.site import Site, SiteError
from common import combat, covariates
from common.canon import arrays_sha256
from common.npy import decode, decode_all, encode
from common.runconfig import RunConfig
from common.split import parse_cv_tag

log = logging.getLogger("flwr.radfed.client")
# order (the first mod is the outermost): the site's files are stamped once per message (client.runcache); errors
# leave without the site's local paths; the guard checks and logs exactly what leaves, after the optional DP noise on
# model updates (and on the query phases' sums, added by their handlers; dp_query_mod keeps their budget); approval
# is checked before the handler reads anything (a query.batch of several folds' requests is split before these
# mods: client.batch); Flower's simulation ships the app to its workers by reference (client.appref)
app = ReferencedClientApp("client.app:app", mods=[runcache.look_mod, redact_local_paths, privacy_guard, dp_update_mod,
                                                   dp_query_mod, approval_check])


def _run(context: Context) -> RunConfig:
    return steps.run_config(context.run_config)


def _site_dir(context: Context) -> Path:
    return steps.locate_site(context.node_config, _run(context))


def _data(context: Context, msg: Message) -> steps.SiteData:
    """The site's data as the message's cohort sees it (a cross-validation fold holds out its own cases)."""
    return steps.load_site_data(_site_dir(context), _run(context)).fold_view(agreements.cohort(msg))


def _harmonizer(context: Context, msg: Message) -> steps.Harmonizer | None:
    """This site's ComBat adjustment for the message's cohort. Each fold has its own, fitted against that
    fold's pooled estimates: a fold never uses parameters learned with a site it must not see (so a fold
    without them is refused; the main cohort without them uses raw features, over the same cases)."""
    if not _run(context).combat:
        return None
    fold = agreements.cohort(msg)
    kept = combat_state.kept(nodestate.of(context), fold)
    if kept is None and fold:
        raise SiteError(f"this site holds no ComBat parameters for fold {fold} (it missed that fold's "
                        "harmonization or join); restart the run")
    return kept


def _keep_combat(context: Context, msg: Message, params: combat.SiteCombat, site: Site) -> None:
    """Remember the parameters for this cohort's later messages; the main run's are also saved at the site
    for prediction (with the covariate spec, so a new case's age and sex are coded the same way)."""
    combat_state.keep(nodestate.of(context), agreements.cohort(msg), params)
    if not agreements.cohort(msg):
        spec = covariates.describe(_run(context).covariates())
        # ComBat never sees clinical inputs
        radiomics = [n for n in agreements.agreed(context, msg) if not covariates.is_clinical(n)]
        text = json.dumps({**params.to_dict(), "features": radiomics, "run_id": context.run_id, "covariates": spec})
        path = site.files.harmonization(context.run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    # each Array put in as made (Flower checks the key and value): ArrayRecord(dict) would build every Array again
    # (from_array_dict), ~25 us per array of every sub-reply
    record = ArrayRecord()
    for k, v in values.items():
        record[k] = encode(np.ascontiguousarray(v, dtype=np.float64))
    return record


def _reply(msg: Message, declared: ledger.Declaration | None = None,
           **records: ArrayRecord | MetricRecord | ConfigRecord) -> Message:
    """The reply, with the case sets it aggregates over declared for the privacy guard (which refuses a reply
    with statistics and no declaration)."""
    if declared is not None:
        ledger.declare(msg.metadata.message_id, declared)
    return Message(RecordDict(records), reply_to=msg)


@app.query("plan")
def plan(msg: Message, context: Context) -> Message:
    warmup.prefetch_torch(_run(context))
    plan_hash, approval = check_approved(_site_dir(context), _run(context))
    config, counts = steps.plan_reply(_site_dir(context), _run(context))
    return _reply(msg, config=ConfigRecord({**config, "plan-sha256": plan_hash, "approval": approval}),
                  metrics=MetricRecord(counts))


@app.query("features")
def features(msg: Message, context: Context) -> Message:
    warmup.prefetch_torch(_run(context))
    data = _data(context, msg)
    names, counts = steps.features_reply(data)
    return _reply(msg, data.declare("all", {"n-cases": ""}), config=ConfigRecord({"features": names}),
                  metrics=MetricRecord(counts))


def _combat_round(msg: Message, context: Context) -> tuple[steps.SiteData, np.ndarray, np.ndarray | None, int, int]:
    """Training split of the agreed features and its covariates, and this site's place in the ComBat design."""
    config = msg.content["config"]
    agreed = agreements.accept(context, msg, "features", "features")  # type: ignore[arg-type]
    n_sites = int(config["n-sites"])  # type: ignore[arg-type, index]
    data = _data(context, msg)
    spec = _run(context).covariates()
    x, c = steps.combat_design(data, agreed, spec, steps.min_cases(data.site, _run(context)))
    # the design: one column per site, then the covariates' columns; a site sends only its own column's and the
    # covariates' block of it (common.combat.site_block)
    agreements.record(context, msg)["design-columns"] = 1 + len(covariates.columns(spec))
    return data, x, c, int(config["site-index"]), n_sites  # type: ignore[arg-type, index]


@app.query("combat_fit")
def combat_fit(msg: Message, context: Context) -> Message:
    data, x, c, site, n_sites = _combat_round(msg, context)
    sent = combat.site_moments(x, site, n_sites, c)
    xtx, xty = combat.site_block(sent)
    # XᵀY sums the features over each covariate level's training cases too
    groups = level_groups.covariate_sets(data, _run(context).covariates())
    return _reply(msg, data.declare("train", {"n": ""}, groups), arrays=_arrays({"xtx": xtx, "xty": xty}),
                  metrics=MetricRecord({"n": sent.n}))


@app.query("combat_residuals")
def combat_residuals(msg: Message, context: Context) -> Message:
    data, x, c, site, n_sites = _combat_round(msg, context)
    beta = combat.full_beta(decode(msg.content["arrays"]["beta"]), site, n_sites)  # type: ignore[union-attr]
    means = combat.PooledMeans(n_sites=n_sites, n=0, beta=beta, grand_mean=np.zeros(beta.shape[1]),
                               fitted_ms=np.zeros(beta.shape[1]))
    sent = combat.site_residuals(x, means, site, c)
    return _reply(msg, data.declare("train", {"n": ""}), arrays=_arrays({"ss": sent.ss}),
                  metrics=MetricRecord({"n": sent.n}))


@app.query("combat_join")
def combat_join(msg: Message, context: Context) -> Message:
    """A fold this site is held out of: harmonise against the fold's pooled ComBat estimates as a late-joining
    hospital does (own location/scale from all usable cases, no labels). Only the number of cases leaves."""
    agreed = agreements.accept(context, msg, "features", "features")  # type: ignore[arg-type]
    config, data = msg.content["config"], _data(context, msg)
    arrays = decode_all(msg.content["arrays"])  # type: ignore[union-attr]
    x, _ = steps.site_matrix(data, agreed, held_out=None)
    c = data.covariates
    params = compute.combat_join_fit(x, arrays, int(config["n-sites"]), int(config["n-pooled"]),  # type: ignore[arg-type, index]
                                   _run(context), c)
    _keep_combat(context, msg, params, data.site)
    return _reply(msg, data.declare("all", {"n": ""}), metrics=MetricRecord({"n": len(x)}))


@app.query("combat_keep")
def combat_keep(msg: Message, context: Context) -> Message:
    """A fold whose moments the coordinator worked out from what this site sent for the main run (no moments query,
    server/derived_moments.py): fit and keep the site's own ComBat location/scale for the fold from its training
    split's moments, as the coordinator did, for the fold's later queries: the parameters of the features the fold
    harmonises here alone (``columns``), all when it names none. Only the number of training cases leaves."""
    agreed = agreements.accept(context, msg, "features", "features")  # type: ignore[arg-type]
    config, data, run = msg.content["config"], _data(context, msg), _run(context)
    if not run.combat_parametric or run.combat_covariates.strip():
        raise SiteError("a fold's ComBat is kept from its moments only with parametric ComBat and no covariates; "
                        "this run has other settings, so the coordinator must ask for the fold's moments: restart it")
    sums = steps.training_moments(data, agreed)
    params = compute.combat_fit_from_moments(sums, decode_all(msg.content["arrays"]), int(config["site-index"]),  # type: ignore[union-attr, arg-type, index]
                                             int(config["n-pooled"]), run)  # type: ignore[arg-type, index]
    combat_state.keep(nodestate.of(context), agreements.cohort(msg), params,
                      steps.radiomics_columns(agreed, config.get("columns")))  # type: ignore[union-attr]
    return _reply(msg, data.declare("train", {"n": ""}), metrics=MetricRecord({"n": sums[0]}))


@app.query("moments")
def moments(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    agreed = agreements.accept(context, msg, "features", "features")  # type: ignore[arg-type]
    data = _data(context, msg)
    if "arrays" in msg.content:  # pooled ComBat estimates: fit this site's own parameters, locally
        x_raw, _ = steps.site_matrix(data, steps.radiomics_names(agreed), held_out=False)
        c = None if data.covariates is None else data.covariates[~data.held_out]
        arrays = decode_all(msg.content["arrays"])  # type: ignore[union-attr]
        _keep_combat(context, msg, compute.combat_site_fit(
            x_raw, arrays, int(config["site-index"]), int(config["n-sites"]),  # type: ignore[arg-type, index]
            int(config["n-pooled"]), _run(context), c), data.site)  # type: ignore[arg-type, index]
    x, y = steps.site_matrix(data, agreed, held_out=False, harmonize=_harmonizer(context, msg))
    declared = data.declare("train", {"n": "", "n-hgg": "hgg", "n-bm": "bm"}, _groups(data, context, agreed))
    if _run(context).dp_query:  # noised per-class sums in the units of the server's pooled ComBat estimates
        if "arrays" not in msg.content:
            raise SiteError("the query phases are noised, and the moments message holds no pooled ComBat estimates "
                            "to standardise with; restart the run")
        pooled = msg.content["arrays"]
        noised, counts = compute.noised_moments_reply(x, y, decode(pooled["grand-mean"]),  # type: ignore[union-attr]
                                                      decode(pooled["var-pooled"]), _run(context))  # type: ignore[union-attr]
        return _reply(msg, declared, arrays=_arrays(noised), metrics=MetricRecord(counts))  # type: ignore[arg-type]
    arrays, counts = compute.moments_reply(x, y)
    if config.get("raw-classes"):  # type: ignore[union-attr]  # the same cases before ComBat, for the folds' moments
        x_raw, _ = steps.site_matrix(data, agreed, held_out=False)
        arrays |= {f"raw-{k}": v for k, v in compute.moments_reply(x_raw, y)[0].items() if k.endswith(("hgg", "bm"))}
    return _reply(msg, declared, arrays=_arrays(arrays), metrics=MetricRecord(counts))


def _groups(data: steps.SiteData, context: Context, names: list[str]) -> dict[str, frozenset[str]]:
    """The model covariates' level groups a reply over ``names`` sums over (none without clinical inputs)."""
    if not steps.has_clinical(names):
        return {}
    run = _run(context)
    return level_groups.model_groups(data, run.model_covariates_spec(), steps.min_cases(data.site, run))


@app.query("correlation")
def correlation(msg: Message, context: Context) -> Message:
    candidates = agreements.accept(context, msg, "candidates", "candidates")  # type: ignore[arg-type]
    pooled = msg.content["arrays"]
    data = _data(context, msg)
    x, _ = steps.site_matrix(data, agreements.agreed(context, msg), held_out=False, names=candidates,
                             harmonize=_harmonizer(context, msg))
    mean, std = decode(pooled["mean"]), decode(pooled["std"])  # type: ignore[union-attr]
    if _run(context).dp_query:  # noised, and no count: the server has the moments' noised ones
        noised = compute.noised_correlation_reply(x, mean, std, _run(context))
        return _reply(msg, data.declare("train", {"n": ""}), arrays=_arrays({"crossproducts": noised}))
    cross, n = compute.correlation_reply(x, mean, std)
    arrays = {"crossproducts": cross}
    if msg.content["config"].get("raw-crossproducts"):  # type: ignore[union-attr]  # before ComBat, for the folds'
        x_raw, _ = steps.site_matrix(data, agreements.agreed(context, msg), held_out=False, names=candidates)
        arrays["raw-crossproducts"] = compute.raw_crossproducts(x_raw)
    return _reply(msg, data.declare("train", {"n": ""}), arrays=_arrays(arrays), metrics=MetricRecord({"n": n}))


def _receipt(msg: Message, context: Context, site: Site) -> None:
    """Keep, at the site, the hash of every global model received: an auditor checks it against the log."""
    arrays = msg.content["arrays"]
    entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "run_id": context.run_id,
             "site": site.name,
             "type": msg.metadata.message_type, "round": int(msg.content["config"]["server-round"]),  # type: ignore[arg-type]
             "fold": str(msg.content["config"].get("fold", "")),  # type: ignore[union-attr]
             # with several families each has its own rounds (the audit log names the family then too)
             **({"family": str(msg.content["config"].get("family", ""))}  # type: ignore[union-attr]
                if len(_run(context).compared) > 1 else {}),
             "model_sha256": arrays_sha256(decode_all(arrays))}  # type: ignore[union-attr]
    site.work_dir.mkdir(parents=True, exist_ok=True)
    with site.files.receipts.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")


def _model_split(msg: Message, context: Context, data: steps.SiteData,
                 held_out: bool | None, receipt: bool = True) -> tuple[np.ndarray, np.ndarray]:
    if receipt:
        _receipt(msg, context, data.site)
    selected = agreements.accept(context, msg, "features", "selected")  # type: ignore[arg-type]
    # a site scoring a fold it did not train in, without ComBat, agreed no feature list for it: the model's own
    agreed = agreements.agreed(context, msg, default=selected if agreements.cohort(msg) else None)
    return steps.site_matrix(data, agreed, held_out=held_out, names=selected,
                             harmonize=_harmonizer(context, msg))


@app.query("newton")
def newton(msg: Message, context: Context) -> Message:
    """Exact training: gradient and Hessian of the training split's log-likelihood at the server's coefficients."""
    data = _data(context, msg)
    x, y = _model_split(msg, context, data, held_out=False, receipt=False)
    arrays = decode_all(msg.content["arrays"])  # type: ignore[union-attr]
    sent = compute.newton_step(x, y, arrays, float(msg.content["config"]["pos-weight"]),  # type: ignore[arg-type]
                             data.site.name, _run(context))
    declared = data.declare("train", {"n": "", "n-hgg": "hgg", "n-bm": "bm"},
                            _groups(data, context, agreements.selected(context, msg)))
    if _run(context).dp_query:  # noised gradient and Hessian only: counts and the (unbounded) loss stay here
        return _reply(msg, declared, arrays=_arrays({"grad": sent.grad, "hess": sent.hess}))
    return _reply(msg, declared, arrays=_arrays({"grad": sent.grad, "hess": sent.hess}),
                  metrics=MetricRecord({"n": sent.n, "n-hgg": sent.n_pos, "n-bm": sent.n_neg, "loss": sent.loss}))


@app.query("trees")
def trees_level(msg: Message, context: Context) -> Message:
    """Gradient-boosted trees, one level: gradient/hessian/count histograms per open node, model feature and agreed
    bin, over the training split's routing units (whole release blocks, client/trees.py), every set declared."""
    data = _data(context, msg)
    x, y = _model_split(msg, context, data, held_out=False, receipt=False)
    ids = [str(c) for c in np.array(data.table.case_ids, dtype=object)[~data.held_out]]
    units = site_trees.routing_units(ids, y, data.blocking, steps.min_cases(data.site, _run(context)))
    arrays = decode_all(msg.content["arrays"])  # type: ignore[union-attr]
    level = int(msg.content["config"]["level"])  # type: ignore[arg-type, index]
    sent, sets = site_trees.site_reply(x, y, ids, units, arrays, level, _run(context).tree_params())
    declared = data.declare("train", {"n": ""}, sets)
    return _reply(msg, declared, arrays=_arrays(sent), metrics=MetricRecord({"n": len(y)}))


@app.train()
def train(msg: Message, context: Context) -> Message:
    data = _data(context, msg)
    x, y = _model_split(msg, context, data, held_out=False)
    # the model's arrays to and from Flower's records with their headers kept (common.npy), never through torch
    # tensors (the training step converts what it trains)
    trained, train_metrics = compute.train_step(x, y, decode_all(msg.content["arrays"]),  # type: ignore[arg-type]
                                                msg.content["config"])  # type: ignore[arg-type]
    declared = data.declare("train", {"num-examples": ""}, _groups(data, context, agreements.selected(context, msg)))
    return _reply(msg, declared, arrays=ArrayRecord({k: encode(v) for k, v in trained.items()}),
                  metrics=MetricRecord(train_metrics))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on the held-out split, or (``split = "all"``, external validation of a model this
    site did not train) on every usable case."""
    config = msg.content["config"]
    data = _data(context, msg)
    part = "all" if str(config.get("split", "")) == "all" else "test"
    x, y = _model_split(msg, context, data, held_out=None if part == "all" else True)
    family = compute.family_of(config)  # type: ignore[arg-type]
    prob = compute.scores(x, decode_all(msg.content["arrays"]), family)
    where = parse_cv_tag(agreements.cohort(msg))
    if where is not None and part == "test":  # kept for the out-of-fold evaluation over every case
        held = np.array(data.table.case_ids, dtype=object)[data.held_out]
        outoffold.keep(nodestate.of(context), family, where[0], [str(c) for c in held], prob)
    # every statistic, histogram group and decision step is over the part's cases or one of its classes
    result, curves = compute.evaluation(y, prob, float(config["pos-weight"]),  # type: ignore[arg-type]
                                        steps.min_cases(data.site, _run(context)), _run(context))
    return _reply(msg, data.declare(part, {"num-examples": ""}), metrics=MetricRecord(result),
                  arrays=_arrays(curves))


@app.query("compare")
def compare(msg: Message, context: Context) -> Message:
    """Paired comparison of the run's families: every family's model of the cohort scores the same evaluation
    cases (held-out split, or every usable case at a site outside the cohort); the AUCs, their paired DeLong
    covariance and the Brier sums leave, no score."""
    config, data = msg.content["config"], _data(context, msg)
    part = "all" if str(config.get("split", "")) == "all" else "test"
    x, y = _model_split(msg, context, data, held_out=None if part == "all" else True, receipt=False)
    names = _run(context).compared
    sent = decode_all(msg.content["arrays"])  # type: ignore[union-attr]
    rows = np.array([compute.scores(x, {k.split("|", 1)[1]: v for k, v in sent.items() if k.startswith(f"{f}|")}, f)
                     for f in names])
    arrays, counts = compute.compare_reply(y, rows, steps.min_cases(data.site, _run(context)))
    return _reply(msg, data.declare(part, {"num-examples": "", "n-hgg": "hgg", "n-bm": "bm"}),
                  arrays=_arrays(arrays), metrics=MetricRecord(counts))


@app.query("out_of_fold")
def out_of_fold(msg: Message, context: Context) -> Message:
    """Cross-validation's internal validation: every usable case scored by the model of the fold that held it
    out (with repeats, its mean score over them), evaluated together (counts, AUC, curves over all cases; no
    score leaves)."""
    data = _data(context, msg)
    prob = outoffold.mean_scores(nodestate.of(context), compute.family_of(msg.content["config"]),  # type: ignore[arg-type]
                                 data.table.case_ids, _run(context).cv_repeats)
    result, curves = compute.evaluation(data.table.labels, prob, float(msg.content["config"]["pos-weight"]),  # type: ignore[arg-type]
                                        steps.min_cases(data.site, _run(context)), _run(context))
    return _reply(msg, data.declare("all", {"num-examples": ""}), metrics=MetricRecord(result),
                  arrays=_arrays(curves))


@app.query("compare_out_of_fold")
def compare_out_of_fold(msg: Message, context: Context) -> Message:
    """Cross-validation's paired comparison of the run's families: one repeat's out-of-fold scores of every usable
    case (each from the model of the fold that held it out); the AUCs, their paired DeLong covariance and the Brier
    sums leave, no score. The cases are the main cohort's training set (all usable cases), by class."""
    data = _data(context, msg)
    repeat = int(msg.content["config"]["repeat"])  # type: ignore[arg-type, index]
    if not 0 <= repeat < _run(context).cv_repeats:
        raise SiteError(f"the server asked for cross-validation repeat {repeat}, which this run (cv-repeats = "
                        f"{_run(context).cv_repeats}) does not have; restart the run")
    arrays, counts = outoffold.compare_reply(nodestate.of(context), _run(context).compared, data.table.case_ids,
                                             data.table.labels, repeat, steps.min_cases(data.site, _run(context)))
    return _reply(msg, data.declare("all", {"num-examples": "", "n-hgg": "hgg", "n-bm": "bm"}),
                  arrays=_arrays(arrays), metrics=MetricRecord(counts))


@app.query("recalibrate")
def recalibrate(msg: Message, context: Context) -> Message:
    """One round of the calibration fit of a model, on the cases its evaluation scored (the held-out split, or
    ``split = "all"``: every usable case at a site outside the cohort, a leave-one-site-out fold's held-out site):
    gradient and Hessian of y ~ a + b logit(p) at the server's (a, b)."""
    config, data = msg.content["config"], _data(context, msg)
    part = "all" if str(config.get("split", "")) == "all" else "test"
    x, y = _model_split(msg, context, data, held_out=None if part == "all" else True, receipt=False)
    state = decode_all(msg.content["arrays"])
    params = np.array([float(config["intercept"]), float(config["slope"])])  # type: ignore[arg-type, index]
    sent = compute.recalibrate_step(x, y, state, params, steps.min_cases(data.site, _run(context)),
                                    compute.family_of(config))  # type: ignore[arg-type]
    return _reply(msg, data.declare(part, {"n": ""}),
                  arrays=_arrays({"gradient": sent["gradient"], "hessian": sent["hessian"]}),
                  metrics=MetricRecord({"n": sent["n"], "loss": sent["loss"]}))


@app.query("calibration_fit")
def calibration_fit(msg: Message, context: Context) -> Message:
    """The whole calibration fit of a model over every usable case, at a site that is a cohort of its own (a
    leave-one-site-out fold's held-out site): the fit only leaves, not its rounds' sums."""
    config, data = msg.content["config"], _data(context, msg)
    x, y = _model_split(msg, context, data, held_out=None, receipt=False)
    fit = compute.calibration_fit(x, y, decode_all(msg.content["arrays"]), steps.min_cases(data.site, _run(context)),
                                  compute.family_of(config), int(config["max-rounds"]))  # type: ignore[arg-type]
    return _reply(msg, data.declare("all", {"n": ""}), metrics=MetricRecord(fit))  # type: ignore[arg-type]


@app.query("histograms")
def histograms(msg: Message, context: Context) -> Message:
    """Harmonisation before/after, for the report: k-anonymous histograms of a few features."""
    if _run(context).dp_query:
        raise SiteError("the query phases are noised in this run (dp-query-noise-multiplier): histograms are "
                        "withheld")
    names = agreements.accept(context, msg, "histogram-features", "histogram-features")  # type: ignore[arg-type]
    edges = decode(msg.content["arrays"]["edges"])  # type: ignore[union-attr]
    agreements.record(context, msg)["histogram-bins"] = int(edges.shape[1]) - 1
    data = _data(context, msg)
    raw, _ = steps.site_matrix(data, agreements.agreed(context, msg), held_out=False, names=names)
    harmonized, _ = steps.site_matrix(data, agreements.agreed(context, msg), held_out=False, names=names,
                                      harmonize=_harmonizer(context, msg))
    counts = compute.histograms_reply(raw, harmonized, edges, steps.min_cases(data.site, _run(context)))
    return _reply(msg, data.declare("train", {"n": ""}), arrays=_arrays(counts), metrics=MetricRecord({"n": len(raw)}))


@app.query("robustness")
def robustness(msg: Message, context: Context) -> Message:
    """Robustness filter: ICC sums of the agreed features over the training split, originals and the profile's
    perturbed copies (extracted now or from the site's cache); only the per-feature sums and n leave."""
    from client.robustness import robustness_reply  # imported here: only runs that turn the filter on pay for it

    agreed = agreements.accept(context, msg, "features", "features")  # type: ignore[arg-type]
    data = _data(context, msg)
    arrays, n = robustness_reply(data, agreed)
    return _reply(msg, data.declare("train", {"n": ""}), arrays=_arrays(arrays), metrics=MetricRecord({"n": n}))
