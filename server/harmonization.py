"""Distributed ComBat's query phases: the cohort's pooled estimates (rounds 1-2, or pooled again from the main run's
sums for a leave-one-site-out fold) and the join of sites outside a cohort (common.combat has the maths)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from common import combat, moments, protocol
from common.canon import arrays_sha256, sha256_json
from common.npy import encode
from server.federation import Cohort, Run, RunRefused


def _array_record(arrays: dict[str, Array]) -> ArrayRecord:
    """``ArrayRecord(arrays)`` holding these very Arrays: Flower's constructor rebuilds each one, attribute by attribute
    (~30 µs per array), and a fold's moments round builds one record of 4 arrays per site (2,256 at 48 sites, one
    after another in the folds' turns). An Array is its bytes, dtype and shape, never changed once made, so sharing one
    between the sites' records sends the same bytes. Flower's internal ``_data`` dict, as server.federation._with."""
    record = ArrayRecord()
    for name, array in arrays.items():
        if not isinstance(name, str) or not isinstance(array, Array):
            raise TypeError(f"an ArrayRecord holds Arrays by name, not {type(array).__name__} as {name!r}")
        record.__dict__["_data"][name] = array
    return record


def _site_beta(beta: np.ndarray, n_sites: int, site: int) -> np.ndarray:
    """B_hat's rows a site needs: its own row and the covariate effects (common.combat.site_rows); it must not
    learn other hospitals' feature means."""
    return combat.site_rows(beta, n_sites, site)


