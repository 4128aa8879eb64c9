"""The flags several commands share, each defined once so the same thing has the same name everywhere.

  --site DIR      a site folder (its site.yaml, cases and output_dir); never a positional argument
  --json          print the result as one JSON document on stdout, and nothing else there (messages go to stderr)
  --output PATH   where a command writes a file it produces
  --profile NAME  an extraction profile: a bundled name, a profile's own name, or a path to its YAML file
  --workers N     processes for extraction

``Parser`` is the argparse parser of every radfed command: a bad invocation ends with exit code 2, the usage
line, what is wrong and the command whose ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse with an error message that names where to look for the fix (subparsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n  the options are listed by: {self.prog} --help\n")


def add_site(parser: argparse.ArgumentParser, required: bool = True, text: str = "the site folder") -> None:
    parser.add_argument("--site", metavar="DIR", required=required, help=text)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON document on stdout (nothing else goes to stdout)")


def add_output(parser: argparse.ArgumentParser, text: str, required: bool = False) -> None:
    parser.add_argument("--output", metavar="PATH", required=required, help=text)


def add_profile(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    after = f"default {default}" if default else "default: the site.yaml's, else default"
    parser.add_argument("--profile", metavar="NAME", default=default,
                        help=f"extraction profile: a bundled name, a profile's own name or a YAML file ({after})")


def add_workers(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    default = default or os.cpu_count() or 1
    parser.add_argument("--workers", type=int, default=default, metavar="N",
                        help=f"extraction processes (default {default})")


def print_json(doc: Any) -> None:
    """The one JSON document a ``--json`` command prints (paths and the like as strings)."""
    print(json.dumps(doc, indent=2, default=str))
