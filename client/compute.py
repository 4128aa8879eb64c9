"""What a site computes for each message of a run, from its matrices (the Flower glue is in client.app, the
site's data and splits in client.steps).

Every function returns only aggregates over the cases it is given; the privacy guard checks them again
before anything leaves.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from client.site import SiteError
from common import (
    clinical,
    combat,
    combat_moments,
    curves,
    delong,
    dp_query,
    exact,
    families,
    metrics,
    moments,
    selection,
)
from common.runconfig import RunConfig


def moments_reply(x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Phase: moments of the training split, overall and per class (standardisation and Welch's t)."""
    n, mean, m2 = moments.site_moments(x)
    arrays = {"mean": mean, "m2": m2}
    counts = {"n": n}
    for label, tag in ((1, "hgg"), (0, "bm")):
        n_c, mean_c, m2_c = moments.site_moments(x[y == label])
        arrays[f"mean-{tag}"], arrays[f"m2-{tag}"], counts[f"n-{tag}"] = mean_c, m2_c, n_c
    return arrays, counts


def correlation_reply(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, int]:
    """Phase: cross-products of the candidates over the training split, standardised with pooled values."""
    return selection.site_crossproducts(x, mean, std), len(x)


def raw_crossproducts(x: np.ndarray) -> np.ndarray:
    """Phase, for the leave-one-site-out folds' correlation: Σ (x − x̄)(x − x̄)ᵀ (m, m) of the candidates x (n, m)
    before ComBat (server/derived_moments.py maps it through each fold's ComBat)."""
    x = np.asarray(x, dtype=np.float64)
    return selection.site_crossproducts(x, x.mean(axis=0), np.ones(x.shape[1]))


