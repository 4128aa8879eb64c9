"""The query phases of fitting a model: plan, features, moments, selection, histograms (ComBat's: server.harmonization).

Each phase asks a cohort's sites one question (server.federation.Cohort.ask), records what came back in
the audit log, and returns only what the next phase needs. Sites that fail are named and dropped; the run
stops with a clear message when fewer than ``min-sites`` remain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from common import dp_query, moments, protocol, selection
from common.canon import arrays_sha256, sha256_json
from common.npy import decode
from server.federation import Cohort, FeatureAgreement, Federation, Run, RunRefused, error_reason, query, replies_of

log = logging.getLogger("flwr.radfed.server")



def plan_phase(run: Run, node_ids: list[int], plan_hash: str) -> Federation:
    """Every site states the run plan it approved, its profile hash and case counts; a site that did not
    approve the plan is refused (and named in the audit log); any profile mismatch refuses the run."""
    audit, profile = run.audit, run.profile
    fed = Federation({nid: f"node {nid}" for nid in node_ids}, run.config.min_sites)
    plan = {"protocol": protocol.PROTOCOL_VERSION, "profile-sha256": profile.sha256, "plan-sha256": plan_hash,
            "run-config-sha256": sha256_json(run.config.as_dict())}
    sent = query(run.grid, node_ids, protocol.PLAN, plan, run.timeout)
    for node_id, reply in sent.items():
        refusing = protocol.refusing_site(error_reason(reply)) if reply.has_error() else None
        if refusing is not None:  # named by the site itself: it refused before sending anything else
            fed.sites[node_id] = refusing
            audit.append("refusal", node=node_id, site=refusing, reason=error_reason(reply), plan_sha256=plan_hash)
    replies = replies_of(fed, audit, "plan", sent)
    mismatched = []
    for node_id, reply in replies.items():
        cfg, counts = reply.content["config"], reply.content["metrics"]
        name = str(cfg["site-name"])
        fed.sites[node_id] = name
        site_counts = {k: int(v) for k, v in counts.items()}  # type: ignore[arg-type]
        info = {"site": name, "profile_sha256": str(cfg["profile-sha256"]),
                "profile_version": str(cfg["profile-version"]), "pyradiomics": str(cfg["pyradiomics"]),
                "protocol": str(cfg["protocol"]), "counts": site_counts,
                "plan_sha256": str(cfg.get("plan-sha256", "")), "approval": str(cfg.get("approval", ""))}
        audit.append("site-plan", **info)
        if info["approval"] == "off":
            log.warning("Site %s runs WITHOUT approving the run plan (require_approval: false): development only",
                        name)
        if info["protocol"] != protocol.PROTOCOL_VERSION:
            fed.drop(audit, node_id, "plan", f"speaks protocol {info['protocol']}, the server "
                     f"{protocol.PROTOCOL_VERSION}: update radfed at this site")
        elif info["plan_sha256"] != plan_hash:
            fed.drop(audit, node_id, "plan", f"site {name} computed run plan {info['plan_sha256'][:12]}, the server "
                     f"{plan_hash[:12]}: the code or run config it runs differs from the coordinator's")
        elif info["profile_sha256"] != profile.sha256:
            mismatched.append(f"{name} (profile hash {info['profile_sha256'][:12]}, version "
                              f"{info['profile_version']})")
            audit.append("refusal", site=name, reason="profile hash mismatch",
                         site_profile_sha256=info["profile_sha256"], federation_profile_sha256=profile.sha256)
        elif str(cfg["status"]) != "ok":
            fed.drop(audit, node_id, "plan", str(cfg["reason"]))
        else:
            fed.counts[name] = site_counts
    if mismatched:
        raise RunRefused(
            f"refusing to train: site(s) {', '.join(mismatched)} extract with a different profile than the "
            f"federation's {profile.name} v{profile.version} (hash {profile.short_hash}). Fix: use the "
            "federation's profile at those sites (remove the 'profile' override from their site.yaml).")
    fed.require_enough("the plan phase")
    return fed


def features_phase(run: Run, fed: Federation) -> FeatureAgreement:
    """Sites extract (or load their cache) and report which features are finite at all their cases."""
    replies = Cohort(fed, FeatureAgreement([], "", 1.0, {})).ask(run, "features", protocol.FEATURES, {})
    site_features, split_counts = {}, {}
    for node_id, reply in replies.items():
        site_features[fed.sites[node_id]] = frozenset(str(n) for n in reply.content["config"]["features"])  # type: ignore[union-attr]
        split_counts[fed.sites[node_id]] = {k: int(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
    agreement = FeatureAgreement.of(site_features, split_counts)
    if not agreement.names:
        raise RunRefused("the sites share no usable feature; check the extraction error reports at the sites")
    run.audit.append("features-agreed", n_features=len(agreement.names), features_sha256=agreement.sha256,
                     split_counts=split_counts)
    return agreement


def model_inputs(run: Run, agreement: FeatureAgreement) -> list[str]:
    """What the moments cover and the model may take: the agreed radiomics features, then the clinical inputs
    (``model-covariates``: clinical/age, clinical/sex=M), which ComBat never adjusts and selection always keeps."""
    return [*agreement.names, *run.config.clinical_inputs]


Moments = tuple[int, np.ndarray, np.ndarray]  # n, mean (d,), m2 (d,)
SiteMoments = tuple[Moments, dict[int, Moments]]  # overall, and per class (1 HGG, 0 BM)


@dataclass
class PooledMoments:
    """Pooled over every site's training split: n, mean (d,), std (d,), and per class (n, mean, m2)."""

    n: int
    mean: np.ndarray
    std: np.ndarray
    classwise: dict[int, tuple[int, np.ndarray, np.ndarray]]
    site_share: np.ndarray | None = None  # (d,) variation between sites (moments.site_share); None when noised
    # each site's per-class moments before ComBat, by site name, when the main run asked for them ("raw-classes"):
    # a leave-one-site-out fold works its moments out from them and the main run's ComBat sums (server.derived_moments)
    raw_classwise: dict[str, dict[int, Moments]] = field(default_factory=dict)


