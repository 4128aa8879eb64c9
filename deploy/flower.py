"""What `radfed deploy` learns from Flower: the `flwr` CLI's JSON output (``--format json``) wherever Flower
offers it, and the few facts that only Flower's log files hold.

From JSON: a new run's id (`flwr run`), a run's status (`flwr ls --run-id`), the runs and SuperNodes
(`flwr ls`, `flwr supernode ls`), a registered node's id (`flwr supernode register`). All of them go through
the coordinator's local Control API with its FLWR_HOME (deploy.layout.home).

From logs, because Flower prints these nowhere else: flower-supernode has no JSON output and runs at a
hospital, which cannot reach the coordinator's Control API, so whether it joined (``SuperNode ID: N``) and why
it quit (``Exit Code: 305``; the process itself exits with 1) are read from its log. The ServerApp's log
stream (`flwr log --stream`) is shown and kept as text.
"""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from deploy.layout import CONNECTION, home, read_record
from deploy.processes import ANSI, connect_errno, env_for, program

FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")  # flower-supernode's log (see above)
NODE_ID = re.compile(r"SuperNode ID: (\d+)")  # flower-supernode's log (see above)
WATCH_EVERY = 1.0  # s between looks at whether the SuperLink still listens (stream_log)
FINISHED = "finished"  # a run's status in `flwr ls` is pending, starting, running or finished:<how>


class FlowerError(RuntimeError):
    """A `flwr` call that failed; the message is Flower's."""


def flwr_json(d: Path, *argv: str, timeout: float = 60) -> dict[str, Any]:
    """``flwr <argv> --format json`` as the coordinator; Flower's JSON document.

    A failed call is ``{"success": false, "error-message": ...}`` (Flower exits 0 with that); output that
    is not JSON at all (a usage error, a crash) is turned into the same shape."""
    done = subprocess.run([program("flwr"), *argv, "--format", "json"], env=env_for(home(d)), capture_output=True,
                          text=True, timeout=timeout, check=False)
    start = done.stdout.find("{")  # anything Flower printed before the document (warnings) is not part of it
    try:
        doc = json.JSONDecoder().raw_decode(done.stdout, start)[0] if start >= 0 else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        return doc
    text = ANSI.sub("", done.stdout + done.stderr).strip()
    return {"success": False, "error-message": text or f"flwr {argv[0]} exited with code {done.returncode}"}


def _checked(doc: dict[str, Any]) -> dict[str, Any]:
    if not doc.get("success"):
        raise FlowerError(str(doc.get("error-message", "no reason given")).strip())
    return doc


def submit_run(d: Path, app: Path, run_config: str) -> int:
    """Start a run of the Flower App at ``app``; its run id."""
    argv = ["run", str(app), CONNECTION, *(["--run-config", run_config] if run_config else [])]
    return int(_checked(flwr_json(d, *argv, timeout=300))["run-id"])  # building the FAB takes a while


def runs(d: Path, run_id: int | None = None) -> list[dict[str, Any]]:
    """`flwr ls`: every run (or the one run) with its ``status`` ("finished:completed", ...)."""
    argv = ["ls", CONNECTION, *(["--run-id", str(run_id)] if run_id is not None else [])]
    return list(_checked(flwr_json(d, *argv))["runs"])


def supernodes(d: Path) -> list[dict[str, Any]]:
    """`flwr supernode ls`: every registered SuperNode with its ``node-id`` and ``status`` (online, offline)."""
    return list(_checked(flwr_json(d, "supernode", "ls", CONNECTION))["nodes"])


def register(d: Path, public_key: Path, name: str) -> int | None:
    """Register a site's public key; its new node id, or None when the key was registered before."""
    doc = flwr_json(d, "supernode", "register", str(public_key), CONNECTION, "--name", name)
    # Flower's JSON carries no error code, only its message: a key registered before is named by it
    if not doc.get("success") and "already in use" in str(doc.get("error-message")):
        return None
    return int(_checked(doc)["node-id"])


def stream_log(d: Path, run_id: int, log: Path, quiet: bool) -> int:
    """`flwr log <run id> --stream` until the run ends or the SuperLink stops listening: shown unless ``quiet``
    and kept in ``log``; flwr's exit code.

    On SIGTERM flower-superlink (uvicorn) closes its listening socket at once, then waits for every open
    response, this stream included, until Flower marks the interrupted run finished: about a minute
    (measured 60 s). So the stream is ended as soon as the SuperLink is seen not listening (``_watch``), and a
    SuperLink stopped by systemd or an operator exits in seconds."""
    cmd = [program("flwr"), "log", str(run_id), CONNECTION, "--stream"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, env=env_for(home(d)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, stdin=subprocess.DEVNULL, errors="replace")
        assert proc.stdout is not None
        gone, ended = threading.Event(), threading.Event()
        watcher = threading.Thread(target=_watch, args=(d, proc, gone, ended), name="superlink-watch", daemon=True)
        watcher.start()
        try:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if not quiet:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        finally:
            if proc.poll() is None and sys.exc_info()[0] is not None:
                proc.terminate()
            proc.wait()
            ended.set()
            watcher.join()
        if gone.is_set():
            note = ("radfed: the SuperLink stopped listening (stopping or restarting): the log stream was ended "
                    "so that it can exit\n")
            out.write(note)
            sys.stdout.write(note)  # radfed's own line, not the stream's: shown also when quiet
            sys.stdout.flush()
    return proc.returncode


def _watch(d: Path, stream: subprocess.Popen, gone: threading.Event, ended: threading.Event) -> None:
    """Until ``ended`` is set (the stream has ended), end ``stream`` (and set ``gone``) once the SuperLink that
    `radfed deploy superlink` started refuses connections on its Control API twice in a row, WATCH_EVERY apart.
    Only a refusal counts (nothing listens): a connection slow to be accepted (a loaded machine) is not the
    SuperLink going away. A connection opened and closed at once leaves nothing in the SuperLink's log."""
    record = read_record(d, "superlink")
    if record is None or "control_port" not in record:
        return  # not a SuperLink of this deployment folder: nothing to watch
    host, port = str(record["control_host"]), int(record["control_port"])
    refused = 0
    while not ended.is_set():
        refused = refused + 1 if connect_errno(host, port, WATCH_EVERY) == errno.ECONNREFUSED else 0
        if refused >= 2:
            gone.set()
            stream.terminate()
            return
        ended.wait(WATCH_EVERY)


def _log_text(log: Path, offset: int = 0) -> str:
    if not log.exists():
        return ""
    with log.open("rb") as fh:
        fh.seek(offset)
        return ANSI.sub("", fh.read().decode(errors="replace"))


def node_id_in_log(log: Path, offset: int = 0) -> int | None:
    """The node id a flower-supernode logged once the SuperLink accepted it, after byte ``offset``."""
    found = NODE_ID.findall(_log_text(log, offset))
    return int(found[0]) if found else None


def exit_code_in_log(log: Path, offset: int = 0) -> int | None:
    """The Flower exit code a process logged ("Exit Code: 305"), if any, after byte ``offset``."""
    found = FLOWER_EXIT.findall(_log_text(log, offset))
    return int(found[-1]) if found else None
