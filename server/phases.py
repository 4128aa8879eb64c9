"""The query phases a run goes through before training: plan, features, moments.

Each phase sends one query to the admitted sites, records what came back in the audit log, and
returns only what the next phase needs. Sites that fail are named and dropped; the run stops with
a clear message when fewer than ``min-sites`` remain.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import combat, moments, protocol, selection
from common.canon import arrays_sha256, sha256_json
from common.profile import Profile
from common.runconfig import RunConfig
from server.audit import AuditLog

log = logging.getLogger("flwr.radfed.server")


class RunRefused(RuntimeError):
    """The run cannot go on; the message says which site and what to fix."""


@dataclass
class Federation:
    """The sites admitted so far (node id -> site name) and what they reported."""

    sites: dict[int, str]
    min_sites: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped: list[dict[str, object]] = field(default_factory=list)

    def drop(self, audit: AuditLog, node_id: int, phase: str, reason: str, server_round: int | None = None) -> None:
        site = self.sites.pop(node_id, f"node {node_id}")
        where = f"round {server_round} ({phase})" if server_round is not None else f"the {phase} phase"
        log.warning("Site %s leaves the run at %s: %s", site, where, reason)
        record = {"site": site, "phase": phase, "round": server_round, "reason": reason}
        self.dropped.append(record)
        audit.append("dropout", **record)

    def require_enough(self, where: str) -> None:
        if len(self.sites) < self.min_sites:
            raise RunRefused(f"only {len(self.sites)} site(s) remain after {where}, fewer than "
                             f"min-sites = {self.min_sites}; see the audit log for why the others left")


def error_reason(reply: Message) -> str:
    """The site's own error message, without the simulation's traceback wrapping."""
    reason = str(reply.error.reason)
    if "Message: " in reason:  # simulation: "Exception ClientAppException occurred. Message: <text>"
        reason = reason.rsplit("Message: ", 1)[1]
    elif reason.startswith("<class '") and ":<'" in reason:  # deployment: "<class 'X'>:<'<text>'>"
        reason = reason.split(":<'", 1)[1]
    return reason.strip().removesuffix("'>").strip()


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    """Node ids once at least ``min_nodes`` are connected (then a short grace for the rest)."""
    deadline = time.monotonic() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= min_nodes:
            time.sleep(1.0)
            return sorted(grid.get_node_ids())
        if time.monotonic() > deadline:
            raise RunRefused(f"only {len(ids)} site(s) connected within {timeout:.0f}s, fewer than "
                             f"min-sites = {min_nodes}")
        time.sleep(1.0)


def query(grid: Grid, node_ids: list[int], message_type: str, config: dict, timeout: float,
          per_node: Callable[[int], RecordDict] | None = None) -> dict[int, Message]:
    """Send one query to every node; replies by node id (a node that did not answer is absent).

    ``config`` goes to every node; ``per_node(node_id)`` adds records meant for that node only.
    """
    messages = []
    for nid in node_ids:
        content = per_node(nid) if per_node else RecordDict()
        content["config"] = ConfigRecord({**config, **dict(content.get("config") or {})})
        messages.append(Message(content, dst_node_id=nid, message_type=message_type))
    return {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=timeout)}


def replies_of(fed: Federation, audit: AuditLog, phase: str, replies: dict[int, Message],
               server_round: int | None = None) -> dict[int, Message]:
    """The good replies by node id; every admitted site that failed or did not answer is dropped (and named)."""
    good = {}
    for node_id in list(fed.sites):
        reply = replies.get(node_id)
        if reply is None:
            fed.drop(audit, node_id, phase, "no reply before the timeout", server_round)
        elif reply.has_error():
            fed.drop(audit, node_id, phase, error_reason(reply), server_round)
        else:
            good[node_id] = reply
    return good





NOT_APPROVED = "run plan not approved"


def plan_phase(grid: Grid, node_ids: list[int], profile: Profile, run: RunConfig, min_sites: int,
               audit: AuditLog, timeout: float, plan_hash: str) -> Federation:
    """Every site states the run plan it approved, its profile hash and case counts; a site that did not
    approve the plan is refused (and named in the audit log); any profile mismatch refuses the run."""
    fed = Federation({nid: f"node {nid}" for nid in node_ids}, min_sites)
    plan = {"protocol": protocol.PROTOCOL_VERSION, "profile-sha256": profile.sha256, "plan-sha256": plan_hash,
            "run-config-sha256": sha256_json(run.as_dict())}
    sent = query(grid, node_ids, protocol.PLAN, plan, timeout)
    for node_id, reply in sent.items():
        if reply.has_error() and NOT_APPROVED in error_reason(reply):
            audit.append("refusal", node=node_id, reason=error_reason(reply), plan_sha256=plan_hash)
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


@dataclass
class FeatureAgreement:
    names: list[str]
    sha256: str
    pos_weight: float
    split_counts: dict[str, dict[str, int]]


def features_phase(grid: Grid, fed: Federation, audit: AuditLog, timeout: float) -> FeatureAgreement:
    """Sites extract (or load their cache) and report which features are finite at all their cases."""
    replies = replies_of(fed, audit, "features", query(grid, list(fed.sites), protocol.FEATURES, {}, timeout))
    fed.require_enough("the features phase")
    common: set[str] | None = None
    split_counts = {}
    for node_id, reply in replies.items():
        names = {str(n) for n in reply.content["config"]["features"]}  # type: ignore[union-attr]
        common = names if common is None else common & names
        split_counts[fed.sites[node_id]] = {k: int(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
    agreed = sorted(common or [])
    if not agreed:
        raise RunRefused("the sites share no usable feature; check the extraction error reports at the sites")
    n_hgg = sum(c["n-train-hgg"] for c in split_counts.values())
    n_bm = sum(c["n-train-bm"] for c in split_counts.values())
    digest = sha256_json(agreed)
    audit.append("features-agreed", n_features=len(agreed), features_sha256=digest, split_counts=split_counts)
    return FeatureAgreement(agreed, digest, pos_weight=n_bm / max(n_hgg, 1), split_counts=split_counts)


@dataclass
class PooledMoments:
    """Pooled over every site's training split: n, mean (d,), std (d,), and per class (n, mean, m2)."""

    n: int
    mean: np.ndarray
    std: np.ndarray
    classwise: dict[int, tuple[int, np.ndarray, np.ndarray]]