def moments_phase(run: Run, cohort: Cohort,
                  harmonization: Callable[[int], RecordDict] | None = None,
                  reference: dict[str, object] | None = None,
                  derived: Callable[[str], SiteMoments] | None = None, raw_classes: bool = False) -> PooledMoments:
    """Pooled mean/std of every agreed feature, and class-wise moments, from per-site moments.

    With ``harmonization`` (the pooled ComBat estimates per node), each site first fits its own ComBat
    parameters and computes the moments on harmonised features. With the query phases noised, the sites send
    noised sums of their features standardised with ``reference`` (the pooled ComBat estimates: grand mean,
    pooled variance) and clipped; they are turned back into moments here. With ``derived`` (a leave-one-site-out
    fold: server.derived_moments) no site is asked: ``derived(site)`` is what that site would reply, worked out
    from what it sent for the main run, and each site fits its own ComBat for the fold later (``selection_phase``
    ``keep``); ``raw_classes``: each site also sends its per-class moments before ComBat, for that."""
    names = model_inputs(run, cohort.agreement)
    config = {"features": names, "features-sha256": sha256_json(names)} | ({"raw-classes": True} if raw_classes else {})
    if derived is not None:
        # in site-name order, as replies_of gives the asked moments (pooling sums in that order: the same last bits)
        sent = {site: derived(site) for site in sorted(cohort.fed.sites.values())}
        return _pooled_moments(run, cohort, sent, derived="from the main run's ComBat sums and moments (no query)")
    replies = cohort.ask(run, "moments", protocol.MOMENTS, config, per_node=harmonization)
    if run.config.dp_query:
        return _noised_moments(run, cohort, replies, reference)
    sent, raw = {}, {}
    for nid, reply in replies.items():
        arrays, counts = reply.content["arrays"], reply.content["metrics"]
        get = {k: decode(arrays[k]) for k in arrays}  # type: ignore[union-attr]
        n_hgg, n_bm, site = int(counts["n-hgg"]), int(counts["n-bm"]), cohort.fed.sites[nid]  # type: ignore[arg-type]
        sent[site] = ((int(counts["n"]), get["mean"], get["m2"]),  # type: ignore[arg-type]
                      {1: (n_hgg, get["mean-hgg"], get["m2-hgg"]), 0: (n_bm, get["mean-bm"], get["m2-bm"])})
        if "raw-mean-hgg" in get:
            raw[site] = {1: (n_hgg, get["raw-mean-hgg"], get["raw-m2-hgg"]),
                         0: (n_bm, get["raw-mean-bm"], get["raw-m2-bm"])}
    pooled = _pooled_moments(run, cohort, sent)
    pooled.raw_classwise = raw
    return pooled


