"""Every radfed command answers --help, and a bad invocation of each ends in exit 2 with a message, never a
traceback (issue 16)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import build_parser as deploy_parser
from radfed.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf command path of an argparse tree (deploy's own tree included)."""
    found = []
    for action in parser._actions:  # argparse keeps its subcommands here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = (*prefix, name)
                if path == ("deploy",):
                    found += _commands(deploy_parser(), path)
                    continue
                children = _commands(sub, path)
                found += children or [path]
    return found


COMMANDS = _commands(build_parser())


def _radfed(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "radfed.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_the_tree_holds_every_users_commands():
    names = {" ".join(c) for c in COMMANDS}
    for expected in ("demo", "site check", "site extract", "site approve", "site join", "predict", "plan write",
                     "audit verify", "deploy provision", "deploy run", "profile show"):
        assert expected in names, names


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_and_a_bad_invocation(command):
    shown = _radfed(*command, "--help")
    assert shown.returncode == 0 and "usage" in shown.stdout.lower() and "Traceback" not in shown.stderr, shown
    bad = _radfed(*command, "--no-such-option")
    assert bad.returncode == 2, (command, bad.returncode, bad.stderr[-500:])
    assert "Traceback" not in bad.stderr and "error:" in bad.stderr  # argparse names what is wrong


def test_version():
    shown = _radfed("--version")
    assert shown.returncode == 0 and shown.stdout.startswith("radfed ")