def moments_phase(grid: Grid, fed: Federation, agreement: FeatureAgreement, audit: AuditLog, timeout: float,
                  harmonization: Callable[[int], RecordDict] | None = None) -> PooledMoments:
    """Pooled mean/std of every agreed feature, and class-wise moments, from per-site moments.

    With ``harmonization`` (the pooled ComBat estimates per node), each site first fits its own ComBat
    parameters and computes the moments on harmonised features.
    """
    config = {"features": agreement.names, "features-sha256": agreement.sha256}
    replies = replies_of(fed, audit, "moments", query(grid, list(fed.sites), protocol.MOMENTS, config, timeout,
                                                    per_node=harmonization))
    fed.require_enough("the moments phase")
    overall, classwise = [], []
    for reply in replies.values():
        arrays, counts = reply.content["arrays"], reply.content["metrics"]
        get = {k: arrays[k].numpy() for k in arrays}  # type: ignore[union-attr]
        overall.append((int(counts["n"]), get["mean"], get["m2"]))  # type: ignore[arg-type]
        classwise.append({1: (int(counts["n-hgg"]), get["mean-hgg"], get["m2-hgg"]),  # type: ignore[arg-type]
                          0: (int(counts["n-bm"]), get["mean-bm"], get["m2-bm"])})  # type: ignore[arg-type]
    n = sum(c for c, _, _ in overall)
    mean, std = moments.pooled_mean_std(*zip(*overall, strict=True))
    pooled = PooledMoments(n, mean, std, selection.pool_classwise(classwise))
    audit.append("moments", n_cases=n, n_features=len(mean),
                 stats_sha256=arrays_sha256({"mean": mean, "std": std}))
    return pooled