def _pooled_moments(run: Run, cohort: Cohort, sent: dict[str, SiteMoments], **noted: str) -> PooledMoments:
    overall = [o for o, _ in sent.values()]
    n = sum(c for c, _, _ in overall)
    mean, std = moments.pooled_mean_std(*zip(*overall, strict=True))
    pooled = PooledMoments(n, mean, std, selection.pool_classwise([c for _, c in sent.values()]),
                           moments.site_share(*zip(*overall, strict=True)))
    run.audit.append("moments", n_cases=n, n_features=len(mean),
                     stats_sha256=arrays_sha256({"mean": mean, "std": std}), **noted, **cohort.tag)
    return pooled


def _noised_moments(run: Run, cohort: Cohort, replies: dict[int, Message],
                    reference: dict[str, object] | None) -> PooledMoments:
    if reference is None:
        raise RunRefused("the query phases are noised, and this cohort has no pooled ComBat estimates to "
                         "standardise with (dp-query-noise-multiplier needs harmonization = 'combat')")
    loc, scale = dp_query.reference(np.asarray(reference["grand_mean"], dtype=np.float64),
                                    np.asarray(reference["var_pooled"], dtype=np.float64))
    sites = []
    for reply in replies.values():
        arrays, metrics = reply.content["arrays"], reply.content["metrics"]
        sites.append({**{k: arrays[k].numpy() for k in arrays}, **{k: float(v) for k, v in metrics.items()}})  # type: ignore[union-attr, arg-type]
    # each site's true class counts are at least k (its guard checks them), so the floor is public
    noised = dp_query.pool_noised_moments(sites, loc, scale, np.asarray(reference["zero_variance"], dtype=bool),
                                          run.config.min_cases_per_class * len(sites))
    pooled = PooledMoments(noised.n, noised.mean, noised.std, noised.classwise)
    run.audit.append("moments", n_cases=noised.n, n_features=len(noised.mean), noised=True,
                     stats_sha256=arrays_sha256({"mean": noised.mean, "std": noised.std}), **cohort.tag)
    return pooled


# ``(names, pooled mean, pooled std) -> the pooled correlation (p, p) of the longest prefix of names worked out``
DerivedCorrelation = Callable[[list[str], np.ndarray, np.ndarray], np.ndarray]


