"""Processes of a deployment: Flower's programs, their environment, ports, and stopping all of them.

Every process `radfed deploy` starts leads its own process group; Flower starts more: the SuperNode's
flower-superexec (same group) and its flwr-clientapp runs; the SuperLink's flower-superexec runs in a session of
its own, with `--parent-pid <SuperLink pid>`, and starts flwr-serverapp runs. psutil finds them all.
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

import psutil

# Flower's logger always colours; log text shown to the user has the codes stripped
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
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
    (else the SuperLink `uv sync`s the app and pulls a multi-GB CUDA torch), no usage telemetry (else each Flower
    process posts an event to telemetry.flower.ai at start and exit: a hospital's processes call no third party),
    the venv's programs first."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
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



def _group(proc: psutil.Process) -> int | None:
    """The process group of a live, non-zombie process; None once it is gone."""
    try:
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return os.getpgid(proc.pid)
    except (psutil.Error, ProcessLookupError):
        return None


def _is_flower(proc: psutil.Process) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(name in cmd for name in FLOWER_PROGRAMS)


def _started_for(proc: psutil.Process, pid: int) -> bool:
    """Started by Flower on behalf of ``pid`` without being its descendant: the SuperLink's
    flower-superexec runs in a session of its own and names its SuperLink with ``--parent-pid``."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return False
    return f"--parent-pid={pid}" in cmd or any(
        arg == "--parent-pid" and value == str(pid) for arg, value in zip(cmd, cmd[1:], strict=False))


def _live(pid: int) -> dict[int, tuple[psutil.Process, int]]:
    """pid -> (process, process group) of the live Flower processes of a recorded process: the process,
    its descendants, the rest of its process group and what was started for it with ``--parent-pid``.
    Only Flower's programs count, so a recycled pid never makes us signal a stranger."""
    found: dict[int, psutil.Process] = {}
    with suppress(psutil.Error):
        root = psutil.Process(pid)
        found = {p.pid: p for p in (root, *root.children(recursive=True))}
    for proc in psutil.process_iter():
        if proc.pid in found:
            continue
        with suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pid or _started_for(proc, pid):
                found[proc.pid] = proc
                found.update((c.pid, c) for c in proc.children(recursive=True))
    live = {}
    for other, proc in found.items():
        group = _group(proc)
        if group is not None and _is_flower(proc):
            live[other] = (proc, group)
    return live


def flower_processes(pid: int) -> dict[int, int]:
    """Live Flower processes of a recorded process, pid -> process group (see ``_live``)."""
    return {other: group for other, (_, group) in _live(pid).items()}


def is_running(record: dict[str, Any]) -> bool:
    return bool(flower_processes(int(record["pid"])))


def main_alive(record: dict[str, Any]) -> bool:
    """The recorded process itself is alive (not only something it started)."""
    return int(record["pid"]) in flower_processes(int(record["pid"]))


def stop_processes(recs: list[dict[str, Any]], grace: float = STOP_GRACE) -> dict[str, str]:
    """SIGTERM the process groups of every recorded process and of what Flower started for it, wait up
    to ``grace`` seconds for all of them to exit, SIGKILL the groups of any left.

    Returns how each ended: "stopped", "killed" or "not running"."""
    # psutil.Process objects remember each process's start time: a pid recycled while we wait is not "left"
    targets = {rec["name"]: _live(int(rec["pid"])) for rec in recs}

    def signal_groups(groups: set[int], sig: signal.Signals) -> None:
        for pgid in groups:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)

    def left(procs: dict[int, tuple[psutil.Process, int]]) -> set[int]:
        return {group for proc, group in procs.values() if proc.is_running() and _group(proc) is not None}

    signal_groups({group for procs in targets.values() for _, group in procs.values()}, signal.SIGTERM)
    # On SIGTERM flower-superlink (uvicorn) waits for open log streams (`flwr log --stream`; radfed deploy run
    # ends its own, deploy.flower.stream_log) until their run has failed, about a minute; a second signal,
    # SIGINT, makes it quit without waiting.
    nudge = [targets[r["name"]][int(r["pid"])][0] for r in recs
             if r.get("role") == "superlink" and int(r["pid"]) in targets[r["name"]]]
    nudge_at = time.monotonic() + min(FORCE_AFTER, grace / 2)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(left(procs) for procs in targets.values()):
        if nudge and time.monotonic() >= nudge_at:
            for proc in nudge:
                with suppress(psutil.Error):
                    proc.send_signal(signal.SIGINT)  # psutil checks it is still the same process
            nudge = []
        time.sleep(0.3)
    outcome = {}
    for name, procs in targets.items():
        remaining = left(procs)
        signal_groups(remaining, signal.SIGKILL)
        outcome[name] = "not running" if not procs else "killed" if remaining else "stopped"
    return outcome


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n=== {datetime.now(UTC).isoformat(timespec='seconds')} {shlex.join(cmd)}\n".encode())
        out.flush()
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return "\n".join(ANSI.sub("", text).splitlines()[-lines:])


def connect_errno(host: str, port: int, timeout: float | None = None) -> int:
    """0 when something accepts a connection on ``host:port`` (a wildcard bind address: this machine), else the
    error number (``errno.ECONNREFUSED``: nothing listens). The connection is closed at once."""
    target = connect_host(host)
    with socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET) as sock:
        sock.settimeout(timeout)
        try:
            return sock.connect_ex((target, port))
        except OSError as exc:  # a timeout, or a name that does not resolve
            return exc.errno or -1


def await_port(proc: subprocess.Popen, host: str, port: int, wait: float, log: Path, what: str) -> str | None:
    """None once ``host:port`` accepts connections; else why not (the process exited, or time ran out)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"{what} exited with code {proc.returncode}:\n{tail(log)}"
        if connect_errno(host, port) == 0:
            return None
        time.sleep(0.2)
    return f"{what} did not open port {port} within {wait:.0f}s; see {log}"


def check_control_host(control_host: str, public_host: str) -> None:
    """Refuse a Control API address that the SuperNodes' side of the network could reach."""
    if control_host in WILDCARD:
        raise SystemExit(f"--control-host {control_host!r} would serve the Control API on every interface: "
                         "anyone who reaches it can `flwr supernode register` a key of their own and join as a "
                         "site (Flower's Control API has no authentication). Use 127.0.0.1 (the default) or this "
                         "machine's own address on a network only the coordinator uses")
    if control_host == public_host and control_host not in LOOPBACK:
        raise SystemExit(f"--control-host {control_host} is the public Fleet address (--host): the Control API "
                         "would be reachable by every hospital and by anyone else there. Use 127.0.0.1 (the "
                         "default) or an address on a network only the coordinator uses")