def selection_phase(grid: Grid, fed: Federation, agreement: FeatureAgreement, pooled: PooledMoments,
                    run: RunConfig, audit: AuditLog, timeout: float) -> selection.Selection:
    """Choose the model's features from aggregates: drop near-constant ones, rank by Welch's t,
    then keep the best uncorrelated ones using the pooled correlation of the top candidates."""
    n_keep, threshold = run.select_features, run.select_max_correlation
    constant = selection.near_constant(pooled.std, pooled.mean)
    t = selection.welch_t(pooled.classwise[1], pooled.classwise[0])
    order = [int(i) for i in np.argsort(-np.abs(t), kind="stable") if not constant[i]]
    if n_keep <= 0:  # selection off: every non-constant feature, in the agreed order
        kept = sorted(order)
        chosen = selection.Selection([agreement.names[i] for i in kept], [float(t[i]) for i in kept],
                                     int(constant.sum()), 0, 0, threshold)
    else:
        candidates = order[: max(n_keep, run.select_candidates)]
        names = [agreement.names[i] for i in candidates]
        config = {"candidates": names, "candidates-sha256": sha256_json(names)}
        stats = RecordDict({"arrays": ArrayRecord({"mean": Array(pooled.mean[candidates]),
                                                   "std": Array(pooled.std[candidates])})})
        replies = replies_of(fed, audit, "correlation", query(grid, list(fed.sites), protocol.CORRELATION, config,
                                                            timeout, per_node=lambda _: stats))
        fed.require_enough("the correlation phase")
        cross = [r.content["arrays"]["crossproducts"].numpy() for r in replies.values()]  # type: ignore[union-attr]
        n = sum(int(r.content["metrics"]["n"]) for r in replies.values())  # type: ignore[arg-type]
        corr = selection.pooled_correlation(cross, n)
        kept_local = selection.greedy_decorrelate(range(len(candidates)), corr, threshold, n_keep)
        kept = [candidates[i] for i in kept_local]
        # the greedy walk stops once n_keep are kept: everything it passed over was too correlated
        examined = kept_local[-1] + 1 if len(kept_local) == n_keep else len(candidates)
        dropped = examined - len(kept_local)
        chosen = selection.Selection([agreement.names[i] for i in kept], [float(t[i]) for i in kept],
                                     int(constant.sum()), len(candidates), dropped, threshold)
    audit.append("selection", features=chosen.names, welch_t=chosen.t, dropped_constant=chosen.dropped_constant,
                 candidates=chosen.candidates, dropped_correlated=chosen.dropped_correlated,
                 max_correlation=threshold, features_sha256=sha256_json(chosen.names))
    log.info("Selected %d feature(s) from %d (%d near-constant, %d dropped as correlated above %.2f)",
             len(chosen.names), len(agreement.names), chosen.dropped_constant, chosen.dropped_correlated, threshold)
    return chosen


def _site_beta(beta: np.ndarray, n_sites: int, site: int) -> np.ndarray:
    """B_hat with other sites' intercept rows zeroed: a site needs only its own row and the covariate
    effects, and must not learn other hospitals' feature means."""
    masked = beta.copy()
    masked[[i for i in range(n_sites) if i != site]] = 0.0
    return masked


