"""Every radfed command answers --help, and a bad invocation of each ends in exit 2 with a message, never a
traceback; the same flag means the same thing everywhere (--site DIR, --json on stdout, --output PATH); profiles
by file or own name; shell completion covers every command (issue 16)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import build_parser as deploy_parser
from radfed import synth
from radfed.cli import build_parser, main

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
                     "audit verify", "deploy provision", "deploy run", "profile show", "profile list", "completion",
                     "site plan show", "site revoke", "site outbox", "site approvals", "site plan diff", "status"):
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


# --------------------------------------------------------------------------------------------------------------
# one convention: --site DIR, --json prints one document on stdout, --output PATH for files

RADFED_COMMANDS = [c for c in COMMANDS if c[0] != "deploy"]  # deploy keeps its own flags (deploy/cli.py)
NOT_REPORTING = {("completion",)}  # prints a shell script, not a result


def _leaf(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _options(path: tuple[str, ...]) -> dict[str, argparse.Action]:
    return {o: a for a in _leaf(path)._actions for o in a.option_strings}


def test_every_reporting_command_takes_json_as_a_flag():
    reporting = [c for c in RADFED_COMMANDS if c not in NOT_REPORTING]
    assert len(reporting) >= 12
    for command in reporting:
        action = _options(command).get("--json")
        assert action is not None and action.nargs == 0, f"radfed {' '.join(command)} has no --json flag"


def test_the_site_folder_is_always_the_site_option():
    for command in RADFED_COMMANDS:
        leaf = _leaf(command)
        positionals = [a.dest for a in leaf._actions if not a.option_strings]
        assert not {"site", "site_dir"} & set(positionals), command
        # plans can be read anywhere: --site only adds the site's k, decision and saved plans
        if command[0] in ("site", "predict") and command[:2] != ("site", "plan"):
            assert _options(command)["--site"].required, command


def _json_out(capsys, argv: list[str], code: int = 0) -> dict:
    assert main(argv) == code, capsys.readouterr().err
    out = capsys.readouterr().out
    return json.loads(out)  # the whole of stdout is one JSON document


@pytest.fixture
def site(tiny_site_root, tmp_path) -> Path:
    src = next(p for p in tiny_site_root.iterdir() if (p / "manifest.csv").exists())
    return Path(shutil.copytree(src, tmp_path / src.name, ignore=shutil.ignore_patterns(".radfed")))


def test_site_commands_print_json_on_a_real_site(site, tmp_path, capsys):
    report = _json_out(capsys, ["site", "check", "--site", str(site), "--json"])
    assert report["status"] == "ok" and report["counts"]["usable"] == 24 and report["site"] == site.name
    assert json.loads((site / ".radfed" / "check.json").read_text()) == report  # the file holds the same
    elsewhere = tmp_path / "reports" / "check.json"
    assert main(["site", "check", "--site", str(site), "--output", str(elsewhere)]) == 0
    assert "report: " in capsys.readouterr().out and json.loads(elsewhere.read_text())["counts"]["usable"] == 24

    plan_file = tmp_path / "plan.json"
    written = _json_out(capsys, ["plan", "write", "--output", str(plan_file), "--json"])
    assert written["plan"] == json.loads(plan_file.read_text()) and written["output"] == str(plan_file)
    plan_hash = written["plan_sha256"]
    shown = _json_out(capsys, ["site", "plan", "show", str(plan_file), "--site", str(site), "--json"])
    assert shown["plan_sha256"] == plan_hash and shown["state"] == "not approved" and shown["k_at_site"] == 5
    approved = _json_out(capsys, ["site", "approve", plan_hash, "--site", str(site), "--note", "ok", "--json"])
    assert approved["action"] == "approve" and approved["plan_sha256"] == plan_hash and approved["note"] == "ok"
    assert _json_out(capsys, ["site", "plan", "show", str(plan_file), "--site", str(site), "--json"])["state"] \
        == "approve"
    assert _json_out(capsys, ["site", "revoke", plan_hash, "--site", str(site), "--json"])["action"] == "revoke"
    listed = _json_out(capsys, ["site", "plan", "show", "--site", str(site), "--json"])["plans"]
    assert [(r["plan_sha256"], r["state"], r["note"]) for r in listed] == [(plan_hash, "revoke", "")]

    outbox = _json_out(capsys, ["site", "outbox", "--site", str(site), "--json"])
    assert outbox == {"outbox": str(site / ".radfed" / "outbox.jsonl"), "runs": [], "messages": []}


def test_site_extract_prints_json_on_a_real_site(tmp_path, capsys):
    site = synth.write_site(tmp_path, synth.tiny_sites(1, 2)[0], seed=3)
    first = _json_out(capsys, ["site", "extract", "--site", str(site), "--workers", "1", "--json"])
    assert first["usable_cases"] == 4 and first["extracted"] == 4 and first["problems"] == []
    assert Path(first["files"]["features"]).exists()
    again = _json_out(capsys, ["site", "extract", "--site", str(site), "--workers", "1", "--json"])
    assert again["cached"] == 4 and again["extracted"] == 0


def test_audit_verify_prints_json(tmp_path, capsys):
    from server.audit import AuditLog, load_or_create_key

    log = tmp_path / "run" / "audit.jsonl"
    audit = AuditLog(log, load_or_create_key(tmp_path / "coordinator.pem"))
    audit.append("run-start", run_id=1, config={})
    audit.append("run-end", status="completed")
    doc = _json_out(capsys, ["audit", "verify", str(log), "--log-only", "--json"])
    assert doc["ok"] and doc["chain_intact"] and doc["entries"] == 2 and doc["events"] == {"run-start": 1,
                                                                                           "run-end": 1}
    log.write_text(log.read_text().splitlines()[1] + "\n")  # the first line removed: the chain breaks
    doc = _json_out(capsys, ["audit", "verify", str(log), "--log-only", "--json"], code=1)
    assert not doc["ok"] and doc["bad_line"] == 1


def test_json_is_a_flag_not_a_file_name(site, capsys):
    bad = _radfed("site", "check", "--site", str(site), "--json", "-")
    assert bad.returncode == 2 and "unrecognized arguments: -" in bad.stderr and bad.stdout == ""
    assert not (ROOT / "-").exists()
    assert "radfed site check --help" in bad.stderr  # the message says where the options are


def test_a_command_error_is_a_message_not_a_traceback(tmp_path):
    missing = _radfed("site", "check", "--site", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert str(tmp_path / "nowhere") in missing.stderr and missing.stderr.startswith("radfed: ")
    positional = _radfed("site", "check", str(tmp_path))  # the old spelling: names the option to use
    assert positional.returncode == 2 and "--site" in positional.stderr


# --------------------------------------------------------------------------------------------------------------
# profiles by file name, own name or path


def test_profile_show_by_file_name_own_name_and_path(capsys):
    by_file = _json_out(capsys, ["profile", "show", "default", "--json"])
    assert by_file["name"] != "default"  # the bundled file's own name differs from its file name
    by_name = _json_out(capsys, ["profile", "show", by_file["name"], "--json"])
    by_path = _json_out(capsys, ["profile", "show", by_file["file"], "--json"])
    assert by_file == by_name == by_path and len(by_file["sha256"]) == 64
    assert main(["profile", "show", by_file["name"]]) == 0
    assert capsys.readouterr().out.startswith(f"profile {by_file['name']} v{by_file['version']}\nsha256  "
                                              f"{by_file['sha256']}")
    assert main(["profile", "show", "no-such-profile"]) == 2
    assert f"default ({by_file['name']})" in capsys.readouterr().err  # the refusal lists both names


def test_profile_list_shows_every_bundled_profile_with_version_hash_and_sequences(capsys):
    from common.profile import PROFILE_DIR, load_profile

    listed = _json_out(capsys, ["profile", "list", "--json"])["profiles"]
    files = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
    assert [row["file"] for row in listed] == files
    for row in listed:
        profile = load_profile(row["file"])
        assert (row["name"], row["version"], row["sha256"], row["sequences"]) == \
            (profile.name, profile.version, profile.sha256, list(profile.sequences))
        assert _json_out(capsys, ["profile", "show", row["name"], "--json"])["sha256"] == row["sha256"]
    assert main(["profile", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["FILE", "NAME", "VERSION", "SEQUENCES", "SHA256"]
    for row, line in zip(listed, lines[1:], strict=False):
        assert line.split() == [row["file"], row["name"], row["version"], ",".join(row["sequences"]), row["sha256"]]


# --------------------------------------------------------------------------------------------------------------
# shell completion


def _internal_nodes() -> dict[tuple[str, ...], set[str]]:
    """Each command path that has subcommands -> their names, from the same walk as COMMANDS."""
    nodes: dict[tuple[str, ...], set[str]] = {}
    for command in COMMANDS:
        for i in range(len(command)):
            nodes.setdefault(command[:i], set()).add(command[i])
    return nodes


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_lists_every_subcommand(shell):
    shown = _radfed("completion", shell)
    assert shown.returncode == 0 and shown.stderr == ""
    for command in COMMANDS:
        assert f'"{" ".join(command)}"' in shown.stdout, (shell, command)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_offers_each_commands_subcommands_and_options(tmp_path):
    script = tmp_path / "radfed.bash"
    script.write_text(_radfed("completion", "bash").stdout)
    nodes = _internal_nodes()
    calls = [f"t {' '.join(path)} ''" for path in nodes] + ["t site check --", "t site check --site ''"]
    driver = (f"source {script}\nt() {{ COMP_WORDS=(radfed \"$@\"); COMP_CWORD=$#; COMPREPLY=(); _radfed; "
              "echo \"${COMPREPLY[*]}\"; }\n" + "\n".join(calls) + "\n")
    result = subprocess.run(["bash", "-c", driver], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(nodes) + 2, result.stdout
    for (path, children), line in zip(nodes.items(), lines, strict=False):
        assert set(line.split()) >= children, (path, line)
    assert set(lines[len(nodes)].split()) >= {"--site", "--json", "--output", "--profile"}
    assert lines[len(nodes) + 1].split() == ["radfed.bash"]  # after --site: file names