def noised_moments_reply(x: np.ndarray, y: np.ndarray, grand_mean: np.ndarray, var_pooled: np.ndarray,
                         run: RunConfig) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Phase, with the query phases noised: per-class count, Σu and Σu² of u = the harmonised features x (n, d)
    standardised with ComBat's pooled estimates (the server's) and clipped, each with Gaussian noise drawn from a
    fresh generator seeded by the operating system."""
    loc, scale = dp_query.reference(grand_mean, var_pooled)
    u = dp_query.clip_standardised(x, loc, scale, run.dp_query_clip)
    return dp_query.private_moments(u, y, run.dp_query_noise_multiplier, run.dp_query_clip, np.random.default_rng())


def noised_correlation_reply(x: np.ndarray, mean: np.ndarray, std: np.ndarray, run: RunConfig) -> np.ndarray:
    """Phase, noised: Σ z zᵀ of the candidates, z standardised with the pooled values and clipped, plus noise."""
    z = dp_query.clip_standardised(x, mean, np.where(std > 0, std, 1.0), run.dp_query_clip)
    return dp_query.private_crossproducts(z, run.dp_query_noise_multiplier, run.dp_query_clip,
                                          np.random.default_rng())


def combat_options(run: RunConfig) -> dict[str, bool]:
    return {"parametric": run.combat_parametric, "eb": run.combat_eb, "mean_only": run.combat_mean_only}


def combat_site_fit(x: np.ndarray, arrays: Mapping[str, np.ndarray], site: int, n_sites: int, n_pooled: int,
                    run: RunConfig, covariates: np.ndarray | None = None) -> combat.SiteCombat:
    """The site's own ComBat location/scale (empirical Bayes), fitted locally on its training split
    against the pooled estimates the server sent (beta holds only this site's row and covariate effects)."""
    rows = np.asarray(arrays["beta"], dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] < 1 or not 0 <= site < n_sites:
        raise SiteError(f"the pooled ComBat estimates sent have rows of shape {rows.shape} for site index {site} of "
                        f"{n_sites}; expected (1 + covariate columns, d) and an index below {n_sites}: restart the run")
    # the fit reads only the covariate effects (beta's rows after the sites'), never a site's intercept: the design
    # as one site column and the covariates' (common.combat.site_rows), not the (sites + p, d) matrix with every other
    # site's row zero, which full_beta built for each fold and site (330 kB at 48 sites) to the same numbers
    pooled = combat.PooledEstimates(n_sites=1, n=n_pooled, beta=rows, grand_mean=arrays["grand-mean"],
                                    var_pooled=arrays["var-pooled"], zero_variance=arrays["zero-variance"] > 0.5)
    return combat.fit_site(x, pooled, covariates, site=site, **combat_options(run))


def combat_fit_from_moments(sums: tuple[int, np.ndarray, np.ndarray], arrays: Mapping[str, np.ndarray], site: int,
                            n_pooled: int, run: RunConfig) -> combat.SiteCombat:
    """``combat_site_fit`` without covariates, from the training split's moments (n, mean (d,), m2 (d,):
    ``moments.site_moments`` of its cases): what the coordinator worked a fold's moments out with
    (server/derived_moments.py), in O(d) per EB iteration."""
    n, mean, m2 = sums
    zero_variance = np.asarray(arrays["zero-variance"]) > 0.5
    grand_mean, var_pooled = np.asarray(arrays["grand-mean"], dtype=np.float64), np.asarray(arrays["var-pooled"],
                                                                                             dtype=np.float64)
    fit = combat_moments.fit_from_sums(n, mean, m2, grand_mean, var_pooled, zero_variance, eb=run.combat_eb,
                                       mean_only=run.combat_mean_only)
    return combat.SiteCombat(site=site, n=n, parametric=True, eb=run.combat_eb, mean_only=run.combat_mean_only,
                             grand_mean=grand_mean.copy(), beta_cov=np.zeros((0, len(mean))),
                             var_pooled=var_pooled.copy(), gamma_star=fit.gamma_star, delta_star=fit.delta_star,
                             unadjusted=fit.unadjusted)


def combat_join_fit(x: np.ndarray, arrays: Mapping[str, np.ndarray], n_sites: int, n_pooled: int, run: RunConfig,
                    covariates: np.ndarray | None = None) -> combat.SiteCombat:
    """A held-out site's own ComBat location/scale against a fold's pooled estimates, from all its usable
    cases x (n, d) and their covariates (n, p), as ``radfed site join`` does after a run."""
    pooled = combat.PooledEstimates.for_joiner(n_sites, n_pooled, arrays["grand-mean"], arrays["var-pooled"],
                                               arrays["beta-cov"], arrays["zero-variance"])
    return combat.fit_site(x, pooled, covariates, **combat_options(run))


def family_of(config: Mapping[str, Any]) -> str:
    """The model family a message's config names (messages without one are logistic-l2, today's model)."""
    return str(config.get("family", "logistic-l2"))


def train_step(x: np.ndarray, y: np.ndarray, arrays: Mapping[str, np.ndarray],
               config: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Each round: local epochs on the training split (x (n, s), y (n,)) from the global model's arrays of the
    config's family (logistic-l2 in torch, common.model; svm and mlp from common.families / common.mlp)."""
    name = families.base(family_of(config))  # a variant (radiomics-only, clinical-only) trains as its family
    options = {"epochs": int(config["local-epochs"]), "lr": float(config["learning-rate"]),
               "weight_decay": float(config["weight-decay"]), "pos_weight": float(config["pos-weight"])}
    if name == "svm":
        trained, loss = families.svm_train_local(arrays, x, y, **options)
        return trained, {"num-examples": len(y), "train-loss": loss}
    if name not in ("logistic-l2", "mlp"):
        raise SiteError(f"the server asked for FedAvg training of family {name!r}, which radfed trains otherwise "
                        "(logistic-l1: exact Newton rounds); restart the run with this radfed on both sides")
    import torch  # FedAvg training only: a site answering queries, Newton rounds or evaluations never loads torch

    # a site's models are tiny (s + 1 weights over tens to hundreds of cases): more threads only contend, and on a
    # busy machine torch's idle threads cost more than the work (a 20-case step took 0.1 ms on one thread, 20 ms at
    # the 90th percentile on two). Flower's simulation sets this through Ray (OMP_NUM_THREADS=1); a deployed
    # ClientApp process does not.
    torch.set_num_threads(1)
    if name == "mlp":
        from common import mlp  # torch model of the mlp family, imported only where it trains

        trained, loss = mlp.train_local(dict(arrays), x, y, **options)
    else:
        from common import model

        trained, loss = model.train_local(arrays, x, y, **options)
    return trained, {"num-examples": len(y), "train-loss": loss}


def newton_step(x: np.ndarray, y: np.ndarray, arrays: Mapping[str, np.ndarray], pos_weight: float, site_name: str,
                run: RunConfig) -> exact.SiteTerms:
    """Exact training, one round: refuse if the training split is too small for the coefficients (the Hessian
    would identify cases), else the summed gradient (s+1,) and Hessian (s+1, s+1) at the server's coefficients."""
    factor = run.exact_min_cases_per_coefficient
    try:
        exact.check_dimensions(len(y), x.shape[1], site_name, factor)
    except ValueError as exc:
        raise SiteError(str(exc)) from None
    if run.dp_query:  # every case's [1, z] bounded, then the summed terms noised (common/dp_query.py)
        z = dp_query.clip_standardised(x, arrays["mean"], arrays["scale"], run.dp_query_clip)
        terms = exact.site_terms(z, y, arrays["coef"], pos_weight)
        grad, hess = dp_query.private_newton(terms.grad, terms.hess, x.shape[1], pos_weight,
                                             run.dp_query_noise_multiplier, run.dp_query_clip, np.random.default_rng())
        return exact.SiteTerms(grad, hess, float("nan"), terms.n, terms.n_pos, terms.n_neg)
    z = (x - arrays["mean"]) / arrays["scale"]
    return exact.site_terms(z, y, arrays["coef"], pos_weight)


def scores(x: np.ndarray, state: Mapping[str, Any], family: str = "logistic-l2") -> np.ndarray:
    """The model's score of HGG (n,) for the cases x (n, s), by its family (common.families)."""
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported: never import it just to check
    arrays = {k: v.detach().numpy() if torch is not None and isinstance(v, torch.Tensor) else np.asarray(v)
              for k, v in state.items()}
    try:
        return families.predict_proba(family, arrays, x)
    except families.FamilyError as exc:
        raise SiteError(f"cannot score the server's model: {exc}") from None


def compare_reply(y: np.ndarray, score_rows: np.ndarray, k: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Paired comparison of the families: each family's AUC (f,), their paired DeLong covariance (f, f), Brier
    sums (f,) and cross sums (f, f) over the evaluation cases y (n,) scored by every family, score_rows (f, n).
    Refuses a class of fewer than k cases (the guard checks it again)."""
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if min(n_pos, n_neg) < k:
        raise SiteError(f"the comparison needs >= k = {k} evaluation cases of each class ({n_pos} HGG, {n_neg} BM)")
    site = delong.site_comparison(y, score_rows)
    return ({"auc": site.auc, "auc-cov": site.cov, "sse": site.sse, "sse-cross": site.cross},
            {"num-examples": len(y), "n-hgg": n_pos, "n-bm": n_neg})


def evaluation(y: np.ndarray, prob: np.ndarray, pos_weight: float, k: int,
               run: RunConfig) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """A model's scores prob (n,) on the site's evaluation cases y (n,), as counts, AUC with its DeLong variance,
    class-weighted log loss, the k-anonymous ROC points (points, 2) and calibration groups (points, 3); and the
    terms of the pooled clinical metrics (common.clinical): the Brier sum, per-class score histograms over the
    run's bins and decision-curve counts at the run's thresholds (both fixed by the run config the site approved)."""
    eps = 1e-12
    weights = np.where(y == 1, pos_weight, 1.0)
    loss = float(np.mean(-weights * (y * np.log(prob + eps) + (1 - y) * np.log(1 - prob + eps))))
    histograms = clinical.site_score_histograms(y, prob, clinical.score_edges(run.score_bins), k)
    decision = clinical.site_decision_counts(y, prob, clinical.decision_thresholds(run.decision_thresholds), k)
    result = {"num-examples": len(y), **metrics.confusion_counts(y, prob), "auc": metrics.roc_auc(y, prob),
              "auc-var": metrics.delong_variance(y, prob), "loss": loss,
              "sse": clinical.site_brier_terms(y, prob, k)["sse"]}
    return result, {"roc": curves.roc_points(y, prob, k, run.curve_points),
                    "calibration": curves.calibration_groups(y, prob, k, run.curve_points),
                    "score-start": histograms["start"], "score-end": histograms["end"],
                    "decision": decision["tp_fp"], "decision-kept": decision["kept"],
                    "decision-totals": decision["n_pos_neg"]}


def recalibrate_step(x: np.ndarray, y: np.ndarray, state: Mapping[str, Any], params: np.ndarray,
                     k: int, family: str = "logistic-l2") -> dict[str, Any]:
    """One round of the federated calibration fit: the final model's scores on the held-out cases, and the
    gradient and Hessian of y ~ a + b logit(p) there at the server's (a, b)."""
    return clinical.site_recalibration_terms(y, scores(x, state, family), params, k)


def calibration_fit(x: np.ndarray, y: np.ndarray, state: Mapping[str, Any], k: int, family: str,
                    max_rounds: int) -> dict[str, float]:
    """The calibration fit of the model at this site alone (a cohort of one): common.clinical.fit_recalibration's
    Newton on this site's own terms, the same fit the federated rounds give for one site, number for number."""
    prob = scores(x, state, family)
    fit = clinical.fit_recalibration(lambda params: [clinical.site_recalibration_terms(y, prob, params, k)],
                                     max_rounds=max_rounds)
    return {"n": int(fit["n"]), "intercept": fit["intercept"], "slope": fit["slope"],
            "intercept-se": fit["intercept_se"], "slope-se": fit["slope_se"], "loss": fit["loss"],
            "rounds": int(fit["rounds"]), "converged": int(fit["converged"])}


def histograms_reply(x_raw: np.ndarray, x_harmonized: np.ndarray, edges: np.ndarray,
                     k: int) -> dict[str, np.ndarray]:
    """Counts per bin (h, b) of h features before and after harmonisation, every count 0 or >= k.

    ``edges`` (h, b + 1) are the server's; x arrays (n, h) hold the same training cases."""
    return {"before": np.array([curves.k_histogram(x_raw[:, j], edges[j], k) for j in range(len(edges))]),
            "after": np.array([curves.k_histogram(x_harmonized[:, j], edges[j], k) for j in range(len(edges))])}
