"""One run on a deployment, from submission to its results folder: `radfed deploy run`.

Flower gives the run id (`flwr run --format json`) and the run's status (`flwr ls --format json`); the
ServerApp names the results folder ``<output-dir>/<time>-run<run id>`` (server/app.py), so the folder is
found by run id under the run config's output-dir, and radfed's own status, error and dropouts come from
its metrics.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from common import runconfig
from deploy import flower
from deploy.flower import FINISHED, FlowerError
from deploy.layout import log_path, run_folder
from radfed.launch import app_run_config, overrides_text, parse_overrides

OUTPUT_WAIT = 60.0  # a ServerApp whose SuperLink went away writes its outputs after the log stream ended


def _has_run_end(audit_log: Path) -> bool:
    lines = audit_log.read_text(encoding="utf-8", errors="replace").splitlines() if audit_log.exists() else []
    return bool(lines) and '"event":"run-end"' in lines[-1]


def _flower_status(d: Path, run_id: int) -> str:
    """The run's status as Flower's `flwr ls` has it ("finished:completed", ...), or why it is unknown."""
    try:
        found = flower.runs(d, run_id)
    except FlowerError as exc:  # e.g. the SuperLink is restarting
        return f"unknown ({exc.args[0].splitlines()[-1] if exc.args[0] else 'no answer'})"
    return " ".join(str(r[key]) for r in found[:1] for key in ("status", "status-details") if r.get(key)) or "unknown"


def _await_outputs(d: Path, output_dir: Path, run_id: int) -> Path | None:
    """The run's folder once the ServerApp's last write (run-end) is in, or whatever is there after
    OUTPUT_WAIT. The log stream can end first: when the SuperLink stops or restarts mid-run, the ServerApp
    writes its outputs (status failed) only once Flower tells it, seconds later."""
    deadline = time.monotonic() + OUTPUT_WAIT
    while time.monotonic() < deadline:
        folder = run_folder(output_dir, run_id)
        if folder is not None and _has_run_end(folder / "audit.jsonl"):
            return folder
        if folder is None and _flower_status(d, run_id).startswith(FINISHED):
            return None  # Flower ended the run and no ServerApp made a folder for it
        time.sleep(1.0)
    return run_folder(output_dir, run_id)


def plan_run_config(plan_file: Path, app: Path, overrides: str = "") -> str:
    """The ``--run-config`` text that runs exactly the approved plan in ``plan_file``: its settings, plus
    ``overrides`` of where the coordinator keeps things only (``runconfig.LOCAL_KEYS``, outside the plan hash).
    Raises ValueError when an override would change a setting, or when this app (its code, profile or defaults)
    would run another plan than the one approved, naming each difference in words."""
    from common.plan import code_sha256, diff, plan_sha256, run_plan
    from common.profile import load_profile

    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
        settings = dict(plan["run_config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{plan_file} is not a run plan ({exc}); write one with: radfed plan write") from None
    given = parse_overrides(overrides)
    changing = sorted(set(given) - set(runconfig.LOCAL_KEYS))
    if changing:
        raise ValueError(f"--run-config sets {', '.join(changing)}, which the approved plan fixes: with --plan only "
                         f"{', '.join(runconfig.LOCAL_KEYS)} may be given (change a setting with a new plan that the "
                         "sites approve)")
    text = overrides_text({**settings, **given})
    config = app_run_config(text, app)
    ours = run_plan(config, load_profile(str(config["profile"])), code=code_sha256(app))
    if plan_sha256(ours) != plan_sha256(plan):
        raise ValueError(f"the app at {app} would run another plan than {plan_file} ({plan_sha256(plan)[:12]}), "
                         "which the sites approved: " + " ".join(diff(plan, ours)))
    return text


def run(d: Path, app: Path, run_config: str, quiet: bool) -> int:
    """Submit a run, show its log stream, wait for its outputs and print where they are; the exit code
    (0 completed, 1 failed, 2 not started or no outputs)."""
    # the run config as the ServerApp will get it: bad values are refused here, before anything starts, and
    # output-dir says where the results folder will be (<output-dir>/<time>-run<run id>, found by run id)
    output_dir = Path(runconfig.parse(app_run_config(run_config, app)).output_dir).expanduser()
    if not output_dir.is_absolute():
        raise ValueError(f"output-dir {str(output_dir)!r} is relative: the ServerApp runs in the SuperLink's "
                         "working folder, not here; give an absolute path (or one under ~)")
    try:
        run_id = flower.submit_run(d, app, run_config)
    except FlowerError as exc:
        print(f"flwr run did not start the run: {exc}", file=sys.stderr)
        return 2
    log = d / "logs" / f"run-{run_id}.log"
    print(f"run {run_id} started; its log stream is kept in {log}", flush=True)
    code = flower.stream_log(d, run_id, log, quiet)
    folder = _await_outputs(d, output_dir, run_id)
    print(f"\nrun {run_id}: log stream ended (flwr log exit code {code}); Flower's status: "
          f"{_flower_status(d, run_id)}")
    if folder is None:
        print(f"no folder *-run{run_id} in {output_dir}: the ServerApp did not start (see the log above, {log} "
              f"and {log_path(d, 'superlink')})", file=sys.stderr)
        return 2
    metrics = folder / "metrics.json"
    if not metrics.exists():
        print(f"run folder {folder} has no metrics.json: the ServerApp stopped before writing its outputs "
              f"(see {log_path(d, 'superlink')})", file=sys.stderr)
        return 2
    doc = json.loads(metrics.read_text(encoding="utf-8"))
    status = doc.get("status")
    print(f"run {doc.get('run_id', run_id)} {status}" + (f": {doc.get('error')}" if status != "completed" else ""))
    for dropout in doc.get("dropouts") or []:
        where = f"round {dropout['round']} ({dropout['phase']})" if dropout.get("round") else dropout.get("phase")
        print(f"  site {dropout['site']} left at {where}: {dropout['reason']}")
    print(f"  report     {folder / 'report.html'}\n  metrics    {metrics}\n  audit log  {folder / 'audit.jsonl'}\n"
          f"  audit key  {folder / 'audit.pub'} (publish it once to the auditors; they pin it)\n"
          f"  verify     radfed audit verify {folder / 'audit.jsonl'} --pubkey <published audit.pub> "
          "--receipts <each site's folder or receipts.jsonl>")
    return 0 if status == "completed" else 1
