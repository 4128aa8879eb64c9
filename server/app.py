"""radfed ServerApp: the coordinator's side of a run, phase by phase (see docs/architecture.md).

plan -> features -> moments (standardisation) -> FedAvg rounds (train + evaluate at every site)
-> model, metrics.json, report and audit log in one run folder.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common import covariates, dp, dp_query, families, metrics, runconfig
from common.canon import sha256_json
from common.plan import plan_sha256, run_plan
from common.profile import load_profile
from common.protocol import PROTOCOL_VERSION, RUN_END_MARK, START_GATE
from common.runconfig import RunConfig
from server import batching, clinical, comparison, merging, phases, pipeline, polling, robustness, validation
from server.audit import AuditLog, artifact_hashes, load_or_create_key
from server.drawing import Ahead
from server.federation import (
    JOIN_GRACE,
    JOIN_GRACE_SIMULATION,
    Cohort,
    LinkLost,
    Run,
    RunRefused,
    wait_for_nodes,
)
from server.results import RunResult
from server.strategy import record_sha256

log = logging.getLogger("flwr.radfed.server")
app = ServerApp()


def run_folder(run: RunConfig, run_id: int) -> Path:
    root = Path(run.output_dir).expanduser()
    folder = root / f"{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class SuperLinkGone(RuntimeError):
    """SIGINT/SIGTERM reached the ServerApp mid-run: Flower sends it when the ServerApp's flower-superexec
    exits, i.e. when the SuperLink stopped or restarted (a SuperLink does not resume a run)."""


def raise_on_stop_signal() -> Callable[[], None]:
    """Until the returned function is called, SIGINT/SIGTERM raise SuperLinkGone in main() instead of running
    Flower's exit handler (which force-exits 5 s later): main() still writes its outputs and a signed run-end."""
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        return lambda: None

    def stop(signum: int, _frame: object) -> None:
        raise SuperLinkGone(f"the ServerApp got {signal.Signals(signum).name}: its SuperLink stopped or restarted "
                            "during the run, and a SuperLink does not resume runs; start a new run")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def warm_imports() -> None:
    """Import what the coordinator needs later, while it waits for the sites' first replies (``server/polling.py``):
    torch (the starting model, model.pt; ~2 s of the main fit otherwise) and matplotlib (the report's figures, ~1 s
    of the outputs). ``server.app`` itself imports neither, so the ServerApp starts and sends the plan query first."""
    import torch  # noqa: F401
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401

    from server import report  # noqa: F401  # the report's modules: not needed before the outputs


def announce_end(status: str, lines: list[str]) -> None:
    """For a launcher that asked for it (RUN_END_MARK names a file): the run's status and last lines, written at
    once (a new file renamed into place) after every output and the signed run-end, before they are logged. The
    launcher stops the run's processes when the file appears instead of when the lines come through Flower's log
    stream (uploaded every 0.2 s, streamed every 0.5 s: about half a second later), and prints the lines itself."""
    mark = os.environ.get(RUN_END_MARK)
    if not mark:
        return
    partial = f"{mark}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump({"status": status, "lines": lines}, f)
    os.replace(partial, mark)


GATE_TIMEOUT = 24 * 3600.0


def wait_for_start(timeout: float | None = None) -> None:
    """When the launcher started the run early (the demo, while its last sites extract), wait for its go (the file
    START_GATE names) before anything else: no run folder, no audit entry, no message before every site's inputs
    are ready. The coordinator's later imports (``warm_imports``) are done meanwhile, in a thread."""
    gate = os.environ.get(START_GATE)
    if not gate or os.path.exists(gate):
        return
    # in a thread: at the go the run starts even if they are not done (torch alone takes seconds on a loaded
    # machine); the first wait for replies imports them again, waiting only for what this thread has not finished
    threading.Thread(target=warm_imports, name="radfed-warm-imports", daemon=True).start()
    timeout = GATE_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise RuntimeError(f"radfed: the launcher did not start the run within {timeout:.0f}s ({gate} missing)")
        time.sleep(0.02)


