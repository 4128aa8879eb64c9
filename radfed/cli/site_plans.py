"""The site administrator's plan and approval commands: read a run plan, compare two, decide, list decisions.

  radfed site plan show [PLAN] --site DIR    what a run would compute and send, its hash, whether approved here
                                             (no PLAN: every plan this site has seen or decided on)
  radfed site plan diff OLD NEW [--site DIR] what changed between two plans, in words
  radfed site approve|revoke HASH --site DIR approve a run plan, or withdraw the approval
  radfed site approvals --site DIR [--all]   the standing decision per plan (--all: every decision in order)

A PLAN is a plan file (``radfed plan write``) or the hash (or its first digits) of a plan this site saved when
it refused a run. The work is in ``client.approvals`` and ``common.plan``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from radfed.cli.options import add_json, add_site, print_json


def _load_plan(ref: str, site_dir: str | None) -> dict[str, Any]:
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
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a run plan ({exc}); write one with: radfed plan write") from None
    if not isinstance(plan, dict) or "run_config" not in plan:
        raise ValueError(f"{path} is not a run plan (no run_config); write one with: radfed plan write")
    return plan


def _state_words(row: dict[str, Any]) -> str:
    if row["state"] == "not approved":
        return "refused here, not approved"
    word = "approved" if row["state"] == "approve" else "revoked"
    return f"{word} {row['time']} by {row['by']}" + (f" ({row['note']})" if row.get("note") else "")


def cmd_plan_show(args: argparse.Namespace) -> int:
    from client.approvals import decisions, known_plans
    from client.site import site_floor, site_settings
    from common.plan import plan_sha256, summary

    if args.plan is None:
        if not args.site:
            raise ValueError("give a plan file or hash, or --site DIR to list the plans this site has seen")
        rows = known_plans(Path(args.site))
        if args.json:
            print_json({"site": args.site, "plans": rows})
            return 0
        if not rows:
            print(f"no plan seen or decided at {args.site} yet")
            return 0
        print(f"plans seen or decided at {args.site}, newest decision first "
              f"(review one with: radfed site plan show HASH --site {args.site}):")
        for row in rows:
            print(f"  {row['plan_sha256']}  {_state_words(row)}")
        return 0
    plan = _load_plan(args.plan, args.site)
    site_k = site_floor(site_settings(args.site)) if args.site else 0
    state = decisions(Path(args.site)).get(plan_sha256(plan), {}).get("action", "not approved") \
        if args.site else None
    if args.json:
        k = max(int(plan["run_config"]["min-cases-per-class"]), site_k)
        print_json({"plan_sha256": plan_sha256(plan), "plan": plan, "site": args.site,
                    "k_at_site": k if args.site else None, "state": state})
        return 0
    print(summary(plan, site_k))
    if args.site:
        hint = f"; approve it with: radfed site approve {plan_sha256(plan)} --site {args.site}" \
            if state != "approve" else ""
        print(f"\nat {args.site}: {state}{hint}")
    return 0


def cmd_plan_diff(args: argparse.Namespace) -> int:
    """Exit 0 when the plans are the same, 1 when they differ (like diff)."""
    from common.plan import diff, plan_sha256

    old, new = _load_plan(args.old, args.site), _load_plan(args.new, args.site)
    changes = diff(old, new)
    if args.json:
        print_json({"old": plan_sha256(old), "new": plan_sha256(new), "changes": changes})
        return 1 if changes else 0
    if not changes:
        print(f"the two plans are the same ({plan_sha256(new)})")
        return 0
    print(f"from plan {plan_sha256(old)[:12]} to plan {plan_sha256(new)[:12]}, {len(changes)} change(s):")
    for change in changes:
        print(f"  - {change}")
    return 1


def cmd_decide(args: argparse.Namespace) -> int:
    from client.approvals import decide

    entry = decide(Path(args.site), args.plan_hash, args.site_command, args.note)
    if args.json:
        print_json({**entry, "site": args.site})
        return 0
    done = "approved" if entry["action"] == "approve" else "revoked"
    if not entry["changed"]:
        print(f"run plan {entry['plan_sha256']} was already {done} at {args.site} ({entry['time']}, by "
              f"{entry['by']}); nothing changed")
        return 0
    print(f"{done} run plan {entry['plan_sha256']} at {args.site} ({entry['time']}, by {entry['by']}); "
          "takes effect at the next message of any run")
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    from client.approvals import history, known_plans

    site = Path(args.site)
    if args.all:
        entries = history(site)
        if args.json:
            print_json({"site": args.site, "decisions": entries})
            return 0
        for e in entries:
            print(f"{e['time']}  {e['action']:<7}  {e['plan_sha256']}  by {e.get('by', '?')}"
                  + (f"  ({e['note']})" if e.get("note") else ""))
        if not entries:
            print(f"no decision at {args.site} yet")
        return 0
    rows = [r for r in known_plans(site) if r["state"] != "not approved"]
    if args.json:
        print_json({"site": args.site, "plans": rows})
        return 0
    approved = [r for r in rows if r["state"] == "approve"]
    print(f"{len(approved)} plan(s) approved at {args.site}" + (":" if rows else ""))
    for row in rows:
        print(f"  {row['plan_sha256']}  {_state_words(row)}")
    print(f"every decision in order: radfed site approvals --site {args.site} --all")
    return 0


def add_plan_commands(site: Any) -> None:
    """``radfed site plan show|diff``, ``approve``, ``revoke`` and ``approvals`` on the site's subcommands."""
    plan = site.add_parser("plan", help="run plans: show one (file or hash) and whether it is approved here, or "
                                        "what changed between two")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True, metavar="COMMAND")
    show = plan_sub.add_parser("show", help="what a run plan computes and sends, its hash, and whether this site "
                                            "approved it")
    show.add_argument("plan", nargs="?", default=None, help="the coordinator's plan file, or a saved plan's hash "
                      "(none: list every plan this site has seen or decided on)")
    add_site(show, required=False, text="the site folder (states the k that holds there and its decision)")
    add_json(show)
    show.set_defaults(func=cmd_plan_show)

    compare = plan_sub.add_parser(
        "diff", help="what changed between two run plans, in words (exit 1 when they differ)",
        description="Compare two run plans (files or saved hashes): the code, the profile, the protocol, each "
                    "setting (saying when it changes which of the site's cases are summed together), and each "
                    "message and reply field. Exit 0: the same plan; 1: they differ.")
    compare.add_argument("old", metavar="OLD", help="the plan approved before (file or saved hash)")
    compare.add_argument("new", metavar="NEW", help="the plan asked for now (file or saved hash)")
    add_site(compare, required=False, text="the site folder (to find saved plans by hash)")
    add_json(compare)
    compare.set_defaults(func=cmd_plan_diff)

    for action, text in (("approve", "approve a run plan hash at this site"),
                         ("revoke", "revoke an approval (refused from the next message on)")):
        decide = site.add_parser(action, help=text)
        decide.add_argument("plan_hash", metavar="HASH", help="the plan's sha256 (radfed site plan show prints it)")
        add_site(decide)
        decide.add_argument("--note", default="", help="why (kept in the approvals file)")
        add_json(decide)
        decide.set_defaults(func=cmd_decide)

    approvals = site.add_parser("approvals", help="the plans approved or revoked at this site: when, by whom, why")
    add_site(approvals)
    approvals.add_argument("--all", action="store_true", help="every decision in the order it was made")
    add_json(approvals)
    approvals.set_defaults(func=cmd_approvals)
