"""radfed ServerApp: the coordinator's side of a run, phase by phase (see docs/architecture.md).

plan -> features -> moments (standardisation) -> FedAvg rounds (train + evaluate at every site)
-> model, metrics.json, report and audit log in one run folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import model
from common.canon import sha256_json
from common.profile import load_profile
from common.protocol import PROTOCOL_VERSION
from server import phases, report
from server.audit import AuditLog, load_or_create_key
from server.codehash import code_sha256
from server.strategy import AuditedFedAvg, record_sha256

log = logging.getLogger("flwr.radfed.server")
app = ServerApp()


def run_folder(context: Context) -> Path:
    root = Path(str(context.run_config["output-dir"])).expanduser()
    folder = root / f"{time.strftime('%Y%m%d-%H%M%S')}-run{context.run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    folder = run_folder(context)
    key_path = Path(str(cfg.get("audit-key") or "")).expanduser() if cfg.get("audit-key") else \
        folder.parent / "coordinator-audit-key.pem"
    audit = AuditLog(folder / "audit.jsonl", load_or_create_key(key_path))
    profile = load_profile(str(cfg["profile"]))
    timeout, min_sites = float(cfg["query-timeout"]), int(cfg["min-sites"])
    audit.append("run-start", run_id=context.run_id, config=cfg, config_sha256=sha256_json(cfg),
                 audit_key_sha256=audit.fingerprint,
                 profile={"name": profile.name, "version": profile.version, "sha256": profile.sha256},
                 protocol=PROTOCOL_VERSION, code_sha256=code_sha256())
    log.info("radfed run %s: results go to %s", context.run_id, folder)
    started = time.perf_counter()
    result = report.RunResult(run_id=context.run_id, folder=folder, config=cfg, profile=profile)
    strategy_started = False
    try:
        node_ids = phases.wait_for_nodes(grid, min_sites, timeout)
        fed = phases.plan_phase(grid, node_ids, profile, cfg, min_sites, audit, timeout)
        result.site_counts, result.dropouts = fed.counts, fed.dropped
        agreement = phases.features_phase(grid, fed, audit, timeout)
        result.split_counts = agreement.split_counts
        harmonization = None
        if str(cfg.get("harmonization", "none")) == "combat":
            harmonization = phases.harmonization_phase(grid, fed, agreement, audit, timeout, folder)
        pooled = phases.moments_phase(grid, fed, agreement, audit, timeout, harmonization)
        chosen = phases.selection_phase(grid, fed, agreement, pooled, cfg, audit, timeout)
        result.features = {"agreed": len(agreement.names), "n": len(chosen.names),
                           "constant": chosen.dropped_constant, "candidates": chosen.candidates,
                           "dropped_correlated": chosen.dropped_correlated,
                           "selected": dict(zip(chosen.names, chosen.t, strict=True)),
                           "sha256": sha256_json(chosen.names)}

        index = {n: i for i, n in enumerate(agreement.names)}
        cols = [index[n] for n in chosen.names]
        net = model.build_model(pooled.mean[cols], pooled.std[cols])
        strategy = AuditedFedAvg(fed, audit)
        shared = {"pos-weight": agreement.pos_weight, "features": chosen.names,
                  "features-sha256": sha256_json(chosen.names)}
        train_config = ConfigRecord({**shared, "local-epochs": int(cfg["local-epochs"]),
                                     "learning-rate": float(cfg["learning-rate"]),
                                     "weight-decay": float(cfg["weight-decay"])})
        initial = ArrayRecord(net.state_dict())
        audit.append("model-init", model_sha256=record_sha256(initial), n_features=len(chosen.names))
        strategy_started = True
        fl = strategy.start(grid, initial, num_rounds=int(cfg["num-server-rounds"]),
                            timeout=timeout, train_config=train_config, evaluate_config=ConfigRecord(shared))
        final_state = fl.arrays.to_torch_state_dict()
        torch.save({"state_dict": final_state, "features": chosen.names, "profile_sha256": profile.sha256,
                    "protocol": PROTOCOL_VERSION}, folder / "model.pt")
        result.model_sha256 = record_sha256(fl.arrays)
        result.training = strategy.site_training
        result.evaluations = strategy.site_evaluations
        result.status = "completed"
    except (phases.RunRefused, RuntimeError) as exc:
        # refused: stopped before any training; failed: stopped during the rounds
        result.status, result.error = "failed" if strategy_started else "refused", str(exc)
        log.error("radfed run %s %s: %s", context.run_id, result.status, exc)
    result.seconds = time.perf_counter() - started
    report.write_outputs(result)
    final = result.final_aggregate()
    audit.append("run-end", status=result.status, error=result.error, model_sha256=result.model_sha256,
                 final=final, seconds=round(result.seconds, 3),
                 metrics_sha256=report.file_sha256(folder / "metrics.json"))
    log.info("radfed run %s %s in %.1fs; metrics, report and audit log in %s", context.run_id, result.status,
             result.seconds, folder)
    if result.status != "completed":
        raise RuntimeError(f"radfed run {result.status}: {result.error}")
