"""Gradient-boosted trees (the ``gbt`` family): the server grows them level by level from the sites' histograms.

Each round trip asks every site of the cohort for one level of the tree being grown (``query.trees``: the model so
far, the open-node mask); the replies' gradient/hessian/count histograms (open nodes x model features x agreed bins)
are summed, and ``common.trees.TreeGrower`` picks each open node's split among the agreed edges (or makes it a
leaf). A tree of depth D costs at most D round trips; the model is the flat array encoding of common/trees.py.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from common import protocol, selection, trees
from common.canon import arrays_sha256
from server import clinical
from server.federation import Cohort, Run
from server.phases import PooledMoments
from server.strategy import evaluation_records, record_sha256
from server.training import Trained, shared_config

log = logging.getLogger("flwr.radfed.server")


def _sum(replies: dict[int, object]) -> dict[str, np.ndarray]:
    return {key: sum(r.content["arrays"][key].numpy() for r in replies.values())  # type: ignore[attr-defined]
            for key in ("grad", "hess", "count")}


def train_trees(run: Run, cohort: Cohort, pooled: PooledMoments, chosen: selection.Selection,
                evaluate_rounds: bool = True) -> Trained:
    """Grow ``tree-rounds`` trees on the cohort's training splits, standardised with the pooled moments of the
    chosen features; then (``evaluate_rounds``) one evaluation of the ensemble at every site."""
    cfg = run.config
    params = cfg.tree_params()
    index = {n: i for i, n in enumerate(cohort.agreement.names)}
    cols = [index[n] for n in chosen.names]
    grower = trees.TreeGrower(params, pooled.mean[cols], pooled.std[cols])
    config = shared_config(chosen, cohort.agreement.pos_weight, "gbt")
    tag = {**cohort.tag, "family": "gbt"} if len(cfg.families) > 1 else cohort.tag
    trained = Trained(ArrayRecord())
    run.audit.append("model-init", model_sha256=record_sha256(ArrayRecord({k: Array(v) for k, v in
                                                                          grower.arrays.items()})),
                     n_features=len(chosen.names), training="gbt", **tag)
    run.training_started = True
    trip = 0
    while not grower.done:
        trip += 1
        level, open_nodes = grower.request()
        tree = grower.tree
        record = RecordDict({"arrays": ArrayRecord({**{k: Array(v) for k, v in grower.arrays.items()},
                                                    "open": Array(open_nodes)})})
        replies = cohort.ask(run, "trees", protocol.TREES, {**config, "level": level, "server-round": trip},
                             per_node=lambda _, r=record: r, server_round=trip)
        summed = _sum(replies)
        grower.update(summed["grad"], summed["hess"], summed["count"])
        per_site = {cohort.fed.sites[nid]: {"n": int(r.content["metrics"]["n"]),  # type: ignore[arg-type, index]
                                            "update_sha256": arrays_sha256({k: r.content["arrays"][k].numpy()  # type: ignore[index, union-attr]
                                                                            for k in ("grad", "hess", "count")})}
                    for nid, r in replies.items()}
        trained.training[trip] = per_site
        decided = grower.splits[tree][-int(open_nodes.sum()):]
        run.audit.append("tree-level", round=trip, tree=tree, level=level, sites=per_site,
                         splits=[{"feature": chosen.names[s.feature] if s.feature >= 0 else None,
                                  "edge": float(grower.arrays["edges"][s.bin]) if s.feature >= 0 else None,
                                  "gain": s.gain} for s in decided], **tag)
    trained.arrays = ArrayRecord({k: Array(v) for k, v in grower.arrays.items()})
    trained.info = {"mode": "gbt", "family": "gbt", "rounds": trip, "trees": params.rounds,
                    "splits": int((grower.arrays["feature"] >= 0).sum())}
    run.audit.append("round-train", round=trip, sites=trained.training[trip],
                     aggregated_sha256=record_sha256(trained.arrays), **tag)
    log.info("Trees grown: %d trees, %d splits, %d round trips", params.rounds, trained.info["splits"], trip)
    if evaluate_rounds:
        replies = cohort.ask(run, "evaluate", protocol.EVALUATE, {**config, "server-round": trip},
                             per_node=lambda _: RecordDict({"arrays": trained.arrays}), server_round=trip)
        per_site_eval, site_curves = evaluation_records(cohort.fed.sites, replies.values())
        trained.evaluations[trip], trained.curves[trip] = per_site_eval, site_curves
        trained.terms[trip] = clinical.terms_of(cohort.fed.sites, replies.values())
        run.audit.append("round-evaluate", round=trip, sites=per_site_eval, **tag)
    return trained
