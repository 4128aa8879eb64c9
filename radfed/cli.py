"""`radfed`: every user's commands in one place.

  radfed demo                    coordinator: synthetic hospitals -> a whole federation -> results
  radfed plan write PLAN.json    coordinator: the run plan (code, config, profile, messages) sites approve
  radfed site check SITE_DIR     site administrator: can the site take part, which cases need a fix (fast)
  radfed site extract SITE_DIR   site administrator: check and extract a site's cases (cached)
  radfed site plan show PLAN     site administrator: what a run would compute and send, and its hash
  radfed site approve HASH       site administrator: approve a run plan (revoke HASH to withdraw it)
  radfed site outbox SITE_DIR    site administrator: everything the site has sent
  radfed site join POOLED --site SITE_DIR   site administrator: harmonise a late-joining site against a run's ComBat
  radfed predict --model M ...   site administrator: HGG vs BM for a new case, at the site
  radfed profile show [NAME]     anyone: the extraction profile, its version and hash
  radfed audit verify LOG        auditor: check a run's audit chain and the sites' receipts
  radfed deploy COMMAND ...      coordinator and sites: real SuperLink/SuperNodes with TLS (docs/deployment.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.profile import Profile

DEFAULT_HOME = Path("~/.radfed").expanduser()


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for i, row in enumerate([header, *rows]):
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _site_profile(site_dir: str, profile_name: str | None) -> Profile:
    """The profile named on the command line, else the site.yaml's, else ``default``."""
    from client.site import site_settings
    from common.profile import load_profile

    return load_profile(profile_name or site_settings(site_dir).get("profile") or "default")


def _extract_one_site(site_dir: str, profile_name: str | None, workers: int) -> tuple[str, int, int, int, float, float]:
    from client.extract import extract_site
    from client.site import load_site

    profile = _site_profile(site_dir, profile_name)
    site = load_site(site_dir, profile.sequences)
    table, summary = extract_site(site, profile, workers=workers)
    return (site.name, len(table.case_ids), summary.extracted, len(table.problems), summary.seconds,
            summary.seconds_per_extracted_case)


def cmd_site_check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from client.sitecheck import check_site, render, write_report

    check = check_site(args.site_dir, args.profile, args.min_cases_per_class, args.test_fraction)
    console = Console()
    render(check, console)
    report = write_report(check, Path(args.json).expanduser() if args.json else None)
    console.print(f"report: {report}", soft_wrap=True)
    return check.exit_code