def harmonization_phase(grid: Grid, fed: Federation, agreement: FeatureAgreement, audit: AuditLog,
                        timeout: float, folder: Path,
                        about: dict[str, object] | None = None) -> Callable[[int], RecordDict]:
    """Distributed ComBat, rounds 1-2 (common.combat): returns, per node, what that site needs to fit its
    own location/scale effects locally (it does so when the moments query arrives).

    Writes ``harmonization.json`` to the run folder: the pooled estimates a site that joins later is
    harmonised against (grand mean, pooled variance, covariate effects; no site's own intercept), with
    ``about`` (run id, profile hash, ComBat options) so the site can check it uses the same.
    """
    index = {nid: i for i, nid in enumerate(sorted(fed.sites))}
    n_sites = len(index)
    config = {"features": agreement.names, "features-sha256": agreement.sha256, "n-sites": n_sites}
    own = lambda nid: RecordDict({"config": ConfigRecord({"site-index": index[nid]})})  # noqa: E731
    replies = replies_of(fed, audit, "harmonization",
                       query(grid, list(fed.sites), protocol.COMBAT_FIT, config, timeout, per_node=own))
    if len(replies) != n_sites:  # the design has one column per site: a lost site invalidates it
        raise RunRefused(f"{n_sites - len(replies)} site(s) left during harmonization; ComBat needs every site "
                         "of the design, so the run stops (restart it with the remaining sites)")
    try:
        means = combat.pool_moments([combat.SiteMoments(
            site=index[nid], n_sites=n_sites, n=int(r.content["metrics"]["n"]),  # type: ignore[arg-type]
            xtx=r.content["arrays"]["xtx"].numpy(), xty=r.content["arrays"]["xty"].numpy())  # type: ignore[union-attr]
            for nid, r in replies.items()])
    except ValueError as exc:  # e.g. a covariate level no site has: the pooled design is singular
        raise RunRefused(f"distributed ComBat cannot pool the sites' designs: {exc}") from None

    def with_beta(nid: int) -> RecordDict:
        beta = _site_beta(means.beta, n_sites, index[nid])
        return RecordDict({"arrays": ArrayRecord({"beta": Array(beta)}),
                           "config": ConfigRecord({"site-index": index[nid]})})

    replies = replies_of(fed, audit, "harmonization",
                       query(grid, list(fed.sites), protocol.COMBAT_RESIDUALS, config, timeout, per_node=with_beta))
    if len(replies) != n_sites:
        raise RunRefused("a site left during harmonization; ComBat needs every site of the design")
    pooled = combat.pool_residuals(means, [combat.SiteResiduals(
        site=index[nid], n=int(r.content["metrics"]["n"]), ss=r.content["arrays"]["ss"].numpy())  # type: ignore[arg-type,union-attr]
        for nid, r in replies.items()])
    late_joiner = {**(about or {}), "features": agreement.names, "n_sites": n_sites, "n": pooled.n,
                   "grand_mean": pooled.grand_mean.tolist(), "var_pooled": pooled.var_pooled.tolist(),
                   "beta_cov": pooled.beta_cov.tolist(), "zero_variance": pooled.zero_variance.tolist()}
    (folder / "harmonization.json").write_text(json.dumps(late_joiner), encoding="utf-8")
    audit.append("harmonization", method="combat", covariates=(about or {}).get("covariates", ""),
                 n_sites=n_sites, n_cases=pooled.n,
                 n_features=len(pooled.grand_mean), zero_variance=int(pooled.zero_variance.sum()),
                 pooled_sha256=arrays_sha256({"beta": pooled.beta, "grand_mean": pooled.grand_mean,
                                              "var_pooled": pooled.var_pooled}))

    def estimates(nid: int) -> RecordDict:
        return RecordDict({"arrays": ArrayRecord({
            "beta": Array(_site_beta(pooled.beta, n_sites, index[nid])), "grand-mean": Array(pooled.grand_mean),
            "var-pooled": Array(pooled.var_pooled),
            "zero-variance": Array(pooled.zero_variance.astype(np.float64))}),
            "config": ConfigRecord({"site-index": index[nid], "n-sites": n_sites, "n-pooled": pooled.n})})

    return estimates


def histograms_phase(grid: Grid, fed: Federation, agreement: FeatureAgreement, pooled: PooledMoments,
                     names: list[str], audit: AuditLog, timeout: float, bins: int = 16) -> dict[str, object]:
    """Site-wise distributions of a few model features before and after harmonisation, for the report.

    Edges span the pooled mean +- 3.5 pooled std (values beyond go to the end bins); each site sends
    counts per bin, merged until every count is 0 or >= k.
    """
    index = {n: i for i, n in enumerate(agreement.names)}
    cols = [index[n] for n in names]
    edges = np.array([np.linspace(pooled.mean[c] - 3.5 * pooled.std[c], pooled.mean[c] + 3.5 * pooled.std[c],
                                  bins + 1) for c in cols])
    config = {"histogram-features": names, "histogram-features-sha256": sha256_json(names)}
    record = RecordDict({"arrays": ArrayRecord({"edges": Array(edges)})})
    replies = replies_of(fed, audit, "histograms", query(grid, list(fed.sites), protocol.HISTOGRAMS, config, timeout,
                                                       per_node=lambda _: record))
    fed.require_enough("the histograms phase")
    features: dict[str, dict[str, object]] = {n: {"edges": edges[j].tolist(), "sites": {}} for j, n in enumerate(names)}
    for node_id, reply in replies.items():
        before = reply.content["arrays"]["before"].numpy()  # type: ignore[union-attr]
        after = reply.content["arrays"]["after"].numpy()  # type: ignore[union-attr]
        for j, n in enumerate(names):
            features[n]["sites"][fed.sites[node_id]] = {  # type: ignore[index]
                "before": before[j].astype(int).tolist(), "after": after[j].astype(int).tolist()}
    audit.append("histograms", features=names, sites=sorted(features[names[0]]["sites"]) if names else [],  # type: ignore[arg-type]
                 sha256=sha256_json(features))
    return {"features": features}
