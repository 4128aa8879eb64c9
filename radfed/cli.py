"""`radfed`: every user's commands in one place.

  radfed demo                    coordinator: synthetic hospitals -> a whole federation -> results
  radfed site extract SITE_DIR   site administrator: check and extract a site's cases (cached)
  radfed profile show [NAME]     anyone: the extraction profile, its version and hash
  radfed audit verify LOG        auditor: check a run's audit chain
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DEFAULT_HOME = Path("~/.radfed").expanduser()


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    for i, row in enumerate([header, *rows]):
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _extract_one_site(site_dir: str, profile_name: str, workers: int) -> tuple[str, int, int, int, float, float]:
    from client.extract import extract_site
    from client.site import load_site
    from common.profile import load_profile

    profile = load_profile(profile_name)
    site = load_site(site_dir, profile.sequences)
    table, summary = extract_site(site, profile, workers=workers)
    return (site.name, len(table.case_ids), summary.extracted, len(table.problems), summary.seconds,
            summary.seconds_per_extracted_case)


def cmd_site_extract(args: argparse.Namespace) -> int:
    name, used, extracted, failed, seconds, per_case = _extract_one_site(args.site_dir, args.profile, args.workers)
    timing = f", {per_case:.2f}s per case" if extracted else " (all from the cache)"
    print(f"site {name}: {used} usable case(s), {extracted} extracted now, {failed} problem(s), "
          f"{seconds:.1f}s{timing}")
    report = Path(args.site_dir) / ".radfed" / "errors.json"
    for problem in json.loads(report.read_text())["problems"]:
        print(f"  case {problem['case_id']}: {problem['reason']} -> fix: {problem['fix']}")
    return 0 if used else 1


def cmd_profile_show(args: argparse.Namespace) -> int:
    from common.profile import load_profile

    profile = load_profile(args.name)
    print(f"profile {profile.name} v{profile.version}\nsha256  {profile.sha256}\nfile    {profile.source}\n")
    print(Path(profile.source).read_text(encoding="utf-8"))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from server.audit import verify

    result = verify(Path(args.log))
    if result.ok:
        print(f"audit log intact: {result.entries} entries, last sha256 {result.last_sha256}")
        print("events: " + ", ".join(f"{k} x{v}" for k, v in (result.events or {}).items()))
        return 0
    print(f"audit log BROKEN at line {result.bad_line}: {result.reason} ({result.entries} entries before it verify)")
    return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from radfed import synth
    from radfed.launch import run_federation
    from server.report import final_table

    data_root = Path(args.data_root).expanduser().resolve()
    output_dir = Path(args.output_dir).expanduser().resolve()
    t0 = time.perf_counter()
    print(f"[1/3] synthetic hospitals in {data_root}")
    site_dirs = synth.make_demo(data_root, seed=args.seed)
    print(f"      {len(site_dirs)} sites ready in {time.perf_counter() - t0:.1f}s")

    t1 = time.perf_counter()
    print(f"[2/3] radiomics extraction at each site (cached; {args.workers} processes)")
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        jobs = [pool.submit(_extract_one_site, str(d), args.profile, 1) for d in site_dirs]
        for job in jobs:
            name, used, extracted, failed, seconds, _ = job.result()
            print(f"      {name}: {used} cases usable, {extracted} extracted now, {failed} problem(s)")
    print(f"      extraction done in {time.perf_counter() - t1:.1f}s")

    print(f"[3/3] federation: {len(site_dirs)} simulated sites, {args.rounds} rounds (Flower simulation)")
    before = set(output_dir.glob("*-run*")) if output_dir.exists() else set()
    flwr_home = Path(args.flwr_home).expanduser().resolve() if args.flwr_home else DEFAULT_HOME / "flwr"
    run_config = {"data-root": str(data_root), "output-dir": str(output_dir), "num-server-rounds": args.rounds,
                  "profile": args.profile}
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radfed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    extract = site.add_parser("extract", help="check and extract every case of a site (cached)")
    extract.add_argument("site_dir")
    extract.add_argument("--profile", default="default")
    extract.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    extract.set_defaults(func=cmd_site_extract)

    profile = sub.add_parser("profile", help="extraction profiles").add_subparsers(dest="profile_command",
                                                                                   required=True)
    show = profile.add_parser("show", help="print a profile with its version and hash")
    show.add_argument("name", nargs="?", default="default")
    show.set_defaults(func=cmd_profile_show)

    audit = sub.add_parser("audit", help="auditor commands").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="check a run's audit log chain")
    verify.add_argument("log")
    verify.set_defaults(func=cmd_audit_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:  # our errors name the file/case and the fix
        print(f"radfed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
