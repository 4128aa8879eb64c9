"""Training the shared model on a federation's admitted sites, used by the main run and by each
leave-one-site-out fold. Two modes produce the same model format:

- ``fedavg``: rounds of local epochs averaged by FedAvg (server/strategy.py);
- ``exact``: Newton steps on gradients and Hessians summed over sites (common/exact.py): the pooled
  maximum-likelihood fit, reached in a few rounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common import covariates, dp_query, exact, families, newton_start, protocol, selection
from common.canon import arrays_sha256, sha256_json
from common.npy import decode
from common.runconfig import RunConfig
from server import clinical, phases
from server.federation import Cohort, Run, RunRefused
from server.phases import PooledMoments
from server.strategy import AuditedFedAvg, evaluation_records, record_sha256

log = logging.getLogger("flwr.radfed.server")


@dataclass
class Trained:
    """The final global model and what each site reported on the way (by round, then site)."""

    arrays: ArrayRecord
    training: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    evaluations: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    curves: dict[int, dict[str, dict[str, object]]] = field(default_factory=dict)
    terms: dict[int, dict[str, clinical.Terms]] = field(default_factory=dict)  # pooled clinical metrics' terms
    info: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class WarmStart:
    """An exact fit to start another cohort's exact fit of the same family from (a leave-one-site-out fold starts
    from the main run's model): its inputs, and its coefficients in its own standardisation."""

    names: tuple[str, ...]
    coef: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def of(cls, trained: Trained, names: list[str]) -> WarmStart | None:
        """``trained``'s model as a start, or None when it was not an exact fit (FedAvg, trees)."""
        if trained.info.get("mode") != "exact":
            return None
        coef, mean, scale = exact.from_state_dict(trained.arrays.to_torch_state_dict())
        return cls(tuple(names), coef, mean, scale)

    def coefficients(self, names: list[str], mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The start on ``names`` standardised with (mean, scale) (common.exact.restandardise)."""
        return exact.restandardise(self.coef, self.names, self.mean, self.scale, names, mean, scale)


def shared_config(chosen: selection.Selection, pos_weight: float, family: str = "logistic-l2") -> dict[str, object]:
    """What every train and evaluate message carries: the class weight, the model's feature list and family."""
    return {"pos-weight": pos_weight, "features": chosen.names, "features-sha256": sha256_json(chosen.names),
            "family": family}


def initial_arrays(family: str, mean: np.ndarray, scale: np.ndarray, cfg: RunConfig) -> ArrayRecord:
    """A family's starting model standardising with the pooled mean and scale (s,): zero weights for the linear
    families, the split-seed's Glorot draw for the mlp (zero weights would keep its hidden units identical)."""
    if families.base(family) == "mlp":
        from common import mlp  # torch module of the mlp family

        return ArrayRecord({k: Array(v) for k, v in mlp.initial_arrays(mean, scale, cfg.mlp_hidden,
                                                                       cfg.split_seed).items()})
    from common import model  # torch: FedAvg's starting model only (exact training fits in numpy)

    return ArrayRecord(model.build_model(mean, scale).state_dict())


def select_l1(run: Run, cohort: Cohort, pooled: PooledMoments, chosen: selection.Selection) -> selection.Selection:
    """Optional LASSO step of feature selection (``select-l1`` > 0), as in the radiomics literature: the exact
    federated L1-penalised logistic regression on the ranked, decorrelated candidates (the pooled fit, by Newton
    rounds on summed gradients and Hessians); the features whose coefficient is exactly zero leave."""
    l1 = run.config.select_l1
    if l1 <= 0 or not chosen.names:
        return chosen
    index = {n: i for i, n in enumerate(phases.model_inputs(run, cohort.agreement))}
    cols = [index[n] for n in chosen.names]
    lasso = run.config.model_copy(update={"exact_l1": l1})
    fit = _train_exact(run, cohort, chosen, lasso, pooled.mean[cols], pooled.std[cols], evaluate_rounds=False,
                       stage="lasso")
    coef, _, _ = exact.from_state_dict(fit.arrays.to_torch_state_dict())
    weights = dict(zip(chosen.names, coef[1:].tolist(), strict=True))
    # the clinical inputs (model-covariates) stay whatever their coefficient: selection never drops them
    kept = [i for i, n in enumerate(chosen.names) if weights[n] != 0.0 or covariates.is_clinical(n)]
    if not kept:
        raise RunRefused(f"select-l1 = {l1} set every candidate's coefficient to zero: lower it (or set it to 0)")
    result = replace(chosen, names=[chosen.names[i] for i in kept], t=[chosen.t[i] for i in kept],
                     dropped_l1=len(chosen.names) - len(kept), l1=l1)
    run.audit.append("selection-l1", l1=l1, coefficients=weights, features=result.names,
                     dropped=[n for n in chosen.names if n not in result.names], rounds=fit.info.get("rounds"),
                     converged=fit.info.get("converged"), features_sha256=sha256_json(result.names), **cohort.tag)
    log.info("LASSO (select-l1 = %g) kept %d of %d feature(s)", l1, len(kept), len(chosen.names))
    return result


def mode(family: str, cfg: RunConfig) -> str:
    """How a family is fitted: "exact" (Newton rounds on summed gradients and Hessians), "fedavg", or "gbt" (trees
    grown level by level from summed histograms, server/trees.py).

    logistic-l2 follows ``training``; logistic-l1 is always the exact proximal-Newton fit; svm and mlp are always
    FedAvg. (An exact generalised-Newton fit of the squared hinge would sum x xᵀ over only the cases inside the
    margin, a set that changes every round: two rounds' Hessians would differ by the outer products of the few
    cases that crossed it, i.e. single patients' features. FedAvg sends only the model, as for logistic-l2.)"""
    family = families.base(family)  # a variant (e.g. logistic-l2:radiomics-only) is fitted as its family
    if family == "gbt":
        return "gbt"
    if family == "logistic-l1" or (family == "logistic-l2" and cfg.training == "exact"):
        return "exact"
    return "fedavg"


def train(run: Run, cohort: Cohort, pooled: PooledMoments, chosen: selection.Selection,
          evaluate_rounds: bool = True, family: str = "logistic-l2", warm: WarmStart | None = None) -> Trained:
    """Train one family from its starting model standardising with the pooled moments (see ``mode``). ``warm``:
    an exact fit's first Newton round evaluates there instead of at zero (not when the rounds are noised, which
    run ``exact-max-rounds`` rounds whatever the start); the fit converges to the same optimum in fewer rounds."""
    cfg = run.config
    if family == "gbt":  # gradient-boosted trees from histograms (server/trees.py imports this module)
        from server.trees import train_trees

        return train_trees(run, cohort, pooled, chosen, evaluate_rounds)
    index = {n: i for i, n in enumerate(phases.model_inputs(run, cohort.agreement))}
    cols = [index[n] for n in chosen.names]
    initial = initial_arrays(family, pooled.mean[cols], pooled.std[cols], cfg)
    how = mode(family, cfg)
    tag = {**cohort.tag, "family": family} if len(cfg.compared) > 1 else cohort.tag
    start, kind = exact_start(run, cohort, pooled, chosen, family, warm)
    started = {} if start is None else {f"{kind}_start_sha256": arrays_sha256({"coef": start})}
    run.audit.append("model-init", model_sha256=record_sha256(initial), n_features=len(chosen.names),
                     training=how, **started, **tag)
    run.training_started = True
    if how == "exact":
        fit_cfg = cfg.model_copy(update={"exact_l1": cfg.model_l1}) if families.base(family) == "logistic-l1" else cfg
        trained = _train_exact(run, cohort, chosen, fit_cfg, pooled.mean[cols], pooled.std[cols], evaluate_rounds,
                               family=family, start=start)
        trained.info["family"] = family
        return trained
    strategy = AuditedFedAvg(cohort.fed, run.audit, fold=cohort.fold, evaluate_rounds=evaluate_rounds,
                             dp_account=run.dp_account, evaluate_every=cfg.evaluate_every,
                             family=tag.get("family", ""))
    shared = shared_config(chosen, cohort.agreement.pos_weight, family)
    train_config = ConfigRecord({**shared, "local-epochs": cfg.local_epochs,  # type: ignore[dict-item]
                                 "learning-rate": cfg.learning_rate, "weight-decay": cfg.weight_decay})
    result = strategy.start(run.grid, initial, num_rounds=cfg.num_server_rounds, timeout=run.timeout,
                            train_config=train_config, evaluate_config=ConfigRecord(shared))  # type: ignore[arg-type]
    return Trained(result.arrays, strategy.site_training, strategy.site_evaluations, strategy.site_curves,
                   strategy.site_terms, {"mode": "fedavg", "family": family})


def exact_start(run: Run, cohort: Cohort, pooled: PooledMoments, chosen: selection.Selection, family: str,
                warm: WarmStart | None = None) -> tuple[np.ndarray | None, str]:
    """Where an exact fit's first Newton round evaluates, and what it is: ``warm`` re-expressed in this cohort's
    standardisation ("warm", loso-warm-start), else the discriminant of the cohort's own pooled moments and
    correlation for the L2 fit ("discriminant", common.newton_start), else zero (None). Never when the rounds are
    noised (they run exact-max-rounds whatever the start)."""
    cfg = run.config
    if mode(family, cfg) != "exact" or cfg.dp_query or not chosen.names:
        return None, ""
    index = {n: i for i, n in enumerate(phases.model_inputs(run, cohort.agreement))}
    cols = [index[n] for n in chosen.names]
    mean, std = pooled.mean[cols], pooled.std[cols]
    if warm is not None:
        return warm.coefficients(chosen.names, mean, std), "warm"
    read = chosen.correlation
    if families.base(family) != "logistic-l2" or read is None or not set(chosen.names) <= set(read[0]):
        return None, ""  # e.g. a clinical input: the selection read no correlation of it
    at = [read[0].index(n) for n in chosen.names]
    (n1, mean1, _), (n0, mean0, _) = pooled.classwise[1], pooled.classwise[0]
    start = newton_start.discriminant_start((mean1[cols] - mean) / std, (mean0[cols] - mean) / std, n1, n0,
                                            read[1][np.ix_(at, at)], cohort.agreement.pos_weight)
    return (None, "") if start is None else (start, "discriminant")


def _site_terms(content: RecordDict, noised: bool) -> exact.SiteTerms:
    """One site's Newton reply; a noised one holds only the gradient and Hessian (its counts stay at the site)."""
    grad, hess = decode(content["arrays"]["grad"]), decode(content["arrays"]["hess"])  # type: ignore[arg-type]
    if noised:
        return exact.SiteTerms(grad=grad, hess=hess, loss=0.0, n=0, n_pos=0, n_neg=0)
    metrics = content["metrics"]
    return exact.SiteTerms(grad=grad, hess=hess, loss=float(metrics["loss"]), n=int(metrics["n"]),  # type: ignore[arg-type]
                           n_pos=int(metrics["n-hgg"]), n_neg=int(metrics["n-bm"]))  # type: ignore[arg-type]


def _newton_request(config: dict[str, object], rnd: int, coef: np.ndarray, mean: np.ndarray,
                    scale: np.ndarray) -> tuple[dict[str, object], RecordDict]:
    """Newton round ``rnd``'s config and arrays (the coefficients and the standardisation)."""
    record = RecordDict({"arrays": ArrayRecord({"coef": Array(coef), "mean": Array(mean), "scale": Array(scale)})})
    return {**config, "server-round": rnd}, record


def prefetch_first_round(run: Run, cohort: Cohort, pooled: PooledMoments, chosen: selection.Selection,
                         family: str) -> None:
    """Exact training's first Newton round of ``family`` on ``chosen`` (at ``exact_start``'s point, known from the
    moments and the selection, so it waits for nothing) goes out with the cohort's next query (merge-phases,
    server/merging.py); other modes send nothing."""
    if mode(family, run.config) != "exact" or not chosen.names:
        return
    index = {n: i for i, n in enumerate(phases.model_inputs(run, cohort.agreement))}
    cols = [index[n] for n in chosen.names]
    start, _ = exact_start(run, cohort, pooled, chosen, family)  # where train's first round evaluates (no warm start
    coef = np.zeros(len(chosen.names) + 1) if start is None else start  # in the main run, which prefetches)
    request, record = _newton_request(shared_config(chosen, cohort.agreement.pos_weight, family), 1, coef,
                                      pooled.mean[cols], pooled.std[cols])
    cohort.prefetch(run, protocol.NEWTON, request, per_node=lambda _: record)


def _train_exact(run: Run, cohort: Cohort, chosen: selection.Selection, cfg: RunConfig, mean: np.ndarray,
                 scale: np.ndarray, evaluate_rounds: bool, stage: str = "", family: str = "logistic-l2",
                 start: np.ndarray | None = None) -> Trained:
    """Newton rounds from ``start`` (default zero) until the step is below ``exact-tol`` (or ``exact-max-rounds``),
    then one evaluation. ``cfg`` is the run's config, or a copy with the LASSO penalty (``stage = "lasso"``, or the
    logistic-l1 family's ``model-l1``)."""
    tag = {**cohort.tag, **({"stage": stage} if stage else {}),
           **({"family": family} if len(run.config.compared) > 1 and not stage else {})}
    pos_weight = cohort.agreement.pos_weight
    noised = cfg.dp_query  # noised gradients and Hessians, no loss and no counts (common/dp_query.py)
    newton = exact.ExactNewton(len(chosen.names), l2=cfg.exact_l2, l1=cfg.exact_l1, tol=cfg.exact_tol,
                               max_rounds=cfg.exact_max_rounds, safeguard=not noised, start=start)
    config = shared_config(chosen, pos_weight, family)
    trained = Trained(ArrayRecord())
    while not newton.done:
        rnd = newton.rounds + 1
        request, record = _newton_request(config, rnd, newton.coef, mean, scale)
        replies = cohort.ask(run, "newton", protocol.NEWTON, request, per_node=lambda _, r=record: r, server_round=rnd)
        terms = {cohort.fed.sites[nid]: _site_terms(r.content, noised) for nid, r in replies.items()}
        coef_sent = newton.coef.copy()
        total = exact.sum_terms(terms.values())
        if noised:  # the noise can make the summed Hessian indefinite: its nearest PSD matrix (post-processing)
            total = replace(total, hess=dp_query.psd(total.hess))
        newton.update(total)
        step = newton.history[-1]
        per_site = {s: {**({} if noised else {"n": t.n, "loss": t.loss / t.n}),
                        "update_sha256": arrays_sha256({"grad": t.grad, "hess": t.hess})} for s, t in terms.items()}
        trained.training[rnd] = per_site
        run.audit.append("newton-round", round=rnd, sites=per_site, coef_sha256=arrays_sha256({"coef": coef_sent}),
                     objective=None if noised else step.objective, accepted=step.accepted, noised=noised,
                     optimality=step.info.optimality if step.info else None, **tag)
    state = exact.to_state_dict(newton.coef, mean, scale)
    trained.arrays = ArrayRecord(state)
    final_round = newton.rounds
    trained.info = {"mode": "exact", "rounds": final_round, "converged": newton.converged}
    # the final model takes the place of a FedAvg round's aggregate: receipts of its evaluation match it
    run.audit.append("round-train", round=final_round, sites=trained.training[final_round],
                 aggregated_sha256=record_sha256(trained.arrays), converged=newton.converged, **tag)
    log.info("Exact fit %s after %d round(s)", "converged" if newton.converged else "stopped", final_round)
    if evaluate_rounds:
        evaluate_config = {**shared_config(chosen, pos_weight, family), "server-round": final_round}
        if not cohort.fold and not stage:  # the main run's model: its calibration fit's first round rides along
            clinical.prefetch_calibration(run, cohort, trained.arrays, shared_config(chosen, pos_weight, family))
        replies = cohort.ask(run, "evaluate", protocol.EVALUATE, evaluate_config,
                             per_node=lambda _: RecordDict({"arrays": trained.arrays}), server_round=final_round)
        per_site_eval, site_curves = evaluation_records(cohort.fed.sites, replies.values())
        trained.evaluations[final_round] = per_site_eval
        trained.curves[final_round] = site_curves
        trained.terms[final_round] = clinical.terms_of(cohort.fed.sites, replies.values())
        run.audit.append("round-evaluate", round=final_round, sites=per_site_eval, **tag)
    return trained
