"""The coordinator's commands: the demo federation and the run plan the sites approve.

  radfed demo                               synthetic hospitals -> a whole federation -> results
  radfed plan write --output PLAN.json      the run plan (code, config, profile, messages) sites approve

A real deployment's processes are ``radfed deploy`` (deploy/cli.py, its own parser).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from client.workerpool import itk_worker, worker_pool
from radfed.cli.options import add_json, add_output, add_profile, add_workers, print_json
from radfed.cli.site import site_profile

if TYPE_CHECKING:
    from radfed.inprocess import InProcessFederation

DEFAULT_HOME = Path("~/.radfed").expanduser()


SiteResult = tuple[str, int, int, int, float, float]  # extract_one_site's


def extract_one_site(site_dir: str, profile_name: str | None, workers: int) -> SiteResult:
    """Extract one site's cases (cached): (name, usable, extracted now, problems, seconds, seconds per case)."""
    from client.extract import extract_site
    from client.site import load_site

    profile = site_profile(site_dir, profile_name)
    site = load_site(site_dir, profile.sequences)
    table, summary = extract_site(site, profile, workers=workers)
    return (site.name, len(table.case_ids), summary.extracted, len(table.problems), summary.seconds,
            summary.seconds_per_extracted_case)


@contextmanager
def site_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """``workers`` processes extracting whole sites side by side (``extract_one_site`` with 1 worker each), their
    ITK threads sharing the cores between them; the processes end with the block (``worker_pool``)."""
    with worker_pool(workers, itk_worker, (max(1, (os.cpu_count() or 1) // workers),)) as pool:
        yield pool


def extract_sites(site_dirs: Sequence[Path], profile_name: str | None, workers: int) -> list[SiteResult]:
    """Every site extracted (cached), ``workers`` sites at a time: ``extract_one_site``'s tuple per site, in order."""
    with site_pool(workers) as pool:
        return list(pool.map(extract_one_site, [str(d) for d in site_dirs], [profile_name] * len(site_dirs),
                             [1] * len(site_dirs)))


def approve_demo_plan(site_dirs: list[Path], run_config: dict) -> str:
    """The demo's visible approval step: every synthetic hospital approves this run's plan."""
    plan_hash = demo_plan_hash(run_config)
    approve_plan(site_dirs, plan_hash)
    return plan_hash


def demo_plan_hash(run_config: dict) -> str:
    """The sha256 of the plan of a run with these overrides (it imports Flower's config module: seconds loaded)."""
    from common.plan import plan_sha256, run_plan
    from common.profile import load_profile
    from radfed.launch import app_run_config

    config = app_run_config(run_config)
    return plan_sha256(run_plan(config, load_profile(str(config["profile"]))))


def approve_plan(site_dirs: list[Path], plan_hash: str) -> None:
    from client.approvals import decide

    for site_dir in site_dirs:
        decide(Path(site_dir), plan_hash, "approve", note="radfed demo")


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for i, row in enumerate([header, *rows]):
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def cmd_demo(args: argparse.Namespace) -> int:
    # what the federation and the summary need is imported where it is used: before the extraction it would hold its
    # start back (~0.5 s), once a core is idle beside the last sites it costs next to nothing
    from radfed import synth

    # With --json the steps go to stderr and Flower's stream to its log file: stdout holds the document alone.
    say = print if not args.json else lambda *a, **k: print(*a, **k, file=sys.stderr)
    data_root = Path(args.data_root).expanduser().resolve()
    output_dir = Path(args.output_dir).expanduser().resolve()
    t0 = time.perf_counter()
    say(f"[1/4] synthetic hospitals in {data_root}")
    site_dirs = synth.make_demo(data_root, seed=args.seed)
    say(f"      {len(site_dirs)} sites ready in {time.perf_counter() - t0:.1f}s")

    run_config: dict[str, Any] = {"data-root": str(data_root), "output-dir": str(output_dir),
                                  "num-server-rounds": args.rounds, "profile": args.profile}
    if args.robustness_min_icc is not None:
        run_config["robustness-min-icc"] = args.robustness_min_icc
    before = set(output_dir.glob("*-run*")) if output_dir.exists() else set()
    flwr_home = Path(args.flwr_home).expanduser().resolve() if args.flwr_home else DEFAULT_HOME / "flwr"
    echo = not (args.quiet or args.json)

    t1 = time.perf_counter()
    say(f"[2/4] radiomics extraction at each site (cached; {args.workers} processes)")
    with ExitStack() as stack:
        federation: InProcessFederation | None = None
        plan_hash = ""
        with site_pool(args.workers) as pool:
            pending = {pool.submit(extract_one_site, str(d), args.profile, 1) for d in site_dirs}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for job in done:
                    name, used, extracted, failed, seconds, _ = job.result()
                    say(f"      {name}: {used} cases usable, {extracted} extracted now, {failed} problem(s)")
                if federation is None and pending and len(pending) < args.workers:
                    from radfed.inprocess import in_process_federation

                    # a core is idle until the last sites are done: the simulation and its ClientApp workers boot on
                    # it, and the ServerApp waits for every site's extraction and approval before anything
                    # (launch.START_GATE)
                    federation = stack.enter_context(in_process_federation(
                        run_config, num_supernodes=len(site_dirs), flwr_home=flwr_home, echo=echo, gated=True))
                    plan_hash = demo_plan_hash(run_config)  # on the idle core too, not between extraction and run
        extraction = time.perf_counter() - t1
        say(f"      extraction done in {extraction:.1f}s")

        plan_hash = plan_hash or demo_plan_hash(run_config)
        approve_plan(site_dirs, plan_hash)
        say(f"[3/4] each hospital approves run plan {plan_hash[:16]}... (radfed site approve HASH --site DIR;"
            " see the plan with radfed plan write)")

        say(f"[4/4] federation: {len(site_dirs)} simulated sites, {args.rounds} rounds (Flower's simulation in this "
            "process; `flwr run .` runs the same app through a SuperLink)")
        t2 = time.perf_counter()
        if federation is None:
            from radfed.inprocess import in_process_federation

            federation = stack.enter_context(in_process_federation(
                run_config, num_supernodes=len(site_dirs), flwr_home=flwr_home, echo=echo))
        federation.finish()
    federation_seconds = time.perf_counter() - t2
    from server.report import final_table
    from server.report_validation import calibration_sentence, gain_sentence, gain_table

    runs = sorted(set(output_dir.glob("*-run*")) - before)
    if not runs:
        print(f"no run folder appeared in {output_dir}; see {flwr_home / 'superlink.log'}", file=sys.stderr)
        return 1
    folder = runs[-1]
    doc = json.loads((folder / "metrics.json").read_text())
    code = 0 if doc["status"] == "completed" else 1
    files = {"metrics": folder / "metrics.json", "report": folder / "report.html", "audit_log": folder / "audit.jsonl"}
    if args.json:
        print_json({"status": doc["status"], "error": doc.get("error"), "run_folder": str(folder),
                    "plan_sha256": plan_hash, "seconds": round(time.perf_counter() - t0, 1),
                    "files": {k: str(v) for k, v in files.items()}, "metrics": doc})
        return exit_now(code)
    # the federation's wall time counts the simulation's and its workers' start and stop, not only the ServerApp's own
    # seconds; what of their start overlapped the last sites' extraction is not in it
    print(f"\nrun {doc['status']} in {time.perf_counter() - t0:.0f}s: extraction {extraction:.0f}s, federation "
          f"{federation_seconds:.0f}s after it (Flower's start and stop included, begun beside the last sites' "
          f"extraction; the ServerApp {doc['seconds']:.0f}s)")
    if doc["status"] != "completed":
        print(f"  reason: {doc['error']}")
    else:
        robust = doc["features"].get("robustness")
        if robust:
            print(f"  robustness filter: {robust['n_removed']} of {robust['n_features']} features had ICC below "
                  f"{robust['threshold']} under {robust['measurements'] - 1} perturbed copies and left")
        _print_table(*final_table(doc))
        header, rows = gain_table(doc)
        if rows:
            print("\n  at sites the model never saw (leave-one-site-out) vs each other hospital alone:")
            _print_table(header, rows)
            print("  " + str(gain_sentence(doc)))
        calibration = calibration_sentence(doc)
        if calibration:
            print("  " + calibration)
    drops = [d for d in doc.get("dropouts") or [] if isinstance(d, dict)]
    if drops:
        print("\n  sites that left the run (each says why and what to do):")
        for d in drops:
            where = f"round {d['round']}, {d.get('phase')}" if d.get("round") is not None else f"{d.get('phase')} phase"
            print(f"    {d.get('site')} ({where}): {d.get('reason')}")
    print(f"\n  metrics   {files['metrics']}\n  report    {files['report']}"
          f"\n  audit log {files['audit_log']}   (check it: radfed audit verify {files['audit_log']})")
    return exit_now(code)


def exit_now(code: int) -> NoReturn:
    """End the demo's process here: its federation ran in it (radfed.inprocess), and every output is
    written and printed and its ClientApp workers are stopped (the simulation's thread, winding down, ends with it);
    the interpreter's own teardown of what the run loaded (torch's and Flower's exit hooks and finalisers) took
    seconds for nothing."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_plan_write(args: argparse.Namespace) -> int:
    from common.plan import plan_sha256, run_plan, summary
    from common.profile import load_profile
    from radfed.launch import app_run_config

    config = app_run_config(args.run_config or "")
    plan = run_plan(config, load_profile(str(config["profile"])))  # refuses a bad value, naming the key
    out = Path(args.output).expanduser()
    out.write_text(json.dumps(plan, indent=2, sort_keys=True), encoding="utf-8")
    if args.json:
        print_json({"plan_sha256": plan_sha256(plan), "output": str(out), "plan": plan})
        return 0
    print(summary(plan))
    print(f"\nwrote {out}: send it to every site; each approves it with\n"
          f"  radfed site approve {plan_sha256(plan)} --site <site folder>")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Where a run is (from its audit log): once, or with --watch until it ends. Exit 0 running or completed, 1
    failed or refused."""
    from server.progress import describe, latest_run, progress, read_entries

    folder = Path(args.run).expanduser() if args.run else latest_run(Path(args.output_dir).expanduser())
    log = folder / "audit.jsonl"
    if not log.is_file():
        raise ValueError(f"{folder} has no audit.jsonl: give a run folder (<output-dir>/<time>-run<id>)")
    shown = None
    while True:
        state = {**progress(read_entries(log)), "run_folder": str(folder)}
        if args.json and args.watch:
            print(json.dumps(state), flush=True)  # one line per look: a stream a program can follow
        elif args.json:
            print_json(state)
        elif describe(state) != shown:
            shown = describe(state)
            print(shown + ("\n" if args.watch else ""), flush=True)
        if not args.watch or state["status"] != "running":
            return 0 if state["status"] in ("running", "completed") else 1
        time.sleep(args.interval)


def add_coordinator_commands(sub: Any) -> None:
    """``radfed demo``, ``radfed status`` and ``radfed plan write`` on the root's subcommands."""
    demo = sub.add_parser("demo", help="coordinator: generate synthetic hospitals and run a whole federation on them")
    demo.add_argument("--data-root", default=str(DEFAULT_HOME / "demo"), metavar="DIR",
                      help="where the synthetic hospitals go (default %(default)s)")
    demo.add_argument("--output-dir", default=str(DEFAULT_HOME / "runs"), metavar="DIR",
                      help="where run folders go (default %(default)s)")
    demo.add_argument("--flwr-home", default=None, metavar="DIR", help="private FLWR_HOME for the simulation")
    demo.add_argument("--rounds", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--robustness-min-icc", type=float, default=None, metavar="ICC",
                      help="robustness filter: features whose ICC under the profile's perturbations is below ICC "
                           "leave before selection (default: the app's robustness-min-icc, 0 = off)")
    add_profile(demo, default="default")
    add_workers(demo)
    demo.add_argument("--quiet", action="store_true", help="hide Flower's log stream")
    add_json(demo)
    demo.set_defaults(func=cmd_demo)

    status = sub.add_parser(
        "status", help="coordinator: where a run is (phase, round, fold, sites, time left), from its audit log",
        description="Read a run's audit log while it runs (simulation or deployment: the run folder is on the "
                    "coordinator's machine) and say where it is: phase, round x of y, the fold of leave-one-site-out, "
                    "local-only or cross-validation, which sites take part, answered the last round or left and why, "
                    "elapsed time and an estimate of what is left. Exit 0: running or completed; 1: failed or "
                    "refused.")
    status.add_argument("run", nargs="?", default=None, metavar="RUN_FOLDER",
                        help="a run folder (default: the newest under --output-dir)")
    status.add_argument("--output-dir", default=str(DEFAULT_HOME / "runs"), metavar="DIR",
                        help="where the coordinator's run folders are (default %(default)s)")
    status.add_argument("--watch", action="store_true", help="keep watching until the run ends (JSON: one line each)")
    status.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between looks (--watch)")
    add_json(status)
    status.set_defaults(func=cmd_status)

    plan = sub.add_parser("plan", help="coordinator: the run plan sites approve").add_subparsers(
        dest="plan_command", required=True, metavar="COMMAND")
    write = plan.add_parser("write", help="write the plan of a run with these run-config overrides")
    add_output(write, "the plan file to write (send it to every site)", required=True)
    write.add_argument("--run-config", default="", help="overrides as for flwr run, e.g. \"num-server-rounds=10\"")
    add_json(write)
    write.set_defaults(func=cmd_plan_write)
