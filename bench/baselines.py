"""Comparison baselines on the same features, splits, standardisation rule and model as the federation.

For benchmarks only: these read every site's features into one process, which a real federation
never does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.compute import combat_options
from client.steps import Harmonizer, SiteData, load_site_data, run_config, site_matrix
from common import combat, exact, metrics, model, moments


def load_sites(site_dirs: list[Path], run_config: Mapping[str, Any]) -> dict[str, SiteData]:
    return {d.name: load_site_data(d, run_config) for d in site_dirs}


def agreed_features(sites: dict[str, SiteData]) -> list[str]:
    """What the features phase agrees on: names finite at every case of every site."""
    common: set[str] | None = None
    for data in sites.values():
        finite = {n for n, ok in zip(data.table.names, np.all(np.isfinite(data.table.values), axis=0), strict=True)
                  if ok}
        common = finite if common is None else common & finite
    return sorted(common or [])


def _fit(xs: list[np.ndarray], ys: list[np.ndarray], steps: int, config: Mapping[str, Any]) -> model.RadiomicsLogistic:
    mean, std = moments.pooled_mean_std(*zip(*(moments.site_moments(x) for x in xs), strict=True))
    scale = np.where(std <= 1e-9 * np.maximum(1.0, np.abs(mean)), 1.0, std)
    y = np.concatenate(ys)
    pos_weight = float((y == 0).sum() / max((y == 1).sum(), 1))
    if str(config.get("training", "fedavg")) == "exact":  # the federation's exact fit, on the data in one place
        z = (np.vstack(xs) - mean) / scale
        fit = exact.fit_exact([(z, y)], pos_weight, l2=float(config["exact-l2"]), l1=float(config["exact-l1"]),
                              tol=float(config["exact-tol"]), max_rounds=int(config["exact-max-rounds"]))
        return model.model_from_state(exact.to_state_dict(fit.coef, mean, scale))
    import torch  # FedAvg's baseline only

    start = {k: v.numpy() for k, v in model.build_model(mean, scale).state_dict().items()}
    trained, _ = model.train_local(start, np.vstack(xs), y, epochs=steps, lr=float(config["learning-rate"]),
                                   weight_decay=float(config["weight-decay"]), pos_weight=pos_weight)
    return model.model_from_state({k: torch.from_numpy(v) for k, v in trained.items()})


def _evaluate(net: model.RadiomicsLogistic, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    prob = model.predict_proba(net, x)
    return {**metrics.confusion_counts(y, prob), "auc": metrics.roc_auc(y, prob), "n": len(y)}


def harmonizers(sites: dict[str, SiteData], agreed: list[str], config: Mapping[str, Any]) -> list[Harmonizer | None]:
    """Per site, what the run applies: d-ComBat fitted on the training splits (as the federation does), or
    nothing when the run config turns harmonisation off."""
    if str(config.get("harmonization", "none")) != "combat":
        return [None] * len(sites)
    train = [site_matrix(d, agreed, held_out=False)[0] for d in sites.values()]
    _, params = combat.federated_combat(train, **combat_options(run_config(config)))
    return [p.apply for p in params]


def pooled_centralised(sites: dict[str, SiteData], names: list[str], config: Mapping[str, Any]) -> dict[str, float]:
    """One model on all training splits together (the exact pooled fit, or with FedAvg rounds x local epochs
    full-batch steps, as the run config trains), on the same harmonised
    features as the run; held-out metrics per site combined."""
    steps = int(config["num-server-rounds"]) * int(config["local-epochs"])
    agreed = agreed_features(sites)
    fns = harmonizers(sites, agreed, config)
    train = [site_matrix(d, agreed, False, names, h) for d, h in zip(sites.values(), fns, strict=True)]
    net = _fit([x for x, _ in train], [y for _, y in train], steps, config)
    return metrics.combine_sites([_evaluate(net, *site_matrix(d, agreed, True, names, h))
                                  for d, h in zip(sites.values(), fns, strict=True)])


def local_only(sites: dict[str, SiteData], names: list[str], config: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Each site alone, on raw features (a single site has no one to harmonise with): its model on its own
    held-out split (internal) and on every other site's (external)."""
    steps = int(config["num-server-rounds"]) * int(config["local-epochs"])
    out = {}
    for name, data in sites.items():
        x, y = site_matrix(data, names, held_out=False)
        net = _fit([x], [y], steps, config)
        internal = _evaluate(net, *site_matrix(data, names, held_out=True))
        external = metrics.combine_sites([_evaluate(net, *site_matrix(d, names, held_out=True))
                                          for other, d in sites.items() if other != name])
        out[name] = {"internal_auc": internal["auc"], "external_auc": external["auc"]}
    return out