@dataclass
class Harmonization:
    """A cohort's pooled ComBat estimates: ``per_node(nid)`` is what that site needs to fit its own
    location/scale (it does so when the moments query arrives); ``late_joiner`` holds only what a site
    outside the cohort is harmonised against (grand mean, pooled variance, covariate effects, no site's own
    intercept): ``harmonization.json`` for ``radfed site join``, and a fold's held-out site."""

    per_node: Callable[[int], RecordDict]
    late_joiner: dict[str, object]
    site_share: np.ndarray | None = None  # (d,) variation between sites before ComBat (moments.site_share)
    # what each site sent in rounds 1-2, by site name (n, XᵀX block, XᵀY block, residual sum of squares), for the
    # feature list and covariates they were sent for: a leave-one-site-out fold pools them again (``reuse``)
    sums: dict[str, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    key: tuple[str, str] = ("", "")
    pooled: combat.PooledEstimates | None = None
    reused: bool = False  # both rounds pooled again from the main run's sums (a fold without covariates)
    # ``per_node`` without B_hat's rows: what ``query.combat_keep`` needs (no covariates, its moments alone)
    per_node_keep: Callable[[int], RecordDict] | None = None


def reusable(reuse: Harmonization | None, cohort: Cohort, covariates: str) -> bool:
    """Whether ``reuse`` (the main run's ComBat) holds round 1 of every site of ``cohort`` for its feature list."""
    return reuse is not None and reuse.key == (cohort.agreement.sha256, covariates) and \
        all(name in reuse.sums for name in cohort.fed.sites.values())


@dataclass(frozen=True)
class Pooled:
    """A cohort's pooled ComBat estimates and the variation between its sites before ComBat (``moments.site_share``,
    (d,)), pooled from the sums its sites sent, in ``order`` (the design's: site name, then node id)."""

    order: tuple[str, ...]
    estimates: combat.PooledEstimates
    before: np.ndarray


def pool_again(sums: dict[str, tuple[int, np.ndarray, np.ndarray, np.ndarray]], order: tuple[str, ...]) -> Pooled:
    """Both rounds pooled from the sites' main-run ``sums`` (no covariates: a site's round-2 residual sum of squares
    is then the same in every cohort), in ``order``: what ``harmonization_phase`` does with ``reuse``, a pure function
    of them (server.fold_prefetch works it out ahead). Raises RunRefused when the designs cannot be pooled."""
    means = _pool_means(((i, *sums[name][:3]) for i, name in enumerate(order)), len(order))
    return Pooled(order, *_pool_spread(means, [(i, sums[name][:3], sums[name][3]) for i, name in enumerate(order)]))


def _pool_means(blocks: Iterable[tuple[int, int, np.ndarray, np.ndarray]], n_sites: int) -> combat.PooledMeans:
    """Round 1 pooled from each site's (design index, n, XᵀX block, XᵀY block) (common.combat.site_block): each is
    added where it lies in the pooled (S + p)² matrix, one site at a time (no sites x sites matrix per site)."""
    try:
        return combat.pool_moments(combat.from_block(i, n_sites, n, xtx, xty) for i, n, xtx, xty in blocks)
    except ValueError as exc:  # e.g. a covariate level no site has: the pooled design is singular
        raise RunRefused(f"distributed ComBat cannot pool the sites' designs: {exc}") from None


def _pool_spread(means: combat.PooledMeans, sent: list[tuple[int, tuple[int, np.ndarray, np.ndarray], np.ndarray]]
                 ) -> tuple[combat.PooledEstimates, np.ndarray]:
    """Round 2 pooled from each site's (design index, its round-1 block (n, XᵀX, XᵀY), residual sum of squares), and
    the variation between the sites before ComBat: each site's mean (its row of XᵀY over its count) and spread around
    it (its residual sum of squares; around the site's mean and, with covariates, their effects)."""
    residuals = [combat.SiteResiduals(site=i, n=block[0], ss=ss) for i, block, ss in sent]
    before = moments.site_share([r.n for r in residuals], [block[2][0] / block[0] for _, block, _ in sent],
                                [r.ss for r in residuals])
    return combat.pool_residuals(means, residuals), before


def design_order(cohort: Cohort) -> list[int]:
    """The cohort's node ids in the design's order (one column per site): by site name, then node id."""
    return sorted(cohort.fed.sites, key=lambda nid: (cohort.fed.sites[nid], nid))


def harmonization_phase(run: Run, cohort: Cohort, covariates: str = "", reuse: Harmonization | None = None,
                        ahead: Pooled | None = None) -> Harmonization:
    """Distributed ComBat, rounds 1-2 (common.combat), over the cohort's sites only.

    ``reuse``: the main run's ComBat. A site's round-1 block (its count and sums over its training split) is the
    same in every cohort it belongs to, and so, without covariates, is its round-2 residual sum of squares (B_hat's
    row of a site is then its own mean): a leave-one-site-out fold pools what its sites already sent for the
    main run instead of asking again (no message; nothing new leaves a site), when the feature list is the same.
    ``ahead``: those both rounds pooled again already (``pool_again``, server.fold_prefetch), used when its sites and
    their order are the cohort's."""
    fed, agreement = cohort.fed, cohort.agreement
    index = {nid: i for i, nid in enumerate(design_order(cohort))}
    n_sites = len(index)
    config = {"features": agreement.names, "features-sha256": agreement.sha256, "n-sites": n_sites}
    own = lambda nid: RecordDict({"config": ConfigRecord({"site-index": index[nid]})})  # noqa: E731
    again = reusable(reuse, cohort, covariates)
    both = again and not covariates  # without covariate columns a site's round-2 sum is cohort-independent too
    if both:
        order = tuple(fed.sites[nid] for nid in index)
        if ahead is not None and ahead.order != order:
            ahead = None  # worked out for other sites: pooled here instead
        pool = ahead or pool_again(reuse.sums, order)  # type: ignore[union-attr]
        pooled, before = pool.estimates, pool.before
        sums = {name: reuse.sums[name] for name in order}  # type: ignore[union-attr]
    else:
        pooled, before, sums = _pool_asking(run, cohort, config, own, index, reuse if again else None)
    late_joiner: dict[str, object] = {
        "features": agreement.names, "n_sites": n_sites, "n": pooled.n, "grand_mean": pooled.grand_mean.tolist(),
        "var_pooled": pooled.var_pooled.tolist(), "beta_cov": pooled.beta_cov.tolist(),
        "zero_variance": pooled.zero_variance.tolist()}
    reused = {"reused": "the main run's rounds 1-2" if both else "the main run's round 1"} if again else {}
    if both and ahead is not None:
        reused["ahead"] = "pooled while the main run waited for its sites (server/fold_prefetch.py)"
    run.audit.append("harmonization", method="combat", covariates=covariates, n_sites=n_sites, n_cases=pooled.n,
                     n_features=len(pooled.grand_mean), zero_variance=int(pooled.zero_variance.sum()),
                     pooled_sha256=arrays_sha256({"beta": pooled.beta, "grand_mean": pooled.grand_mean,
                                                  "var_pooled": pooled.var_pooled}), **reused, **cohort.tag)

    # what every site of the cohort is sent alike, serialised once (47 folds x 47 sites at 48 sites)
    shared = {"grand-mean": Array(pooled.grand_mean), "var-pooled": Array(pooled.var_pooled),
              "zero-variance": Array(pooled.zero_variance.astype(np.float64))}

    def estimates(nid: int) -> RecordDict:
        own = {"site-index": index[nid], "n-sites": n_sites, "n-pooled": pooled.n}
        beta = encode(np.ascontiguousarray(_site_beta(pooled.beta, n_sites, index[nid]), dtype=np.float64))
        return RecordDict({"arrays": _array_record({"beta": beta, **shared}), "config": ConfigRecord(own)})

    def keep(nid: int) -> RecordDict:
        own = {"site-index": index[nid], "n-sites": n_sites, "n-pooled": pooled.n}
        return RecordDict({"arrays": _array_record(shared), "config": ConfigRecord(own)})

    return Harmonization(estimates, late_joiner, before, sums, (agreement.sha256, covariates), pooled,  # type: ignore[arg-type]
                         both, keep)


def _pool_asking(run: Run, cohort: Cohort, config: dict, own: Callable[[int], RecordDict], index: dict[int, int],
                 reuse: Harmonization | None) -> tuple[combat.PooledEstimates, np.ndarray, dict]:
    """Rounds 1-2 asked of the sites (round 1 taken from ``reuse`` when given: with covariates only round 2 is
    cohort-specific); the pooled estimates, the sites' variation before ComBat and what each site sent, by name."""
    fed, n_sites = cohort.fed, len(index)
    if reuse is not None:
        blocks = {nid: reuse.sums[fed.sites[nid]][:3] for nid in index}
    else:
        replies = cohort.ask(run, "harmonization", protocol.COMBAT_FIT, config, per_node=own)
        if len(replies) != n_sites:  # the design has one column per site: a lost site invalidates it
            raise RunRefused(f"{n_sites - len(replies)} site(s) left during harmonization; ComBat needs every site "
                             "of the design, so the run stops (restart it with the remaining sites)")
        blocks = {nid: (int(r.content["metrics"]["n"]), r.content["arrays"]["xtx"].numpy(),  # type: ignore[arg-type, union-attr]
                        r.content["arrays"]["xty"].numpy()) for nid, r in replies.items()}  # type: ignore[union-attr]
    means = _pool_means(((index[nid], *block) for nid, block in blocks.items()), n_sites)

    def with_beta(nid: int) -> RecordDict:
        beta = _site_beta(means.beta, n_sites, index[nid])
        return RecordDict({"arrays": ArrayRecord({"beta": Array(beta)}),
                           "config": ConfigRecord({"site-index": index[nid]})})

    replies = cohort.ask(run, "harmonization", protocol.COMBAT_RESIDUALS, config, per_node=with_beta)
    if len(replies) != n_sites:
        raise RunRefused("a site left during harmonization; ComBat needs every site of the design")
    ss = {nid: r.content["arrays"]["ss"].numpy() for nid, r in replies.items()}  # type: ignore[union-attr]
    pooled, before = _pool_spread(means, [(index[nid], blocks[nid], ss[nid]) for nid in ss])
    return pooled, before, {fed.sites[nid]: (*blocks[nid], ss[nid]) for nid in ss}


def keep_phase(run: Run, cohort: Cohort, harmonization: Harmonization, columns: list[str]) -> None:
    """Each site fits its own ComBat for ``cohort`` from its training split's moments and keeps it, with the cohort's
    next query (``query.combat_keep``: a leave-one-site-out fold whose moments the coordinator worked out,
    server/derived_moments.py); only its count comes back. It fits every agreed feature (the empirical-Bayes priors
    pool them) but keeps the parameters of ``columns`` alone, the only features the fold harmonises there (a fold's
    ~860 were 35 KB written per fold and site, and read again by a site's other worker)."""
    if harmonization.per_node_keep is None:
        raise ValueError("this cohort's ComBat was asked of its sites, not pooled again: its sites fitted it already")
    names = cohort.agreement.names
    config = {"features": names, "features-sha256": sha256_json(names), "columns": list(columns)}
    cohort.defer(run, "harmonization", protocol.COMBAT_KEEP, config, harmonization.per_node_keep, lambda _: None)


def join_phase(run: Run, outsider: Cohort, harmonization: Harmonization) -> None:
    """Sites outside a cohort harmonise themselves against its pooled estimates, as a late-joining hospital
    does (``radfed site join``): each fits its own location/scale on all its usable cases, with no labels,
    and keeps it for the cohort's fold. Only the number of cases comes back. With merge-phases the join goes
    out with ``outsider``'s next query (the scoring of the cohort's model), which must follow."""
    est = harmonization.late_joiner
    names = [str(n) for n in est["features"]]  # type: ignore[union-attr]
    d = len(names)
    arrays = RecordDict({"arrays": ArrayRecord({
        "grand-mean": Array(np.asarray(est["grand_mean"], dtype=np.float64)),
        "var-pooled": Array(np.asarray(est["var_pooled"], dtype=np.float64)),
        "beta-cov": Array(np.asarray(est["beta_cov"], dtype=np.float64).reshape(-1, d)),
        "zero-variance": Array(np.asarray(est["zero_variance"], dtype=np.float64))})})
    config = {"features": names, "features-sha256": sha256_json(names), "n-sites": int(est["n_sites"]),  # type: ignore[call-overload]
              "n-pooled": int(est["n"])}  # type: ignore[call-overload]

    def joined(replies: dict[int, Message]) -> None:
        run.audit.append("harmonization-join", sites=sorted(outsider.fed.sites[n] for n in replies),
                         n_cases={outsider.fed.sites[n]: int(r.content["metrics"]["n"]) for n, r in replies.items()},  # type: ignore[arg-type]
                         **outsider.tag)

    # nothing waits for the join's replies but the scoring that follows: it travels with it (merge-phases); a site
    # whose join fails is dropped before its scoring reply is read, as when the join went alone
    outsider.defer(run, "harmonization", protocol.COMBAT_JOIN, config, lambda _: arrays, joined)