def selection_phase(run: Run, cohort: Cohort, pooled: PooledMoments, removed: frozenset[str] = frozenset(),
                    derived: DerivedCorrelation | None = None, raw: bool = False,
                    keep: Callable[[list[str]], None] | None = None) -> selection.Selection:
    """Choose the model's features from aggregates: drop near-constant ones (and the ``removed`` ones: the
    robustness filter's), rank by Welch's t, then keep the best uncorrelated ones using the pooled correlation of
    the top candidates. With ``derived`` (a leave-one-site-out fold: server.derived_moments) the correlation is
    worked out from what the sites sent for the main run where it follows; the sites are asked only if not.
    ``raw``: each site also sends its candidates' cross-products before ComBat (the main run's, for that).
    ``keep(names)``: a fold whose moments were worked out has each site keep its own ComBat for the fold, for the
    only features the fold will ever harmonise there (``harmonization.keep_phase``): the candidates when the sites
    are asked for their correlation (it goes with that query), else the chosen features (with the next query)."""
    names_all = model_inputs(run, cohort.agreement)
    n_radiomics = len(cohort.agreement.names)
    n_keep, threshold = run.config.select_features, run.config.select_max_correlation
    constant = selection.near_constant(pooled.std, pooled.mean)
    flat = [n for i, n in enumerate(names_all) if i >= n_radiomics and constant[i]]
    if flat:
        raise RunRefused(f"model covariate input(s) {', '.join(flat)} take one value at every training case of "
                         f"{cohort.fold or 'the federation'}: the model cannot learn from them; drop them from "
                         "model-covariates")
    t = selection.welch_t(pooled.classwise[1], pooled.classwise[0])
    # the clinical inputs are never ranked out: ranking and decorrelation choose among the radiomics only
    order = [int(i) for i in np.argsort(-np.abs(t[:n_radiomics]), kind="stable")
             if not constant[i] and names_all[i] not in removed]
    clinical = list(range(n_radiomics, len(names_all)))
    if n_keep <= 0:  # selection off: every non-constant feature, in the agreed order
        kept = sorted(order) + clinical
        chosen = selection.Selection([names_all[i] for i in kept], [float(t[i]) for i in kept],
                                     int(constant.sum()), 0, 0, threshold)
    else:
        candidates = order[: max(n_keep, run.config.select_candidates)]
        kept_local, read, sent, asked = _decorrelated(run, cohort, pooled, [names_all[i] for i in candidates],
                                                      candidates, n_keep, threshold, derived, raw, keep)
        kept = [candidates[i] for i in kept_local] + clinical
        # the greedy walk stops once n_keep are kept: everything it passed over was too correlated
        examined = kept_local[-1] + 1 if len(kept_local) == n_keep else len(candidates)
        dropped = examined - len(kept_local)
        chosen = selection.Selection([names_all[i] for i in kept], [float(t[i]) for i in kept],
                                     int(constant.sum()), len(candidates), dropped, threshold, correlation=read,
                                     raw=sent)
    if keep is not None and (n_keep <= 0 or not asked):
        keep(chosen.names)
    noted = {} if n_keep <= 0 or asked else \
        {"derived": "correlation from the main run's cross-products before ComBat and ComBat sums (no query)"}
    run.audit.append("selection", features=chosen.names, welch_t=chosen.t,
                     dropped_constant=chosen.dropped_constant, candidates=chosen.candidates,
                     dropped_correlated=chosen.dropped_correlated, max_correlation=threshold,
                     features_sha256=sha256_json(chosen.names), **noted, **cohort.tag)
    log.info("%sSelected %d feature(s) from %d (%d near-constant, %d dropped as correlated above %.2f)",
             f"Fold {cohort.fold}: " if cohort.fold else "", len(chosen.names), len(names_all),
             chosen.dropped_constant, chosen.dropped_correlated, threshold)
    return chosen