def _all_cases(data: SiteData, agreed: list[str], names: list[str], fn: Harmonizer | None) -> tuple[
        np.ndarray, np.ndarray]:
    return site_matrix(data, agreed, None, names, fn)


def fold_harmonizers(sites: dict[str, SiteData], agreed: list[str], config: Mapping[str, Any], held: str,
                     leak_free: bool = True) -> dict[str, Harmonizer | None]:
    """Per site, the ComBat adjustment a leave-one-site-out fold applies. ``leak_free`` (radfed's protocol since
    protocol 3): pooled estimates from the fold's training sites only, and the held-out site joins them from
    all its cases; otherwise (the protocol before): one fit on every site's training split, held-out included."""
    if str(config.get("harmonization", "none")) != "combat":
        return {s: None for s in sites}
    fitted_on = [s for s in sites if s != held] if leak_free else list(sites)
    xs = [site_matrix(sites[s], agreed, held_out=False)[0] for s in fitted_on]
    means = combat.pool_moments([combat.site_moments(x, i, len(xs)) for i, x in enumerate(xs)])
    pooled = combat.pool_residuals(means, [combat.site_residuals(x, means, i) for i, x in enumerate(xs)])
    options = combat_options(run_config(config))
    fns: dict[str, Harmonizer | None] = {s: combat.fit_site(x, pooled, site=i, **options).apply
                                         for i, (s, x) in enumerate(zip(fitted_on, xs, strict=True))}
    if leak_free:
        fns[held] = combat.join_site(site_matrix(sites[held], agreed, held_out=None)[0], pooled, **options)[1].apply
    return fns


def pooled_loso(sites: dict[str, SiteData], fold_names: Mapping[str, list[str]], config: Mapping[str, Any],
                leak_free: bool = True) -> dict[str, dict[str, float]]:
    """Leave-one-site-out, pooled: one model on the other sites' training splits together (the fold's own
    features), scored on every case of the held-out site; harmonised as ``fold_harmonizers`` says."""
    steps = int(config["num-server-rounds"]) * int(config["local-epochs"])
    agreed = agreed_features(sites)
    out = {}
    for held, names in fold_names.items():
        fns = fold_harmonizers(sites, agreed, config, held, leak_free)
        train = [site_matrix(d, agreed, False, names, fns[s]) for s, d in sites.items() if s != held]
        net = _fit([x for x, _ in train], [y for _, y in train], steps, config)
        out[held] = _evaluate(net, *_all_cases(sites[held], agreed, names, fns[held]))
    return out


def local_at_other_sites(sites: dict[str, SiteData], names: list[str],
                         config: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per site s: the mean AUC and balanced accuracy (threshold 0.5) at s (all its cases) of the models each
    other site trained alone (raw features)."""
    steps = int(config["num-server-rounds"]) * int(config["local-epochs"])
    nets = {s: _fit([site_matrix(d, names, held_out=False)[0]], [site_matrix(d, names, held_out=False)[1]], steps,
                    config) for s, d in sites.items()}
    out = {}
    for s, d in sites.items():
        scored = [_evaluate(nets[t], *site_matrix(d, names, None)) for t in sites if t != s]
        out[s] = {"auc": float(np.mean([r["auc"] for r in scored])),
                  "balanced_accuracy": float(np.mean([metrics.rates(r)["balanced_accuracy"] for r in scored]))}
    return out
