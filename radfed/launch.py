"""Run the radfed Flower App on Flower's simulation engine, the way `flwr run` does, and clean up.

We start our own simulation SuperLink (rather than `flwr`'s managed `:local:` one, which stays
running after the run) on free ports, with a private FLWR_HOME, and always stop it afterwards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO

from common.protocol import RUN_END_MARK, START_GATE  # a gated run (started_federation(gated=True)) boots meanwhile
from radfed.processes import (
    free_port,
    stop_process,
    stop_tree,
    stop_trees,
    wait_port,
)

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "radfed-sim"
# Read by Ray's processes (RAY_<setting>): Flower's ClientApp actors get workers of their own, so the two idle workers
# Ray would start for the first driver only take CPU from them (each imports Ray); a cluster a run starts reports no
# usage to Ray's servers (nothing of a run should call a third party)
RAY_ENV = {"RAY_prestart_worker_first_driver": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# Read by the raylet of the run's Ray head: each Python worker it starts (the ClientApp actors) imports radfed's
# ClientApp module as it boots (Ray's `--worker-preload-modules`; radfed/actor_preload.py), from the path the first
# message's unpickling would, instead of on that first message (a gated demo's actors boot while the ServerApp waits
# at START_GATE). Code only: no site is known to an actor before a message names one (`tests/test_launch.py`).
ACTOR_PRELOAD = {"RAY_preload_python_modules": "radfed.actor_preload"}
# The niceness of the demo's federation (radfed/inprocess.py, gated): it boots beside the last sites' extraction, so
# the simulation's thread and what it starts (the ServerApp's thread, the ClientApp workers: radfed.process_backend)
# run at 19 and the extraction keeps its core (weight 1024 against 15 per thread), the boot taking what it leaves. An
# unprivileged process cannot lower its niceness again, so the run keeps it once the gate opens, when nothing of the
# demo competes with it any more.
BOOT_NICE = 19


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flwr_env(flwr_home: Path, ray_address: str = "") -> dict[str, str]:
    """The environment of the processes a run starts; with ``ray_address``, the simulation joins that Ray cluster
    (RAY_ADDRESS) instead of starting one of its own."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    # Otherwise the SuperLink `uv sync`s the app into a fresh env and pulls a multi-GB CUDA torch.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # Flower's processes otherwise post a usage event to telemetry.flower.ai at start and exit, and wait up to 4 s
    # for it when they exit: nothing of a run should call a third party, and a firewalled network makes the wait long
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.update(RAY_ENV)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


