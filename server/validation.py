"""External validation: leave-one-site-out folds inside one run.

For each site, the other sites redo the label-dependent steps (moments, selection) and train the model
from scratch; the held-out site then scores that model on all its usable cases and sends counts, AUC
with its DeLong variance and k-anonymous curves. ComBat is not refitted: it uses no labels, and each
site applies the parameters it fitted in the main run (see docs/architecture.md).
"""

from __future__ import annotations

import logging

from flwr.app import RecordDict
from flwr.serverapp import Grid

from common import dp, metrics, protocol
from common.runconfig import RunConfig
from server import phases, training
from server.audit import AuditLog
from server.phases import FeatureAgreement, Federation, RunRefused
from server.strategy import evaluation_records, record_sha256

log = logging.getLogger("flwr.radfed.server")


def fold_agreement(agreement: FeatureAgreement, sites: list[str]) -> FeatureAgreement:
    """The feature agreement restricted to the fold's training sites (class weight from their counts)."""
    counts = {s: agreement.split_counts[s] for s in sites}
    n_hgg = sum(c["n-train-hgg"] for c in counts.values())
    n_bm = sum(c["n-train-bm"] for c in counts.values())
    return FeatureAgreement(agreement.names, agreement.sha256, n_bm / max(n_hgg, 1), counts)


def leave_one_site_out(grid: Grid, fed: Federation, agreement: FeatureAgreement, run: RunConfig, audit: AuditLog,
                       timeout: float, dp_account: dp.DPAccount | None = None) -> dict[str, dict[str, object]]:
    """Per held-out site: n, counts, AUC, rates, 95% intervals, ROC and calibration; or ``error``."""
    folds: dict[str, dict[str, object]] = {}
    for held_node, held in sorted(fed.sites.items(), key=lambda kv: kv[1]):
        others = {nid: name for nid, name in fed.sites.items() if nid != held_node}
        sub = Federation(dict(others), min_sites=1)
        log.info("External validation: training without %s on %s", held, ", ".join(sorted(others.values())))
        try:
            fold = fold_agreement(agreement, sorted(others.values()))
            pooled = phases.moments_phase(grid, sub, fold, audit, timeout)
            chosen = phases.selection_phase(grid, sub, fold, pooled, run, audit, timeout)
            chosen = training.select_l1(grid, sub, fold, pooled, chosen, run, audit, timeout, fold.pos_weight, held)
            trained = training.train(grid, sub, fold, pooled, chosen, run, audit, timeout, fold.pos_weight,
                                     fold=held, evaluate_rounds=False, dp_account=dp_account)
            arrays = trained.arrays
            config = {**training.shared_config(chosen, fold.pos_weight), "split": "all", "fold": held,
                      "server-round": max(trained.training) if trained.training else run.num_server_rounds}
            replies = phases.query(grid, [held_node], protocol.EVALUATE, config, timeout,
                                   per_node=lambda _, a=arrays: RecordDict({"arrays": a}))
            reply = replies.get(held_node)
            if reply is None or reply.has_error():
                reason = "no reply before the timeout" if reply is None else phases.error_reason(reply)
                raise RunRefused(f"{held} could not score the model: {reason}")
            per_site, site_curves = evaluation_records({held_node: held}, [reply])
            record: dict[str, object] = {**per_site[held], "ci": metrics.intervals(per_site[held]),
                                         "trained_on": sorted(others.values()), "features": chosen.names}
            audit.append("external-validation", fold=held, trained_on=record["trained_on"],
                         model_sha256=record_sha256(arrays), metrics=per_site[held], ci=record["ci"])
            record.update(site_curves.get(held, {}))
            folds[held] = record
            log.info("External validation at %s: AUC %.3f over %d cases", held, per_site[held]["auc"],
                     per_site[held]["n"])
        except RunRefused as exc:
            log.warning("External validation at %s failed: %s", held, exc)
            audit.append("external-validation", fold=held, error=str(exc))
            folds[held] = {"error": str(exc)}
    return folds
