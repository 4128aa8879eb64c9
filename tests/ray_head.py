"""One Ray cluster for every simulated federation of a test session.

Each `flwr run` on the simulation engine calls ``ray.init()``, which starts a whole local Ray cluster (GCS,
raylet, agents) and stops it after the run: ray.init() and a first task took 18-35 s on the shared 2-core
machine, 0.6-5 s joining a running head, for nothing the tests check. With ``RAY_ADDRESS`` set, Flower's Ray
backend joins a running cluster instead; its ClientApp actors are still new processes of that run's own Ray
job, and die with it. The head is started on first use, in its own process group and temp folder, and
stopped by that group at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from radfed.processes import free_port

READY = "Ray runtime started"
ATTEMPTS = 2  # starts of the head per session; after that, each run starts its own cluster as without this module
_head: subprocess.Popen | None = None
_address = ""
_temp = ""
_failures: list[str] = []


def address() -> str:
    """The running head's address, starting it on first use; "" when it cannot start (on an overloaded machine
    `ray start` can time out, as `ray.init()` can): the runs then start their own clusters, only slower."""
    if _head is not None and _head.poll() is None:
        return _address
    stop()
    while len(_failures) < ATTEMPTS:
        try:
            return _start()
        except RuntimeError as exc:
            _failures.append(str(exc))
            warnings.warn(f"{exc}\n(attempt {len(_failures)} of {ATTEMPTS}; without it each simulated run starts "
                          "its own Ray cluster)", stacklevel=2)
    return ""


def _start() -> str:
    global _head, _address, _temp
    # a short folder: Ray's unix sockets live under it and their paths must stay below 108 characters
    _temp = tempfile.mkdtemp(prefix="rfray-", dir="/tmp")
    log = Path(_temp) / "head.log"
    port = free_port()
    # every port the head listens on is a free one: Ray's fixed defaults (client server 10001, dashboard 8265,
    # agent 52365) clash with another Ray head on the same machine
    ports = [f"--{name}={free_port()}" for name in ("ray-client-server-port", "dashboard-port",
                                                     "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port")]
    with log.open("wb") as out:
        _head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port), *ports,
             "--node-ip-address", "127.0.0.1", "--temp-dir", _temp, "--include-dashboard=false",
             "--disable-usage-stats"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while READY not in log.read_text(errors="replace"):
        if _head.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")
            stop()
            raise RuntimeError(f"the tests' Ray head did not start (`ray start --head`):\n{text[-800:]}")
        time.sleep(0.5)
    _address = f"127.0.0.1:{port}"
    return _address


@contextmanager
def joined() -> Iterator[None]:
    """While inside, the processes this test process starts (a simulation's SuperLink and what it runs) join the
    shared head instead of starting their own cluster."""
    before, head = os.environ.get("RAY_ADDRESS"), address()
    if head:
        os.environ["RAY_ADDRESS"] = head
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before


def stop() -> None:
    """SIGTERM the head's process group (`ray start --block` stops the services it started), SIGKILL what is left,
    and remove its folder."""
    global _head
    if _head is not None:
        with suppress(ProcessLookupError):
            os.killpg(_head.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            _head.wait(timeout=60)
        with suppress(ProcessLookupError):
            os.killpg(_head.pid, signal.SIGKILL)
        _head.wait()
        _head = None
    if _temp:
        shutil.rmtree(_temp, ignore_errors=True)
