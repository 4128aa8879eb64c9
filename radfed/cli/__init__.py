"""`radfed`: every user's commands, one module per user.

  site administrator (radfed/cli/site.py)
    radfed site check --site DIR          can the site take part, which cases need a fix (seconds)
    radfed site extract --site DIR        check and extract the site's cases (cached)
    radfed site plan show [PLAN] --site DIR   what a run would compute and send, its hash, its state here
    radfed site approve|revoke HASH --site DIR   approve a run plan, or withdraw the approval
    radfed site outbox --site DIR         everything the site has sent
    radfed site join POOLED --site DIR    harmonise a late-joining site against a run's ComBat estimates
    radfed predict --model M --site DIR ...   HGG vs BM for a new case, at the site
  coordinator (radfed/cli/coordinator.py; deploy/cli.py)
    radfed demo                           synthetic hospitals -> a whole federation -> results
    radfed plan write --output PLAN.json  the run plan (code, config, profile, messages) sites approve
    radfed deploy COMMAND ...             real SuperLink/SuperNodes with TLS (docs/deployment.md)
  auditor (radfed/cli/auditor.py)
    radfed audit verify LOG               check a run's audit chain, its files and the sites' receipts
  anyone (radfed/cli/anyone.py, radfed/cli/completion.py)
    radfed profile show [NAME]            an extraction profile, its version and hash
    radfed completion bash|zsh            a shell completion script

The same flag means the same thing everywhere (radfed/cli/options.py): --site DIR is a site folder, --json
prints one JSON document on stdout, --output PATH is a file a command writes.
"""

from __future__ import annotations

import argparse
import os
import sys

from radfed.cli.anyone import add_anyone_commands
from radfed.cli.auditor import add_auditor_commands
from radfed.cli.completion import add_completion_command
from radfed.cli.coordinator import add_coordinator_commands, approve_demo_plan
from radfed.cli.options import Parser
from radfed.cli.site import add_site_commands

__all__ = ["approve_demo_plan", "build_parser", "main"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("radfed")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def cmd_deploy(args: argparse.Namespace) -> int:
    from deploy.cli import main as deploy_main

    return deploy_main(args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="radfed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"radfed {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_site_commands(sub)
    add_coordinator_commands(sub)
    deploy = sub.add_parser("deploy", add_help=False, help="coordinator and sites: a real deployment: provision, "
                            "superlink, register, supernode, run, status, stop (radfed deploy --help)")
    deploy.add_argument("args", nargs=argparse.REMAINDER)
    deploy.set_defaults(func=cmd_deploy)
    add_auditor_commands(sub)
    add_anyone_commands(sub)
    add_completion_command(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command ``args`` ran, found by following the chosen subcommands down the tree."""
    for action in parser._actions:  # argparse keeps its subcommands here and nowhere public
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _command_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["deploy"]:  # its own parser, so `radfed deploy --help` and every option reach it
        return cmd_deploy(argparse.Namespace(args=argv[1:]))
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would blame the root; the command's own parser names its --help
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args))
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:  # ours name the file or case and the fix (SiteError, ProfileError, ...)
        print(f"radfed: {exc}", file=sys.stderr)
        return 2
