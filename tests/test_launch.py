"""radfed.launch starting and stopping the processes of a run: the Ray head beside the SuperLink, and the stop at
the ServerApp's last line (real processes, no federation: seconds)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from federation_helpers import flower_processes_of

from common.protocol import RUN_END_MARK, START_GATE
from radfed.launch import BOOT_NICE, END_GRACE, READY_TIMEOUT, ray_head, simulation_superlink
from radfed.processes import stop_tree, stop_trees, wait_dead, wait_port

# A process that notes any SIGTERM in a file and lives on, then starts itself again in a session of its own (as the
# SuperLink starts the SuperExec): the parent's process group does not reach the copy, only its pid does.
TREE = """\
import os, signal, subprocess, sys, time
from pathlib import Path
folder, depth = Path(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGTERM, lambda *_: (folder / f"sigterm-{depth}").touch())
if depth == 0:
    subprocess.Popen([sys.executable, "-c", sys.argv[3], *sys.argv[1:2], "1", sys.argv[3]], start_new_session=True)
(folder / f"up-{depth}").touch()
time.sleep(120)
"""


def test_the_run_end_stop_kills_every_process_started_at_once_without_their_teardown(tmp_path):
    """At the ServerApp's last line every output is written: Flower's and Ray's processes get no SIGTERM (their
    teardown took seconds for nothing), each is SIGKILLed, also one outside the process group."""
    top = subprocess.Popen([sys.executable, "-c", TREE, str(tmp_path), "0", TREE], start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "up-1").exists():
        assert time.monotonic() < deadline and top.poll() is None, "the process tree did not start"
        time.sleep(0.05)
    started = [top.pid, *(p.pid for p in psutil.Process(top.pid).children(recursive=True))]
    assert len(started) == 2

    stop_tree(top, END_GRACE)

    assert top.returncode == -9
    assert not wait_dead([psutil.Process(pid) for pid in started if psutil.pid_exists(pid)], timeout=0)
    assert not list(tmp_path.glob("sigterm-*"))


def test_the_run_end_stops_the_superlink_s_and_the_ray_head_s_trees_together(tmp_path):
    """At the run's end the launcher stops the SuperLink's tree and the Ray head's in one go (``stop_trees``), each
    process SIGKILLed by its pid, not one tree after the other."""
    tops = []
    for name in ("superlink", "head"):
        (tmp_path / name).mkdir()
        tops.append(subprocess.Popen([sys.executable, "-c", TREE, str(tmp_path / name), "0", TREE],
                                     start_new_session=True))
    deadline = time.monotonic() + 60
    while not all((tmp_path / name / "up-1").exists() for name in ("superlink", "head")):
        assert time.monotonic() < deadline and all(top.poll() is None for top in tops), "the trees did not start"
        time.sleep(0.05)
    started = [p.pid for top in tops for p in (psutil.Process(top.pid), *psutil.Process(top.pid).children(True))]
    assert len(started) == 4

    stop_trees(tops, END_GRACE)

    assert [top.returncode for top in tops] == [-9, -9]
    assert not wait_dead([psutil.Process(pid) for pid in started if psutil.pid_exists(pid)], timeout=0)
    assert not list(tmp_path.glob("*/sigterm-*"))


def test_an_exited_process_counts_as_stopped_before_it_is_reaped():
    """A killed process whose parent has not reaped it yet (a zombie; pid 1 reaps orphans when it gets to it) is
    stopped: the stop does not wait for the reaping. A live one is still listed."""
    dead, live = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2))
    try:
        dead.kill()
        zombie = psutil.Process(dead.pid)
        deadline = time.monotonic() + 30
        while zombie.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert wait_dead([zombie, psutil.Process(live.pid)], timeout=0) == [psutil.Process(live.pid)]
    finally:
        live.kill()
        live.wait()
        dead.wait()


def test_the_run_starts_its_own_ray_head_and_leaves_neither_a_process_nor_a_file(tmp_path, monkeypatch):
    """The head is Ray's GCS and raylet (with the raylet's two agents, which it needs), without the autoscaler's
    monitor and the log monitor a simulation on one machine does not use (`ray start --no-monitor
    --include-log-monitor=False`), nor Ray's API server (the "minimal" dashboard process): all three start before
    the raylet does, so they would be up by now."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_head(tmp_path) as head:
        assert head is not None
        proc, port = head
        wait_port(port, proc, timeout=READY_TIMEOUT, name="the Ray head")
        temp = Path(proc.args[-1])
        assert temp.is_dir() and len(str(temp)) < 30  # Ray's unix socket paths under it must stay short
        deadline = time.monotonic() + READY_TIMEOUT
        while "the Ray head is up" not in (temp / "head.log").read_text(errors="replace"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        started = flower_processes_of(tmp_path)  # the head's process, GCS, raylet (FLWR_HOME marks them)
        assert any("gcs_server" in cmd for cmd in started) and any("raylet" in cmd for cmd in started), started
        assert not [cmd for cmd in started if "monitor.py" in cmd], started  # autoscaler/.../monitor.py, log_monitor.py
        assert not [cmd for cmd in started if "dashboard/dashboard.py" in cmd], started  # the API server
    assert not flower_processes_of(tmp_path)
    assert not temp.exists()


# A driver joining the run's Ray head (argv: its address, the app folder) as Flower's simulation does (the app's
# folder on the job's PYTHONPATH), with one actor that says whether radfed's ClientApp module was loaded in its worker
# before the actor existed, i.e. before any task (a message) reached it.
ACTOR_PROBE = """\
import sys
import ray
ray.init(address=sys.argv[1], runtime_env={"env_vars": {"PYTHONPATH": sys.argv[2]}}, log_to_driver=False,
         configure_logging=False)

@ray.remote(num_cpus=0)
class Probe:
    def __init__(self):
        self.loaded = "client.app" in sys.modules

    def loaded_before_any_task(self):
        return self.loaded

print("preloaded", ray.get(Probe.remote().loaded_before_any_task.remote()), flush=True)
"""

# Importing radfed's ClientApp module as a Ray worker's preload does, with every file opened and socket used noted.
IMPORT_AUDIT = """\
import json, sys
opened, sockets = [], []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else
                 sockets.append(event) if event.startswith("socket.") and event != "socket.__new__" else None)
import radfed.actor_preload  # noqa: E402,F401
assert "client.app" in sys.modules
print(json.dumps({"opened": opened, "sockets": sockets, "prefixes": [sys.prefix, sys.base_prefix]}))
"""
ROOT = Path(__file__).resolve().parent.parent


def test_the_run_s_ray_workers_import_the_clientapp_module_before_any_message(tmp_path, monkeypatch):
    """Each ClientApp actor of a run's own Ray head imports radfed's ClientApp module as its worker boots (a gated
    demo's actors then do it while the ServerApp waits at the gate), not when the first message arrives."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_head(tmp_path) as head:
        assert head is not None
        proc, port = head
        wait_port(port, proc, timeout=READY_TIMEOUT, name="the Ray head")
        probe = subprocess.run([sys.executable, "-c", ACTOR_PROBE, f"127.0.0.1:{port}", str(ROOT)],
                               cwd=tmp_path, capture_output=True, text=True, timeout=READY_TIMEOUT)
        assert "preloaded True" in probe.stdout, probe.stdout + probe.stderr
    assert not flower_processes_of(tmp_path)


def test_the_actors_early_import_reads_no_site_file_and_sends_nothing(tmp_path):
    """What the preload runs before the gate opens (radfed/actor_preload.py, importing `client.app`) opens only
    code (Python's and the environment's libraries, radfed's own modules) and no socket; no site is named to an actor
    before a message."""
    import json

    done = subprocess.run([sys.executable, "-c", IMPORT_AUDIT], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=READY_TIMEOUT)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert not seen["sockets"]
    prefixes = tuple(os.path.realpath(p) for p in seen["prefixes"])
    code = (".py", ".pyc", ".so", ".pth", ".typed")  # modules and their compiled libraries
    read = [p for p in seen["opened"] if not os.path.realpath(p).startswith(prefixes)]
    assert read and all(p.endswith(code) or Path(p).is_dir() for p in read), read
    assert all(Path(p).resolve().is_relative_to(ROOT) or p.startswith(prefixes) for p in read), read


def test_a_ray_cluster_named_by_ray_address_is_joined_not_started(tmp_path, monkeypatch):
    """The tests' shared head (tests/ray_head.py), or a user's cluster: the simulation joins it."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with ray_head(tmp_path) as head:
        assert head is None
    assert not list(tmp_path.iterdir())


def test_a_gated_run_s_superlink_passes_the_gate_to_the_processes_it_starts(tmp_path):
    """`radfed demo` starts its federation while the last sites extract: the SuperLink (and so its SuperExec and
    the simulation running the ServerApp, which inherit its environment) names the file the ServerApp waits for."""
    gate, mark = tmp_path / "start-gate", tmp_path / "run-end"
    with simulation_superlink(tmp_path / "flwr", "", gate, mark) as (superlink, port):
        wait_port(port, superlink, timeout=READY_TIMEOUT)
        environ = Path(f"/proc/{superlink.pid}/environ").read_bytes().split(b"\0")
        assert f"{START_GATE}={gate}".encode() in environ and f"{RUN_END_MARK}={mark}".encode() in environ
    assert not flower_processes_of(tmp_path / "flwr")
    assert not gate.exists()


def test_the_coordinator_waits_for_the_gate_before_anything(tmp_path, monkeypatch):
    """Started early, the ServerApp writes nothing and sends nothing before the launcher's go: with the gate
    closed it gives up (here after a short timeout) without a run folder, an audit entry or a message (the grid
    is never touched)."""
    from flwr.app import Context, RecordDict

    import server.app as server_app
    from radfed.launch import app_run_config

    monkeypatch.setenv(START_GATE, str(tmp_path / "start-gate"))
    monkeypatch.setattr(server_app, "GATE_TIMEOUT", 0.3)
    out = tmp_path / "runs"
    config = app_run_config({"output-dir": str(out), "data-root": str(tmp_path), "audit-key": str(tmp_path / "k")})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    with pytest.raises(RuntimeError, match="did not start the run"):
        server_app.main(None, context)  # type: ignore[arg-type]
    assert not out.exists() and not (tmp_path / "k").exists()


def test_the_gate_opens_when_the_launcher_writes_it(tmp_path, monkeypatch):
    import server.app as server_app

    gate = tmp_path / "start-gate"
    monkeypatch.setenv(START_GATE, str(gate))
    opener = threading.Timer(0.2, gate.touch)
    opener.start()
    server_app.wait_for_start(timeout=READY_TIMEOUT)
    assert gate.exists()
    opener.join()


def test_the_run_starts_at_the_go_without_waiting_for_the_coordinator_s_early_imports(tmp_path, monkeypatch):
    """The coordinator's later imports (torch, matplotlib: seconds on a loaded machine) go on in a thread while it
    waits at the gate; once the gate opens the run starts, whether or not they are done."""
    import server.app as server_app

    gate, importing, go_on = tmp_path / "start-gate", threading.Event(), threading.Event()
    done: list[str] = []

    def slow_imports() -> None:  # stands for warm_imports still importing when the gate opens
        importing.set()
        go_on.wait(timeout=10)  # the old way, in the coordinator's thread, would wait for this
        done.append("imports")

    monkeypatch.setenv(START_GATE, str(gate))
    monkeypatch.setattr(server_app, "warm_imports", slow_imports)
    opener = threading.Thread(target=lambda: (importing.wait(READY_TIMEOUT), gate.touch()))
    opener.start()
    try:
        server_app.wait_for_start(timeout=READY_TIMEOUT)
        done.append("run")
    finally:
        go_on.set()
        opener.join()
    assert done[0] == "run"


# `flwr run` as the launcher sees it near a run's end: Flower's stream has brought a site's dropout line, not yet the
# ServerApp's last line (its log upload and stream lag), and never will here. argv: a file it touches once it printed.
LAGGING_STREAM = """\
import sys, time
from pathlib import Path
print("INFO :      Site hospital-b did not take part from the plan phase on: run plan not approved", flush=True)
Path(sys.argv[1]).touch()
time.sleep(120)
"""


def test_the_run_stops_when_the_serverapp_announces_its_end_not_when_the_stream_brings_it(tmp_path):
    """Once the ServerApp has written every output it writes its last lines to the file RUN_END_MARK names
    (server.app.announce_end): the launcher stops `flwr run` then, and prints the lines the stream had not brought,
    each once."""
    import io
    import json

    from radfed.launch import follow_run
    from server.app import announce_end

    printed, mark = tmp_path / "printed", tmp_path / "run-end"
    proc = subprocess.Popen([sys.executable, "-c", LAGGING_STREAM, str(printed)], stdout=subprocess.PIPE, text=True)
    lines = ["Site hospital-b did not take part from the plan phase on: run plan not approved",
             "radfed run 7 completed in 1.0s (9 message(s) to 2 site(s), carrying 9 request(s)); metrics, ..."]

    def serverapp_end() -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not printed.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.environ[RUN_END_MARK] = str(mark)  # as the launcher sets it for the SuperLink's processes
        try:
            announce_end("completed", lines)
        finally:
            del os.environ[RUN_END_MARK]

    ending = threading.Thread(target=serverapp_end)
    ending.start()
    out = io.StringIO()
    try:
        assert follow_run(proc, out, mark) == "completed"
    finally:
        ending.join()
        proc.kill()
    assert proc.wait(timeout=READY_TIMEOUT) == -9  # killed by the launcher, not ended by itself
    copied = out.getvalue()
    assert copied.count("did not take part") == 1 and copied.count("radfed run 7 completed in") == 1, copied
    assert json.loads(mark.read_text()) == {"status": "completed", "lines": lines}
    assert not list(tmp_path.glob("*.partial"))


def test_without_the_end_mark_the_serverapp_writes_nothing(tmp_path, monkeypatch):
    from server.app import announce_end

    monkeypatch.delenv(RUN_END_MARK, raising=False)
    monkeypatch.chdir(tmp_path)
    announce_end("completed", ["radfed run 7 completed in 1.0s"])  # a deployment's ServerApp: no launcher asks
    assert not list(tmp_path.iterdir())


# The demo's federation in one process (radfed.inprocess), as `radfed demo` runs it: gated, then opened
IN_PROCESS_RUN = """\
import json, sys, time
from pathlib import Path
from radfed.inprocess import in_process_federation
config, home, go = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
with in_process_federation(config, num_supernodes=2, flwr_home=home, echo=False, gated=True) as federation:
    while not go.exists():
        time.sleep(0.05)
    sys.exit(federation.finish(timeout=600))
"""
FLOWER_PROCESSES = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr.cli")
RAY_PROCESSES = ("gcs_server", "raylet", "ray::", "ray/dashboard", "runtime_env")


def test_the_demo_s_federation_runs_in_its_own_process_gated_with_no_flower_process(tmp_path):
    """`radfed demo` runs its simulation in its own process (Flower's simulation API, the ClientApps in
    radfed.process_backend's workers): no SuperLink, SuperExec, `flwr run`, `flwr-simulation` or Ray process, and no
    listening port; the workers boot at BOOT_NICE; the ServerApp still waits at the gate (no run folder before it
    opens), the run completes with every output and its last lines, and nothing is left after."""
    from radfed import synth
    from radfed.cli import approve_demo_plan

    data = tmp_path / "sites"
    for i, spec in enumerate(synth.tiny_sites(2, 10)):
        synth.write_site(data, spec, seed=700 + i)
    out, home, go = tmp_path / "runs", tmp_path / "flwr", tmp_path / "go"
    config = {"data-root": str(data), "output-dir": str(out), "training": "fedavg", "num-server-rounds": 2,
              "min-cases-per-class": 5, "select-features": 3, "external-validation": "none", "local-only": "none"}
    approve_demo_plan(sorted(p for p in data.iterdir() if p.is_dir()), config)
    seen: set[str] = set()
    nices: set[int] = set()
    worker_nices: set[int] = set()
    listening: set[tuple[str, int]] = set()
    proc = subprocess.Popen([sys.executable, "-c", IN_PROCESS_RUN, json.dumps(config), str(home), str(go)])
    try:
        deadline = time.monotonic() + 600
        opened_at = time.monotonic() + 3.0  # the simulation boots meanwhile: the ServerApp waits at the gate
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not end"
            with contextlib.suppress(psutil.Error):
                launcher = psutil.Process(proc.pid)
                for child in [launcher, *launcher.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        listening.update((str(c.laddr.ip), c.laddr.port) for c in child.net_connections("inet")
                                         if c.status == psutil.CONN_LISTEN)
                        if child is launcher:
                            continue
                        seen.add(command := " ".join(child.cmdline()))
                        if "multiprocessing.forkserver" in command:  # the forkserver and the ClientApp workers
                            worker_nices.add(child.nice())
            nices.update(thread_nices(proc.pid))
            if not go.exists() and time.monotonic() > opened_at:
                assert not out.exists() or not list(out.glob("*-run*")), "the run started before the gate"
                go.touch()
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    log = home / "flwr-run.log"
    assert proc.returncode == 0, log.read_text(encoding="utf-8")[-3000:] if log.exists() else "no log"
    runs = sorted(out.glob("*-run*"))
    assert len(runs) == 1
    assert json.loads((runs[0] / "metrics.json").read_text(encoding="utf-8"))["status"] == "completed"
    assert json.loads((home / "run-end").read_text(encoding="utf-8"))["status"] == "completed"
    assert "completed in" in log.read_text(encoding="utf-8")
    assert not [cmd for cmd in seen if any(name in cmd for name in (*FLOWER_PROCESSES, *RAY_PROCESSES))], seen
    assert worker_nices == {BOOT_NICE}, worker_nices
    assert not listening, listening  # no port at all: the messages go through memory and pipes (Ray's GCS listened)
    assert not flower_processes_of(home)
    # the simulation's threads booted (and ran) at BOOT_NICE beside the launcher's own, which keep this process's
    assert nices == {os.getpriority(os.PRIO_PROCESS, 0), BOOT_NICE}, nices


def thread_nices(pid: int) -> set[int]:
    """The niceness of each thread of ``pid`` now (Linux: per thread; /proc/PID/task/TID/stat's 19th field)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found.add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
    return found
