"""The auditor's command: ``radfed audit verify LOG`` checks a run's signed audit chain, the run files it
signed and the sites' receipts. The checks are ``server.audit.verify``; this module prints what they found.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from radfed.cli.options import add_json, print_json


def cmd_verify(args: argparse.Namespace) -> int:
    from client.site import site_files
    from server.audit import verify

    receipts = []
    for item in args.receipts or []:  # a site folder or a receipts file
        path = Path(item)
        receipts.append(site_files(path).receipts if path.is_dir() else path)
    result = verify(Path(args.log), pubkey=Path(args.pubkey) if args.pubkey else None, receipts=receipts,
                    artifacts=not args.log_only)
    chain_ok = result.bad_line is None and bool(result.entries)
    code = 0 if chain_ok and result.ok else 1
    if args.json:
        print_json({"log": args.log, "chain_intact": chain_ok, "key_pinned": bool(args.pubkey),
                    "receipt_files_given": [str(p) for p in receipts], **dataclasses.asdict(result)})
        return code
    if not chain_ok:
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


def add_auditor_commands(sub: Any) -> None:
    """``radfed audit verify`` on the root's subcommands."""
    audit = sub.add_parser("audit", help="auditor commands").add_subparsers(
        dest="audit_command", required=True, metavar="COMMAND")
    verify = audit.add_parser("verify", help="check a run's audit log, the run files it signed and the sites' receipts")
    verify.add_argument("log", metavar="LOG", help="the run's audit.jsonl")
    verify.add_argument("--pubkey", metavar="PATH", help="the coordinator's published public key (PEM) to pin")
    verify.add_argument("--receipts", nargs="*", metavar="PATH",
                        help="site folders or receipts.jsonl files to cross-check")
    verify.add_argument("--log-only", action="store_true",
                        help="check the log alone, not the run files beside it (a log copied without its folder)")
    add_json(verify)
    verify.set_defaults(func=cmd_verify)
