"""Commands for anyone: ``radfed profile list``, the bundled extraction profiles, and ``radfed profile show
[NAME]``, the profile every site must use, with its version and hash. NAME is a bundled profile's file name
(``default``), a profile's own ``radfed.name`` (the name every other command prints, e.g. ``hgg-vs-bm``) or a
path to a YAML file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from radfed.cli.options import add_json, print_json


def cmd_profile_show(args: argparse.Namespace) -> int:
    from common.profile import load_profile

    profile = load_profile(args.name)
    if args.json:
        print_json({"name": profile.name, "version": profile.version, "sha256": profile.sha256,
                    "file": profile.source, "sequences": list(profile.sequences), "regions": profile.regions,
                    "shape_from": profile.shape_from, "params": profile.params})
        return 0
    print(f"profile {profile.name} v{profile.version}\nsha256  {profile.sha256}\nfile    {profile.source}\n")
    print(Path(profile.source).read_text(encoding="utf-8"))
    return 0


def cmd_profile_list(args: argparse.Namespace) -> int:
    from common.profile import bundled_profiles

    rows = [{"file": Path(p.source).stem, "name": p.name, "version": p.version, "sha256": p.sha256,
             "sequences": list(p.sequences), "regions": p.regions, "path": p.source} for p in bundled_profiles()]
    if args.json:
        print_json({"profiles": rows})
        return 0
    header = ("FILE", "NAME", "VERSION", "SEQUENCES", "SHA256")
    table = [header, *[(r["file"], r["name"], r["version"], ",".join(r["sequences"]), r["sha256"]) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
    print("\nselect one by FILE or NAME: --profile NAME, site.yaml 'profile: NAME', --run-config \"profile='NAME'\"")
    return 0


def add_anyone_commands(sub: Any) -> None:
    """``radfed profile list|show`` on the root's subcommands."""
    profile = sub.add_parser("profile", help="extraction profiles").add_subparsers(
        dest="profile_command", required=True, metavar="COMMAND")
    listing = profile.add_parser("list", help="the bundled profiles: name, version, sequences and hash")
    add_json(listing)
    listing.set_defaults(func=cmd_profile_list)
    show = profile.add_parser("show", help="print a profile with its version and hash")
    show.add_argument("name", nargs="?", default="default", metavar="NAME",
                      help="a bundled profile's file or own name, or a YAML file (default: default)")
    add_json(show)
    show.set_defaults(func=cmd_profile_show)