@contextmanager
def simulation_superlink(flwr_home: Path, ray_address: str = "",
                         gate: Path | None = None,
                         end_mark: Path | None = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """A simulation SuperLink on 127.0.0.1 with a `radfed-sim` connection in FLWR_HOME, stopped with everything it
    started on leaving (``stop_tree``); yields (its process, its port) at once, before it listens
    (``wait_port`` waits for it). With ``gate``, the ServerApp it runs waits for that file to exist (START_GATE);
    with ``end_mark``, it writes its last lines there once every output is written (RUN_END_MARK)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()  # the SuperLink serves Fleet, Control and Runtime APIs on one HTTP port
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n', encoding="utf-8")
    env = {**flwr_env(flwr_home, ray_address), **({START_GATE: str(gate)} if gate else {}),
           **({RUN_END_MARK: str(end_mark)} if end_mark else {})}
    with (flwr_home / "superlink.log").open("ab") as log:
        proc = subprocess.Popen(
            [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, port
    finally:
        stop_tree(proc)


# The run's Ray cluster, started as Flower's own `ray.init()` starts one (the same node: address, folder, memory, no
# dashboard; `ray start` would add a Ray Client server, a process importing Ray and listening on every interface), by a
# process that then only holds it, but without the two services a simulation on one machine does not use, as `ray
# start --no-monitor --include-log-monitor=False` leaves them out (ray.init has no switch for them): the autoscaler's
# monitor (nothing to scale) and the log monitor (it forwards the workers' stdout and stderr to a driver; Flower's
# simulation logs a ClientApp's errors itself, and no radfed line came that way): 1.2 CPU s less to boot. Nor its
# API server (`Node.start_api_server`, which ray.init and `ray start` run even without the dashboard: a "minimal"
# dashboard process for Ray's job and state HTTP APIs, which neither Flower's simulation nor radfed calls; ~0.7 CPU
# s). Nor does it connect a driver of its own. argv: its folder. Its GCS port is RAY_GCS_SERVER_PORT (Ray reads it for
# a new head).
RAY_HEAD = """\
import sys, threading
from ray._common.usage import usage_lib
from ray._private import ray_constants, services, utils
from ray._private.node import Node
from ray._private.parameter import RayParams
from ray._private.resource_isolation_config import ResourceIsolationConfig
usage_lib.set_usage_stats_enabled_via_env_var(False)
memory = utils.estimate_available_memory()
params = RayParams(node_ip_address=services.resolve_ip_for_localhost("127.0.0.1"), temp_dir=sys.argv[1],
                   include_dashboard=False, dashboard_host=ray_constants.DEFAULT_DASHBOARD_IP, dashboard_port=None,
                   available_memory_bytes=memory, object_store_memory=utils.resolve_object_store_memory(memory, None),
                   resource_isolation_config=ResourceIsolationConfig(enable_resource_isolation=False),
                   no_monitor=True, include_log_monitor=False)
Node.start_api_server = lambda self, **kwargs: None  # Ray's job and state HTTP APIs: nothing of a run calls them
Node(params, head=True, shutdown_at_exit=False, spawn_reaper=True, ray_init_cluster=True)
print("radfed: the Ray head is up", flush=True)
threading.Event().wait()
"""


@contextmanager
def ray_head(flwr_home: Path) -> Iterator[tuple[subprocess.Popen, int] | None]:
    """A Ray cluster for the run's simulation to join, started beside the SuperLink: the simulation's own
    ``ray.init()`` would start one only after the SuperLink, ``flwr run``, the SuperExec and the simulation itself
    have started (seconds of imports, one after the other), and the ClientApp actors wait for it. Yields (its
    process, its port) at once; stopped with everything it started, its folder removed, on leaving. None when
    RAY_ADDRESS names a cluster already (the tests' shared head): the simulation joins that one."""
    if os.environ.get("RAY_ADDRESS"):
        yield None
        return
    # a short folder: Ray's unix sockets live under it and their paths must stay below 108 characters
    temp = Path(tempfile.mkdtemp(prefix="rfray-", dir="/tmp"))
    port = free_port()
    try:
        with (temp / "head.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-c", RAY_HEAD, str(temp)],
                                    env={**flwr_env(flwr_home), **ACTOR_PRELOAD, "RAY_GCS_SERVER_PORT": str(port)},
                                    stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc, port
        finally:
            stop_tree(proc, END_GRACE)  # nothing of a run is written by Ray: its logs go with its folder
            if proc.returncode != -signal.SIGKILL:  # it ended by itself: its log says why
                shutil.copyfile(temp / "head.log", flwr_home / "ray-head.log")
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if "'" in text:
        raise ValueError(f"run-config value {text!r} cannot hold a single quote")
    return f"'{text}'"


# What Flower 1.42 bundles into an app's FAB (flwr.common.constant.FAB_INCLUDE_PATTERNS), and the top-level
# folders it walks file by file (flwr.cli.utils.collect_files has no pruning) only to drop what they hold
BUNDLED_SUFFIXES = (".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl")
BUNDLED_FILES = ("LICENSE", ".gitignore")
UNBUNDLED_DIRS = {".venv", ".git", ".radfed", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".flwr"}


def staged_app(app_dir: Path, into: Path) -> Path:
    """A copy of the app folder with only the files Flower would bundle, so `flwr run` builds the same FAB without
    walking a virtualenv inside the app (45k files of ``.venv``: 8.5 s per run). Returns the copy's folder."""
    app_dir = app_dir.resolve()
    target = into / app_dir.name
    shutil.rmtree(target, ignore_errors=True)
    for folder, dirs, files in os.walk(app_dir):
        here = Path(folder)
        dirs[:] = [d for d in dirs if d != "__pycache__" and not (here == app_dir and d in UNBUNDLED_DIRS)]
        for name in files:
            source = here / name
            if source.is_symlink() or not (name.endswith(BUNDLED_SUFFIXES) or
                                           (here == app_dir and name in BUNDLED_FILES)):
                continue  # Flower skips symlinks and bundles only these kinds of file
            copy = target / source.relative_to(app_dir)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy)
    return target


# `flwr run` in a process that imports Flower's CLI (seconds) while the SuperLink and the Ray head start, then waits
# for their ports: `flwr run` itself would fail on a SuperLink that does not listen yet, and the simulation it starts
# joins the head. argv: the ports (comma list), seconds to wait, flwr's arguments.
FLWR_RUN_WHEN_READY = """\
import socket, sys, time
from flwr.cli.app import app
ports, deadline = [int(p) for p in sys.argv[1].split(",")], time.monotonic() + float(sys.argv[2])
for port in ports:
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.monotonic() > deadline:
            sys.exit(f"port {port} (flower-superlink or the Ray head) did not open in time")
        time.sleep(0.05)
sys.argv = ["flwr", *sys.argv[3:]]
sys.exit(app())
"""
# The ServerApp's last log line (server/app.py `main`): every output and the signed run-end are written before it
RUN_END = re.compile(r"radfed run \d+ (completed|failed|refused) in \d")
STOPPED_AT_END = "radfed: the ServerApp finished ({status}); Flower's processes were stopped then"
# Once the run is over, what each of Flower's and Ray's processes gets to exit on SIGTERM before SIGKILL: none.
# Every output and the signed run-end are written before the last line, and a site's files are crash-safe (atomic
# or appended lines, docs/privacy.md); on SIGTERM Ray's services and workers took 3 to 8 s here and the simulation
# 5 s (Flower's forced exit), with nothing left to do but their own teardown.
END_GRACE = 0.0
# Seconds the SuperLink and the Ray head get to listen (a Ray cluster's start took up to 35 s on the loaded 2 cores)
READY_TIMEOUT = 180


def follow_run(proc: subprocess.Popen, out: IO[str], end_mark: Path | None = None) -> str | None:
    """Copy ``flwr run``'s stream (``proc.stdout``, text) to ``out`` line by line until the ServerApp's last line
    (``RUN_END``); returns its status, or None when the stream ended without it (a crash: Flower's own exit).

    With ``end_mark`` (the file RUN_END_MARK names to the ServerApp, ``server.app.announce_end``): once it appears,
    every output is written; ``flwr run`` is killed then, the rest of its stream copied, and the ServerApp's last
    lines the stream did not bring are written from the file (Flower's log stream brings them about half a second
    later: its upload every 0.2 s and its stream every 0.5 s)."""
    assert proc.stdout is not None
    announced: list[dict] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            if end_mark is not None and end_mark.exists():
                announced.append(json.loads(end_mark.read_text(encoding="utf-8")))
                proc.kill()  # its stream ends with what it has read so far
                return

    watcher = threading.Thread(target=watch, name="radfed-run-end", daemon=True)
    watcher.start()
    seen: list[str] = []
    try:
        for line in proc.stdout:
            out.write(line)
            out.flush()
            seen.append(line)
            if found := RUN_END.search(line):
                return found.group(1)
    finally:
        done.set()
        watcher.join()
    if not announced:
        return None
    for line in announced[0]["lines"]:
        if not any(line in copied for copied in seen):
            out.write(line + "\n")
    out.flush()
    return str(announced[0]["status"])


class Federation:
    """A run ``started_federation`` started: its processes boot (the Ray head, the SuperLink, ``flwr run``);
    ``finish`` follows it to its end."""

    def __init__(self, run: subprocess.Popen, superlink: subprocess.Popen, port: int,
                 head: tuple[subprocess.Popen, int] | None, out: IO[str], flwr_home: Path, gate: Path | None,
                 end_mark: Path | None = None) -> None:
        self.run, self.superlink, self.port, self.head = run, superlink, port, head
        self.out, self.flwr_home, self.gate, self.end_mark = out, flwr_home, gate, end_mark

    def finish(self, timeout: float = 3600) -> int:
        """Open the gate (a gated run's ServerApp starts now), copy the stream until the ServerApp's last line and
        stop every process of the run; 0 when the run completed, else non-zero (flwr's exit code when the
        ServerApp did not get to its last line). ``timeout`` counts from here."""
        run, out = self.run, self.out
        timed_out = threading.Event()
        timer = threading.Timer(timeout, lambda: (timed_out.set(), run.kill()))  # as subprocess.run(timeout=) did
        timer.start()
        status = None
        try:
            if self.gate is not None:
                self.gate.touch()
            wait_port(self.port, self.superlink, timeout=READY_TIMEOUT)
            if self.head:
                wait_port(self.head[1], self.head[0], timeout=READY_TIMEOUT,
                          name=f"the run's Ray head (its log: {self.flwr_home / 'ray-head.log'})")
            status = follow_run(run, out, self.end_mark)
        finally:
            timer.cancel()
            if status is None:
                stop_process(run)  # flwr run has exited by itself, or the run timed out
        if status is not None:  # the run is over: no site has a message left, every output is written
            run.kill()  # flwr run, the SuperLink's tree and the Ray head's, all at once (a 2nd stop finds them gone)
            stop_trees([self.superlink, *([self.head[0]] if self.head else [])], END_GRACE)
            run.wait()
        if timed_out.is_set():
            raise subprocess.TimeoutExpired(run.args, timeout)
        if status is None:
            return run.returncode
        out.write(STOPPED_AT_END.format(status=status) + "\n")
        out.flush()
        return 0 if status == "completed" else 1


@contextmanager
def started_federation(run_config: Mapping[str, object], num_supernodes: int, flwr_home: Path,
                       app_dir: Path = APP_DIR, echo: bool = True, cpus_per_node: int = 1,
                       gated: bool = False) -> Iterator[Federation]:
    """Start `flwr run <app> radfed-sim --stream` with run-config overrides, its SuperLink and Ray head, and yield
    the run (``Federation.finish`` follows it); every process of it is stopped on leaving.

    ``gated``: the ServerApp, once started, waits until ``finish`` before anything else (no run folder, no
    message): the demo starts its federation while the last sites still extract (``radfed demo``), so Flower's
    and Ray's processes, the actors and the coordinator's imports boot on the core the extraction leaves idle.
    """
    app_dir = staged_app(app_dir, flwr_home / "app")
    overrides = overrides_text(run_config)
    args = ["run", str(app_dir), CONNECTION, "--stream", "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_node}"]
    if overrides:
        args += ["--run-config", overrides]
    gate = flwr_home.resolve() / "start-gate" if gated else None
    if gate is not None:
        gate.unlink(missing_ok=True)
    end_mark = flwr_home.resolve() / "run-end"  # the ServerApp's last lines, once every output is written
    end_mark.unlink(missing_ok=True)
    # the log is kept for diagnosis when not echoed
    stream = nullcontext(sys.stdout) if echo else (flwr_home / "flwr-run.log").open("a", encoding="utf-8")
    with ray_head(flwr_home) as head, \
            simulation_superlink(flwr_home, ray_address(head), gate, end_mark) as (superlink, port), stream as out:
        ports = f"{port},{head[1]}" if head else str(port)
        run = subprocess.Popen([sys.executable, "-c", FLWR_RUN_WHEN_READY, ports, str(READY_TIMEOUT), *args],
                               env={**flwr_env(flwr_home), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT,
                               text=True, errors="replace", bufsize=1)
        try:
            yield Federation(run, superlink, port, head, out, flwr_home, gate, end_mark)
        finally:
            stop_process(run, grace=0 if run.poll() is None else 5.0)


def run_federation(run_config: Mapping[str, object], num_supernodes: int, flwr_home: Path,
                   app_dir: Path = APP_DIR, timeout: float = 3600, echo: bool = True, cpus_per_node: int = 1) -> int:
    """`flwr run <app> radfed-sim --stream` with run-config overrides; returns 0 when the run completed, else
    non-zero (flwr's exit code when the ServerApp did not get to its last line).

    The app is run from a copy holding only what Flower bundles (``staged_app``, under ``flwr_home``). Not
    echoed, the stream goes to ``<flwr_home>/flwr-run.log``. ``flwr run`` starts beside the SuperLink (it imports
    Flower's CLI meanwhile). Once the ServerApp's last line arrives, its outputs are written and no site has a
    message left: Flower's processes are stopped then (``flwr run``, then the SuperLink's process group: the
    SuperExec, the simulation and its Ray cluster), not after the simulation's own teardown (Ray's processes
    stopped one by one, up to a second each) and the log stream's end (``STOPPED_AT_END`` says so in the stream).
    """
    with started_federation(run_config, num_supernodes, flwr_home, app_dir, echo, cpus_per_node) as federation:
        return federation.finish(timeout)


def ray_address(head: tuple[subprocess.Popen, int] | None) -> str:
    return f"127.0.0.1:{head[1]}" if head else ""


def overrides_text(run_config: Mapping[str, object]) -> str:
    """``k=v`` pairs as ``flwr run --run-config`` takes them."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())


def parse_overrides(text: str) -> dict[str, object]:
    """``k=v`` pairs of TOML values (``flwr run --run-config``) as a dict, parsed exactly as Flower parses them."""
    import click
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text] if text else None))
    except click.ClickException:  # Flower's parser speaks to its own CLI; ours names the fix
        raise ValueError(f"run config {text!r} is not space-separated key=value pairs of TOML values: write numbers "
                         "and true/false as they are and text in quotes, e.g. \"training='exact' "
                         "num-server-rounds=10\"") from None


def app_run_config(overrides: Mapping[str, object] | str | None = None, app_dir: Path = APP_DIR) -> dict[str, object]:
    """The complete run config a run with these overrides sees: the app's defaults merged with the
    overrides exactly as Flower merges them (unknown keys are an error)."""
    from flwr.common.config import get_fused_config_from_dir

    text = overrides if isinstance(overrides, str) else overrides_text(overrides or {})
    parsed = parse_overrides(text)
    try:
        return dict(get_fused_config_from_dir(app_dir, parsed))
    except ValueError as exc:
        raise ValueError(f"run config {text!r}: {exc} (the keys are in [tool.flwr.app.config] of "
                         f"{app_dir / 'pyproject.toml'})") from None