def privacy_account(run: RunConfig) -> dp.DPAccount | None:
    """The run's DP budget account, or None with DP off; bad settings refuse the run."""
    try:
        settings = dp.settings_from_config(run.as_dict())
    except dp.DPConfigError as exc:
        raise RunRefused(f"differential privacy settings: {exc}") from None
    if settings is None:
        return None
    # exact training or trees with DP on updates are refused when the run config is parsed (common/runconfig.py)
    return dp.DPAccount.from_settings(settings)


def query_account(run: RunConfig) -> dp_query.QueryAccount | None:
    """The account of the noised query phases, or None when they are sent exactly."""
    if not run.dp_query:
        return None
    return dp_query.QueryAccount(run.dp_query_noise_multiplier, run.dp_query_clip, run.dp_delta)


def site_share(fitted: pipeline.Fitted, names: list[str]) -> dict[str, object]:
    """metrics.json ``harmonization.site_share``: per agreed feature, the share of its variation between sites
    before ComBat (from ComBat's sums) and after (from the moments of the harmonised features); {} when the
    moments were noised. Without ComBat, "after" is the raw features' share."""
    after = fitted.pooled.site_share
    if after is None:
        return {}
    before = fitted.harmonization.site_share if fitted.harmonization is not None else None
    # the radiomics features only: the clinical inputs (model-covariates) come after them and have no ComBat side
    share: dict[str, object] = {"features": names, "after": after[:len(names)].tolist()}
    if before is not None:
        share["before"] = before.tolist()
    return {"site_share": share}


