"""Processes of a deployment: Flower's programs, their environment, ports, and stopping all of them.

Every process `radfed deploy` starts leads its own process group; Flower starts more: the SuperNode's
flower-superexec (same group) and its flwr-clientapp runs; the SuperLink's flower-superexec runs in a session of
its own, with `--parent-pid <SuperLink pid>`, and starts flwr-serverapp runs. Linux /proc is read to find them
all; elsewhere only the process group is signalled.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")
STOP_GRACE = 30.0  # flower-superexec children exit within about 20 s of a SIGTERM
FORCE_AFTER = 5.0  # then a SuperLink still waiting for a log stream gets SIGINT (uvicorn's "force quit")
FLOWER_PROGRAMS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp",
                   "deploy.gateway")
WILDCARD = ("0.0.0.0", "::", "")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def program(name: str) -> str:
    """A program from this Python's environment (the venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def env_for(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process: a private FLWR_HOME, no runtime dependency installation
    (else the SuperLink `uv sync`s the app and pulls a multi-GB CUDA torch), the venv's programs first."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("COLUMNS", "160")  # Flower's tables
    return env


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host if host not in WILDCARD else "", 0))
        return int(sock.getsockname()[1])


def connect_host(host: str) -> str:
    return "127.0.0.1" if host in WILDCARD else host


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"



def process_table() -> dict[int, tuple[str, int, int, str]]:
    """pid -> (state, parent pid, process group, command line) of every process, {} without /proc."""
    table = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else []:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        table[int(entry.name)] = (fields[0], int(fields[1]), int(fields[2]), cmd)
    return table


def flower_processes(pid: int) -> dict[int, int]:
    """Live Flower processes of a recorded process, pid -> process group: the process, its process group,
    its descendants, and the flower-superexec started for it (``--parent-pid``)."""
    table = process_table()
    if not table:  # no /proc: the process group is all we know
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return {}
        return {pid: pid}
    children: dict[int, list[int]] = {}
    for child, (_, parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    tree, stack = set(), [pid]
    while stack:
        current = stack.pop()
        if current not in tree:
            tree.add(current)
            stack += children.get(current, [])
    found = {}
    for other, (state, _, pgid, cmd) in table.items():
        if state in ("Z", "X") or not any(program in cmd for program in FLOWER_PROGRAMS):
            continue
        if other in tree or pgid == pid or re.search(rf"--parent-pid {pid}\b", cmd):
            found[other] = pgid
    return found


def is_running(record: dict[str, Any]) -> bool:
    return bool(flower_processes(int(record["pid"])))


def stop_processes(recs: list[dict[str, Any]], grace: float = STOP_GRACE) -> dict[str, str]:
    """SIGTERM the process groups of every recorded process and of what Flower started for it, wait up
    to ``grace`` seconds for all of them to exit, SIGKILL the groups of any left.

    Returns how each ended: "stopped", "killed" or "not running"."""
    targets = {rec["name"]: flower_processes(int(rec["pid"])) for rec in recs}

    def signal_groups(groups: set[int], sig: signal.Signals) -> None:
        for pgid in groups:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)

    signal_groups({g for procs in targets.values() for g in procs.values()}, signal.SIGTERM)

    def left(procs: dict[int, int]) -> dict[int, int]:
        table = process_table()
        if not table:
            return {p: g for p, g in procs.items() if flower_processes(g)}
        return {p: g for p, g in procs.items() if p in table and table[p][0] not in ("Z", "X")}

    # On SIGTERM flower-superlink (uvicorn) waits for open log streams (`flwr run --stream`, `flwr log --stream`)
    # until their run has failed, about a minute; a second signal, SIGINT, makes it quit without waiting.
    nudge = {int(r["pid"]) for r in recs if r.get("role") == "superlink"}
    nudge_at = time.monotonic() + min(FORCE_AFTER, grace / 2)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(left(procs) for procs in targets.values()):
        if nudge and time.monotonic() >= nudge_at:
            for pid in nudge:
                with suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGINT)
            nudge = set()
        time.sleep(0.3)
    outcome = {}
    for name, procs in targets.items():
        remaining = left(procs)
        if remaining:
            signal_groups(set(remaining.values()), signal.SIGKILL)
        outcome[name] = "not running" if not procs else "killed" if remaining else "stopped"
    return outcome


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n=== {datetime.now(UTC).isoformat(timespec='seconds')} {shlex.join(cmd)}\n".encode())
        out.flush()
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(ANSI.sub("", text).splitlines()[-lines:])


def exit_code_in_log(log: Path, offset: int = 0) -> int | None:
    """The Flower exit code a process logged ("Exit Code: 305"), if any, after byte ``offset``."""
    with log.open("rb") as fh:
        fh.seek(offset)
        found = FLOWER_EXIT.findall(ANSI.sub("", fh.read().decode(errors="replace")))
    return int(found[-1]) if found else None