def cmd_site_extract(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from client.extract import extract_site, features_path
    from client.site import load_site

    # Failures are shown in the table below; without a handler Python would also print each one mid-bar.
    logging.getLogger("flwr.radfed.extract").addHandler(logging.NullHandler())
    profile = _site_profile(args.site_dir, args.profile)
    site = load_site(args.site_dir, profile.sequences)
    console = Console()
    columns = (TextColumn("extracting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("extract", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        table, summary = extract_site(site, profile, workers=args.workers, progress=progress)
    per_case = f", {summary.seconds_per_extracted_case:.2f}s per case" if summary.extracted else ""
    console.print(f"site {site.name}: {len(table.case_ids)} usable case(s), {summary.extracted} extracted now, "
                  f"{summary.cached} from the cache, {len(table.problems)} problem(s), "
                  f"{summary.seconds:.1f}s{per_case}", soft_wrap=True)
    if table.problems:
        problems = Table(title="cases not used", title_justify="left")
        for column in ("case", "problem", "fix"):
            problems.add_column(column)
        for p in table.problems:
            problems.add_row(p.case_id, p.reason, p.fix)
        console.print(problems)
    csv_path = features_path(site, profile)
    console.print(f"features    {csv_path}\nprovenance  {csv_path.with_suffix('.json')}\n"
                  f"log         {site.files.extraction_log}\nerrors      {site.files.errors}",
                  soft_wrap=True)
    return 0 if table.case_ids else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    from deploy.cli import main as deploy_main

    return deploy_main(args.args)


def cmd_profile_show(args: argparse.Namespace) -> int:
    from common.profile import load_profile

    profile = load_profile(args.name)
    print(f"profile {profile.name} v{profile.version}\nsha256  {profile.sha256}\nfile    {profile.source}\n")
    print(Path(profile.source).read_text(encoding="utf-8"))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from client.site import site_files
    from server.audit import verify

    receipts = []
    for item in args.receipts or []:  # a site folder or a receipts file
        path = Path(item)
        receipts.append(site_files(path).receipts if path.is_dir() else path)
    result = verify(Path(args.log), pubkey=Path(args.pubkey) if args.pubkey else None, receipts=receipts,
                    artifacts=not args.log_only)
    if result.bad_line is not None or not result.entries:
        where = f" at line {result.bad_line}" if result.bad_line else ""
        print(f"audit log BROKEN{where}: {result.reason} ({result.entries} entries before it verify)")
        return 1
    print(f"audit log chain intact: {result.entries} entries, signatures valid, last sha256 {result.last_sha256}")
    print("events: " + ", ".join(f"{k} x{v}" for k, v in result.events.items()))
    if args.log_only:
        print("run files: not compared (--log-only)")
    else:
        print(f"run files: {len(result.artifacts_checked)} match the hashes run-end signed"
              + (f" ({', '.join(result.artifacts_checked)})" if result.artifacts_checked else ""))
    if receipts:
        print(f"receipts: {result.receipts_checked} model hash(es) in {result.receipt_files} receipts file(s) "
              "checked against the log")
    if not args.pubkey:
        print("note: checked against audit.pub beside the log; pin the coordinator's key with --pubkey")
    if result.ok:
        print("audit log intact: the log, the run files and the receipts agree")
        return 0
    print(f"audit FAILED: {len(result.problems)} problem(s)")
    for problem in result.problems:
        print(f"  - {problem}")
    return 1


def cmd_site_outbox(args: argparse.Namespace) -> int:
    from client.site import site_files

    outbox = site_files(args.site_dir).outbox
    if not outbox.exists():
        print(f"{outbox} does not exist: this site has sent nothing yet")
        return 0
    for line in outbox.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if args.run and str(entry["run_id"]) != args.run:
            continue
        parts = []
        for record, values in entry["records"].items():
            for key, value in values.items():
                shown = f"array{tuple(value['shape'])}" if isinstance(value, dict) and "shape" in value else value
                parts.append(f"{record}.{key}={shown}")
        print(f"{entry['time']} run {entry['run_id']} {entry['type']}: " + ", ".join(parts))
    return 0


def approve_demo_plan(site_dirs: list[Path], run_config: dict) -> str:
    """The demo's visible approval step: every synthetic hospital approves this run's plan."""
    from client.approvals import decide
    from common.plan import plan_sha256, run_plan
    from common.profile import load_profile
    from radfed.launch import app_run_config

    config = app_run_config(run_config)
    plan_hash = plan_sha256(run_plan(config, load_profile(str(config["profile"]))))
    for site_dir in site_dirs:
        decide(Path(site_dir), plan_hash, "approve", note="radfed demo")
    return plan_hash


def cmd_demo(args: argparse.Namespace) -> int:
    from radfed import synth
    from radfed.launch import run_federation
    from server.report import final_table

    data_root = Path(args.data_root).expanduser().resolve()
    output_dir = Path(args.output_dir).expanduser().resolve()
    t0 = time.perf_counter()
    print(f"[1/4] synthetic hospitals in {data_root}")
    site_dirs = synth.make_demo(data_root, seed=args.seed)
    print(f"      {len(site_dirs)} sites ready in {time.perf_counter() - t0:.1f}s")

    t1 = time.perf_counter()
    print(f"[2/4] radiomics extraction at each site (cached; {args.workers} processes)")
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        jobs = [pool.submit(_extract_one_site, str(d), args.profile, 1) for d in site_dirs]
        for job in jobs:
            name, used, extracted, failed, seconds, _ = job.result()
            print(f"      {name}: {used} cases usable, {extracted} extracted now, {failed} problem(s)")
    print(f"      extraction done in {time.perf_counter() - t1:.1f}s")

    run_config = {"data-root": str(data_root), "output-dir": str(output_dir), "num-server-rounds": args.rounds,
                  "profile": args.profile}
    plan_hash = approve_demo_plan(site_dirs, run_config)
    print(f"[3/4] each hospital approves run plan {plan_hash[:16]}... (radfed site approve HASH --site DIR;"
          " see the plan with radfed plan write)")

    print(f"[4/4] federation: {len(site_dirs)} simulated sites, {args.rounds} rounds (Flower simulation)")
    before = set(output_dir.glob("*-run*")) if output_dir.exists() else set()
    flwr_home = Path(args.flwr_home).expanduser().resolve() if args.flwr_home else DEFAULT_HOME / "flwr"
    run_federation(run_config, num_supernodes=len(site_dirs), flwr_home=flwr_home, echo=not args.quiet)
    runs = sorted(set(output_dir.glob("*-run*")) - before)
    if not runs:
        print(f"no run folder appeared in {output_dir}; see {flwr_home / 'superlink.log'}", file=sys.stderr)
        return 1
    folder = runs[-1]
    doc = json.loads((folder / "metrics.json").read_text())
    print(f"\nrun {doc['status']} in {time.perf_counter() - t0:.0f}s (federation {doc['seconds']:.0f}s)")
    if doc["status"] != "completed":
        print(f"  reason: {doc['error']}")
    else:
        _print_table(*final_table(doc))
    print(f"\n  metrics   {folder / 'metrics.json'}\n  report    {folder / 'report.html'}"
          f"\n  audit log {folder / 'audit.jsonl'}   (check it: radfed audit verify {folder / 'audit.jsonl'})")
    return 0 if doc["status"] == "completed" else 1


def cmd_plan_write(args: argparse.Namespace) -> int:
    from common.plan import plan_sha256, run_plan, summary
    from common.profile import load_profile
    from radfed.launch import app_run_config

    config = app_run_config(args.run_config or "")
    plan = run_plan(config, load_profile(str(config["profile"])))  # refuses a bad value, naming the key
    Path(args.out).write_text(json.dumps(plan, indent=2, sort_keys=True), encoding="utf-8")
    print(summary(plan))
    print(f"\nwrote {args.out}: send it to every site; each approves it with\n"
          f"  radfed site approve {plan_sha256(plan)} --site <site folder>")
    return 0


def _load_plan(ref: str, site_dir: str | None) -> dict:
    from client.approvals import pending_plans

    path = Path(ref)
    if not path.exists() and site_dir:
        matches = [p for p in pending_plans(Path(site_dir)) if p.stem.startswith(ref)]
        if len(matches) != 1:
            raise ValueError(f"no single saved plan matches {ref!r} at {site_dir}: "
                             f"{len(matches)} found (radfed site plan show --site {site_dir} lists them)")
        path = matches[0]
    if not path.exists():
        raise ValueError(f"{ref} is neither a plan file nor a saved plan hash (pass --site to look at the site)")
    return json.loads(path.read_text(encoding="utf-8"))


def cmd_site_plan_show(args: argparse.Namespace) -> int:
    from client.approvals import decisions, pending_plans
    from client.site import site_floor, site_settings
    from common.plan import plan_sha256, summary

    if args.plan is None:
        if not args.site:
            raise ValueError("give a plan file or hash, or --site to list the plans this site refused")
        seen = decisions(Path(args.site))
        print(f"plans refused at {args.site} (review one with: radfed site plan show HASH --site {args.site}):")
        for path in pending_plans(Path(args.site)):
            state = seen.get(path.stem, {}).get("action", "not approved")
            print(f"  {path.stem}  {state}")
        return 0
    plan = _load_plan(args.plan, args.site)
    print(summary(plan, site_floor(site_settings(args.site)) if args.site else 0))
    if args.site:
        state = decisions(Path(args.site)).get(plan_sha256(plan), {}).get("action", "not approved")
        print(f"\nat {args.site}: {state}")
    return 0


def cmd_site_decide(args: argparse.Namespace) -> int:
    from client.approvals import decide

    entry = decide(Path(args.site), args.plan_hash, args.site_command, args.note)
    print(f"{entry['action']}d run plan {entry['plan_sha256']} at {args.site} ({entry['time']}, by {entry['by']}); "
          "takes effect at the next message of any run")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("radfed")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radfed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"radfed {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate synthetic hospitals and run a whole federation on them")
    demo.add_argument("--data-root", default=str(DEFAULT_HOME / "demo"))
    demo.add_argument("--output-dir", default=str(DEFAULT_HOME / "runs"))
    demo.add_argument("--flwr-home", default=None, help="private FLWR_HOME for the simulation")
    demo.add_argument("--rounds", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--profile", default="default")
    demo.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    demo.add_argument("--quiet", action="store_true", help="hide Flower's log stream")
    demo.set_defaults(func=cmd_demo)

    site = sub.add_parser("site", help="site administrator commands").add_subparsers(dest="site_command",
                                                                                     required=True)
    check = site.add_parser(
        "check", help="check every case of a site without extracting (seconds)",
        description="Check a site's configuration and every case (files, geometry, co-registration, masks, "
                    "diagnoses) and whether it has enough cases per class to take part. Exit code 0: usable "
                    "cases remain (problems are warnings); 1: no usable case; 3: too few cases to take part; "
                    "2: the site itself cannot be read (e.g. a malformed site.yaml).")
    check.add_argument("site_dir")
    check.add_argument("--json", default=None, help="where to write the JSON report (default <output_dir>/check.json)")
    check.add_argument("--profile", default=None, help="profile name or file (default: site.yaml's, else default)")
    check.add_argument("--min-cases-per-class", type=int, default=None,
                       help="the federation's k (default 5; a site.yaml value can only raise it)")
    check.add_argument("--test-fraction", type=float, default=0.3, help="the federation's held-out fraction")
    check.set_defaults(func=cmd_site_check)

    outbox = site.add_parser("outbox", help="show everything this site has sent (values as sent, arrays as shapes)")
    outbox.add_argument("site_dir")
    outbox.add_argument("--run", default=None, help="only this run id")
    outbox.set_defaults(func=cmd_site_outbox)
    extract = site.add_parser("extract", help="check and extract every case of a site (cached)")
    extract.add_argument("site_dir")
    extract.add_argument("--profile", default=None, help="profile name or file (default: site.yaml's, else default)")
    extract.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    extract.set_defaults(func=cmd_site_extract)

    from client.join import add_parser as add_join_parser
    add_join_parser(site)
    plan_show = site.add_parser("plan", help="run plans: show one (file or hash) and whether it is approved here")
    plan_show.add_argument("action", choices=["show"])
    plan_show.add_argument("plan", nargs="?", default=None, help="the coordinator's plan file, or a saved plan's hash")
    plan_show.add_argument("--site", default=None, help="the site folder")
    plan_show.set_defaults(func=cmd_site_plan_show)
    for action, text in (("approve", "approve a run plan hash at this site"),
                         ("revoke", "revoke an approval (refused from the next message on)")):
        decide = site.add_parser(action, help=text)
        decide.add_argument("plan_hash")
        decide.add_argument("--site", required=True, help="the site folder")
        decide.add_argument("--note", default="", help="why (kept in the approvals file)")
        decide.set_defaults(func=cmd_site_decide)

    from radfed.predict_cli import add_parser as add_predict_parser
    add_predict_parser(sub)

    plan = sub.add_parser("plan", help="coordinator: the run plan sites approve").add_subparsers(
        dest="plan_command", required=True)
    write = plan.add_parser("write", help="write the plan of a run with these run-config overrides")
    write.add_argument("out")
    write.add_argument("--run-config", default="", help="overrides as for flwr run, e.g. \"num-server-rounds=10\"")
    write.set_defaults(func=cmd_plan_write)

    profile = sub.add_parser("profile", help="extraction profiles").add_subparsers(dest="profile_command",
                                                                                   required=True)
    show = profile.add_parser("show", help="print a profile with its version and hash")
    show.add_argument("name", nargs="?", default="default")
    show.set_defaults(func=cmd_profile_show)

    deploy = sub.add_parser("deploy", add_help=False, help="a real deployment: provision, superlink, register, "
                            "supernode, run, status, stop (radfed deploy --help; docs/deployment.md)")
    deploy.add_argument("args", nargs=argparse.REMAINDER)
    deploy.set_defaults(func=cmd_deploy)

    audit = sub.add_parser("audit", help="auditor commands").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="check a run's audit log, the run files it signed and the sites' receipts")
    verify.add_argument("log")
    verify.add_argument("--pubkey", help="the coordinator's published public key (PEM) to pin")
    verify.add_argument("--receipts", nargs="*", help="site folders or receipts.jsonl files to cross-check")
    verify.add_argument("--log-only", action="store_true",
                        help="check the log alone, not the run files beside it (a log copied without its folder)")
    verify.set_defaults(func=cmd_audit_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["deploy"]:  # its own parser, so `radfed deploy --help` and every option reach it
        return cmd_deploy(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:  # our errors name the file/case and the fix
        print(f"radfed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