def final_pooled(ctx: Run, cohort: Cohort, fitted: pipeline.Fitted,
                 oof_terms: dict[str, clinical.Terms] | None = None) -> dict[str, object] | None:
    """The internal validation's pooled clinical metrics: of the final evaluation, with the final model's
    calibration fit (extra rounds); or, under cross-validation, of the out-of-fold scores (``oof_terms``), which
    come from several models, so no single model's calibration is fitted."""
    trained = fitted.trained
    if oof_terms is None and not trained.terms:
        return None
    last = max(trained.training) if oof_terms is not None else max(trained.terms)
    terms = oof_terms if oof_terms is not None else trained.terms[last]
    summary: dict[str, object] = {"round": last, **clinical.pooled(terms, ctx.config.score_bins,
                                                                ctx.config.decision_thresholds)}
    if not summary.get("sites"):
        return None
    if oof_terms is not None:
        summary["calibration"] = {"skipped": "cross-validation: the out-of-fold scores come from one model per fold"}
    else:
        summary["calibration"] = clinical.calibration_phase(ctx, cohort, trained.arrays, fitted.config())
    ctx.audit.append("clinical-metrics", **summary)
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:  # the config is read once, here; a bad value refuses the run before anything is sent
        run = runconfig.parse(context.run_config)
    except runconfig.RunConfigError as exc:
        log.error("radfed run %s refused: %s", context.run_id, exc)
        raise RuntimeError(f"radfed run refused: {exc}") from None
    loso, local = run.external_validation == "loso", run.local_only == "own-pipeline"
    # with folds, the report's figures are drawn during them (report.draw_ahead) by a child started now: it warms up
    # (imports, matplotlib's fonts) at the lowest priority while the run starts, a gated one at the gate
    ahead = Ahead() if loso or local else None
    if ahead is not None:
        ahead.start()
    profile = load_profile(run.profile)
    plan = run_plan(run, profile)  # the code and config this coordinator runs: worked out before the go, as it waits
    plan_hash = plan_sha256(plan)
    wait_for_start()
    cfg = run.as_dict()
    folder = run_folder(run, context.run_id)
    key_path = Path(run.audit_key).expanduser() if run.audit_key else folder.parent / "coordinator-audit-key.pem"
    audit = AuditLog(folder / "audit.jsonl", load_or_create_key(key_path))
    timeout, min_sites = run.query_timeout, run.min_sites
    (folder / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True), encoding="utf-8")
    audit.append("run-start", run_id=context.run_id, config=cfg, config_sha256=sha256_json(cfg),
                 plan_sha256=plan_hash,
                 audit_key_sha256=audit.fingerprint,
                 profile={"name": profile.name, "version": profile.version, "sha256": profile.sha256},
                 protocol=PROTOCOL_VERSION, code_sha256=plan["code_sha256"])
    log.info("radfed run %s: results go to %s", context.run_id, folder)
    started = time.perf_counter()
    result = RunResult(run_id=context.run_id, folder=folder, config=cfg, profile=profile)
    restore_signals = raise_on_stop_signal()
    # replies pulled in short steps (server/polling.py), at most send-batch messages at a time (server/batching.py),
    # several requests to one site packed into one message (server/merging.py), which also counts what was sent
    grace = JOIN_GRACE_SIMULATION if polling.in_memory(grid) else JOIN_GRACE
    packing = merging.PackingGrid(batching.batched(polling.polling(grid, idle=[warm_imports]), run.send_batch))
    grid = packing  # type: ignore[assignment]
    ctx = Run(grid, run, audit, folder, profile)
    try:
        ctx.dp_account = privacy_account(run)
        ctx.query_account = query_account(run)
        covariate_spec = covariates.describe(run.covariates())
        if run.robustness_min_icc > 0:
            robustness.require_perturbations(run.robustness_min_icc, profile)
        node_ids = wait_for_nodes(grid, min_sites, timeout, grace)
        fed = phases.plan_phase(ctx, node_ids, plan_hash)
        result.site_counts, result.dropouts = fed.counts, fed.dropped
        agreement = phases.features_phase(ctx, fed)
        result.split_counts = agreement.split_counts
        cv = run.internal_validation == "cv"  # then nothing is held out: every case trains the final model
        main_cohort = Cohort(fed, agreement)
        fitted = pipeline.fit(ctx, main_cohort, covariate_spec, evaluate_rounds=not cv, histograms=True)
        if fitted.harmonization is not None:  # what `radfed site join` harmonises a later hospital against
            about = {"run_id": context.run_id, "profile_sha256": profile.sha256,
                     "combat": {"parametric": run.combat_parametric, "eb": run.combat_eb,
                                "mean-only": run.combat_mean_only}, "covariates": covariate_spec}
            (folder / "harmonization.json").write_text(
                json.dumps({**about, **fitted.harmonization.late_joiner}), encoding="utf-8")
        result.validation = {}
        crossed: dict[str, object] = {}
        if cv:  # internal validation: out-of-fold scores of models refitted without each fold
            crossed = validation.cross_validate(ctx, fed, agreement, covariate_spec)
            result.validation["cv"] = {"folds": crossed["folds"]}
        # the run's model among the families, by the plan's rule, before any external validation
        fitted.family = comparison.choose(ctx, comparison.internal_records(fitted, crossed))
        chosen, trained = fitted.chosen, fitted.trained
        result.features = {"agreed": len(agreement.names), "n": len(chosen.names),
                           "constant": chosen.dropped_constant, "candidates": chosen.candidates,
                           "dropped_correlated": chosen.dropped_correlated, "dropped_l1": chosen.dropped_l1,
                           "selected": dict(zip(chosen.names, chosen.t, strict=True)),
                           "sha256": sha256_json(chosen.names)}
        result.harmonization = {**(fitted.histograms or {}), **site_share(fitted, agreement.names)}
        if fitted.robustness is not None:
            result.features["robustness"] = fitted.robustness.summary()
        arrays = trained.arrays
        if families.family(fitted.family).linear:
            # per standard deviation of each feature (the model standardises its inputs): the report's "weight"
            result.features["weights"] = dict(zip(chosen.names, arrays["linear.weight"].numpy().ravel().tolist(),
                                                  strict=True))
        import torch  # here, not at the top: the ServerApp starts (and answers the plan) seconds sooner without it

        torch.save({"state_dict": arrays.to_torch_state_dict(), "features": chosen.names, "family": fitted.family,
                    "profile_sha256": profile.sha256, "protocol": PROTOCOL_VERSION, "run_id": context.run_id,
                    "harmonization": "combat" if fitted.harmonization is not None else "none",
                    "agreed_features_sha256": agreement.sha256, "schema": "radfed.model/1",
                    # the manifest covariates the model takes as inputs (clinical/...), coded as at the sites
                    "model_covariates": covariates.describe(run.model_covariates_spec()),
                    "profile": {"name": profile.name, "version": profile.version},
                    # every family's model of the main run (the comparison's rows), the chosen one above
                    **({"models": {f: t.arrays.to_torch_state_dict() for f, t in fitted.models.items()}}
                       if len(fitted.models) > 1 else {})}, folder / "model.pt")
        result.model_sha256 = record_sha256(arrays)
        result.training, result.evaluations, result.curves = trained.training, trained.evaluations, trained.curves
        if cv:
            own = crossed["families"][fitted.family]  # type: ignore[index]
            last = max(trained.training) if trained.training else run.num_server_rounds
            result.evaluations, result.curves = {last: own["sites"]}, {last: own["curves"]}
            result.pooled = final_pooled(ctx, main_cohort, fitted, own["terms"])
        else:
            result.pooled = final_pooled(ctx, main_cohort, fitted)
        internal_compared = {} if cv else comparison.compare(ctx, fitted, main_cohort, "test")
        if loso or local:  # every fold of both in the same rounds (fold-batching)
            from server import report  # loaded at the first wait (warm_imports)

            # the report's figures known by now, drawn in the niced child while the folds run (server.drawing)
            report.draw_ahead(result, ahead)
            held_out, alone = validation.external_and_local(ctx, fed, agreement, covariate_spec, loso, local,
                                                            family=fitted.family, main=fitted)
            if loso:
                result.validation["loso"] = held_out
                # the held-out sites' calibration slopes pooled by inverse variance (as the families' external rows)
                result.validation["loso_calibration"] = metrics.pool_slopes(
                    [r["calibration_fit"] for r in held_out.values() if isinstance(r.get("calibration_fit"), dict)])
            if local:
                result.validation["local_only"] = alone
        result.families = comparison.summary(ctx, main_cohort, fitted, crossed, internal_compared,
                                             result.validation.get("loso", {}), result.pooled)
        if result.validation.get("loso") and result.validation.get("local_only"):
            result.validation["federation_gain"] = metrics.federation_gain(result.validation["loso"],
                                                                           result.validation["local_only"])
        result.status = "completed"
    except (RunRefused, RuntimeError) as exc:
        # refused: stopped before any training; failed: stopped during the rounds, or the SuperLink went away
        failed = ctx.training_started or isinstance(exc, (SuperLinkGone, LinkLost))
        result.status, result.error = "failed" if failed else "refused", str(exc)
        log.error("radfed run %s %s: %s", context.run_id, result.status, exc)
    finally:
        restore_signals()  # Flower's handlers again: the outputs and run-end below are written in any case
    privacy = {}
    if ctx.dp_account is not None:
        privacy["model_updates"] = ctx.dp_account.to_dict()
        audit.append("privacy-budget", **privacy["model_updates"])
    if ctx.query_account is not None:
        privacy["query"] = ctx.query_account.to_dict()
        audit.append("privacy-budget-query", **privacy["query"])
    result.privacy = privacy or None
    result.seconds = time.perf_counter() - started
    from server import report  # loaded at the first wait (warm_imports), not when the ServerApp starts

    report.write_outputs(result, ahead)
    final = result.final_aggregate()
    # every output is written by now: run-end signs each file's hash, so `radfed audit verify` can compare them
    signed = artifact_hashes(folder)
    sent = packing.counts()  # Flower messages and the requests they carried (merge-phases packs several in one)
    audit.append("run-end", status=result.status, error=result.error, model_sha256=result.model_sha256,
                 final=final, seconds=round(result.seconds, 3), artifacts=signed,
                 metrics_sha256=signed.get("metrics.json"), messages=sent)
    last = []  # one line per site that left, by name, at the end where the coordinator looks; then the run's
    for drop in result.dropouts:
        where = f"{drop['phase']} phase" + (f", round {drop['round']}" if drop.get("round") is not None else "")
        last.append((logging.WARNING, f"Site {drop['site']} did not take part from the {where} on: {drop['reason']}"))
    last.append((logging.INFO, f"radfed run {context.run_id} {result.status} in {result.seconds:.1f}s "
                               f"({sent['messages']} message(s) to {sent['sites']} site(s), carrying "
                               f"{sent['requests']} request(s)); metrics, report and audit log in {folder}"))
    announce_end(result.status, [line for _, line in last])
    for level, line in last:
        log.log(level, "%s", line)
    if result.status != "completed":
        raise RuntimeError(f"radfed run {result.status}: {result.error}")