def _decorrelated(run: Run, cohort: Cohort, pooled: PooledMoments, names: list[str], candidates: list[int],
                  n_keep: int, threshold: float, derived: DerivedCorrelation | None = None, raw: bool = False,
                  keep: Callable[[list[str]], None] | None = None
                  ) -> tuple[list[int], tuple[tuple[str, ...], np.ndarray] | None, selection.RawCrossproducts | None,
                             bool]:
    """The greedy decorrelation's walk over ``candidates`` (best first) from the sites' pooled correlation; the
    correlation it read, by candidate name (None when noised: exact training's start, common.newton_start); the
    sites' cross-products before ComBat when ``raw`` (else None); whether the sites were asked.

    The walk stops once ``n_keep`` are kept and reads only the correlations among the candidates it examined, so the
    sites are first asked for the top ``selection.first_ask`` candidates' cross-products only (on the bench's sites,
    3 kept of 200, the walk examined 3 to 4: m x m cross-products of 200 were 320 KB per site and cohort, most never
    read); only a walk that runs out of them asks again for every candidate, and then walks all. Either way the
    walk is the same, so the same features are kept. Noised queries ask once, for every candidate (each query spends
    privacy budget).

    ``derived(names, mean, std)``: the pooled correlation of the longest prefix of ``names`` it can work out (p, p);
    when the walk keeps ``n_keep`` within it, it is the walk over the sites' correlation (it reads nothing past the
    last one it keeps), and no site is asked."""
    first = len(candidates) if run.config.dp_query else selection.first_ask(len(candidates), n_keep)
    if derived is not None and not run.config.dp_query:
        corr = derived(names[:first], pooled.mean[candidates[:first]], pooled.std[candidates[:first]])
        kept = selection.greedy_decorrelate(range(len(corr)), corr, threshold, n_keep)
        if len(kept) == n_keep:
            return kept, (tuple(names[:len(corr)]), corr), None, False
    raw = raw and not run.config.dp_query
    if keep is not None:  # the sites harmonise the candidates for the fold: their ComBat first, in the same round trip
        keep(names)
    for m in dict.fromkeys((first, len(candidates))):
        config = {"candidates": names[:m], "candidates-sha256": sha256_json(names[:m])} | \
            ({"raw-crossproducts": True} if raw else {})
        stats = RecordDict({"arrays": ArrayRecord({"mean": Array(pooled.mean[candidates[:m]]),
                                                   "std": Array(pooled.std[candidates[:m]])})})
        replies = cohort.ask(run, "correlation", protocol.CORRELATION, config, per_node=lambda _, r=stats: r)
        cross = [decode(r.content["arrays"]["crossproducts"]) for r in replies.values()]  # type: ignore[index, arg-type]
        if run.config.dp_query:  # noised sums, no counts: the noised moments' count divides
            corr = dp_query.noised_correlation(cross, pooled.n)
        else:
            n = sum(int(r.content["metrics"]["n"]) for r in replies.values())  # type: ignore[arg-type]
            corr = selection.pooled_correlation(cross, n)
        kept = selection.greedy_decorrelate(range(m), corr, threshold, n_keep)
        if len(kept) == n_keep:
            break
    if run.config.dp_query:
        return kept, None, None, True
    sent = selection.RawCrossproducts(tuple(names[:m]), {
        cohort.fed.sites[nid]: (int(r.content["metrics"]["n"]),  # type: ignore[arg-type]
                                decode(r.content["arrays"]["raw-crossproducts"]))  # type: ignore[index, arg-type]
        for nid, r in replies.items() if "raw-crossproducts" in r.content["arrays"]}) if raw else None
    return kept, (tuple(names[:m]), corr), sent, True


def histograms_phase(run: Run, cohort: Cohort, pooled: PooledMoments, names: list[str],
                     bins: int = 16) -> dict[str, object]:
    """Site-wise distributions of a few model features before and after harmonisation, for the report.

    Edges span the pooled mean +- 3.5 pooled std (values beyond go to the end bins); each site sends
    counts per bin, merged until every count is 0 or >= k.
    """
    fed = cohort.fed
    index = {n: i for i, n in enumerate(cohort.agreement.names)}
    cols = [index[n] for n in names]
    edges = np.array([np.linspace(pooled.mean[c] - 3.5 * pooled.std[c], pooled.mean[c] + 3.5 * pooled.std[c],
                                  bins + 1) for c in cols])
    config = {"histogram-features": names, "histogram-features-sha256": sha256_json(names)}
    record = RecordDict({"arrays": ArrayRecord({"edges": Array(edges)})})
    replies = cohort.ask(run, "histograms", protocol.HISTOGRAMS, config, per_node=lambda _: record)
    features: dict[str, dict[str, object]] = {n: {"edges": edges[j].tolist(), "sites": {}} for j, n in enumerate(names)}
    for node_id, reply in replies.items():
        before = reply.content["arrays"]["before"].numpy()  # type: ignore[union-attr]
        after = reply.content["arrays"]["after"].numpy()  # type: ignore[union-attr]
        for j, n in enumerate(names):
            features[n]["sites"][fed.sites[node_id]] = {  # type: ignore[index]
                "before": before[j].astype(int).tolist(), "after": after[j].astype(int).tolist()}
    run.audit.append("histograms", features=names, sites=sorted(features[names[0]]["sites"]) if names else [],  # type: ignore[arg-type]
                     sha256=sha256_json(features))
    return {"features": features}
