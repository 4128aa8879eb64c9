"""Starting and stopping the processes a run starts (the SuperLink, the Ray head, ``flwr run``): a free port, waiting
for one to open, and stopping a process with everything it started, by pid or process group (never by name)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import suppress


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, timeout: float, name: str = "flower-superlink") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} before it was ready")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not open port {port} within {timeout:.0f}s")


def stop_tree(proc: subprocess.Popen, grace: float = 25.0) -> None:
    """Stop a process we started (the SuperLink, the Ray head) and everything it started, each by its pid or
    process group, at once: SIGTERM, then SIGKILL what is left after ``grace`` seconds (``grace=0``: SIGKILL at
    once). The SuperLink starts its SuperExec, and that the simulation, in sessions of their own, so its process
    group does not reach them; Ray's services and workers are descendants of the process that started the
    cluster."""
    stop_trees([proc], grace)


def stop_trees(procs: list[subprocess.Popen], grace: float = 25.0) -> None:
    """``stop_tree`` for several processes (each started in a session of its own) and all they started, signalled
    together (the run's end: the SuperLink's and the Ray head's trees in one go, not one after the other)."""
    import psutil

    started = []
    for proc in procs:
        with suppress(psutil.Error):
            started += psutil.Process(proc.pid).children(recursive=True)
    # at grace 0 the SuperLink goes too, at once: it reaps the SuperExec, which would stay a zombie until then
    sig = signal.SIGTERM if grace > 0 else signal.SIGKILL
    for child in started:
        with suppress(psutil.Error):
            child.send_signal(sig)  # psutil checks that the pid is still the process it listed
    for proc in procs:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    left = wait_dead(started, timeout=grace if grace > 0 else 25.0)
    for child in left:
        with suppress(psutil.Error):
            child.kill()
    wait_dead(left, timeout=25.0)
    for proc in procs:
        stop_process_group(proc, grace)


def wait_dead(processes: list, timeout: float) -> list:
    """Wait until each of ``processes`` (psutil.Process) has exited; returns those still running after ``timeout``.
    An exited process counts as soon as it is a zombie: one whose parent died waits for pid 1 to reap it, which
    here took 2 s (psutil.wait_procs waits for the reaping)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        left = []
        for process in processes:
            with suppress(psutil.Error):  # gone: psutil also checks that the pid is still the process it listed
                if process.status() != psutil.STATUS_ZOMBIE:
                    left.append(process)
        if not left or time.monotonic() >= deadline:
            return left
        processes = left
        time.sleep(0.02)


def stop_process_group(proc: subprocess.Popen, grace: float = 25.0) -> None:
    """SIGTERM the whole group (SuperLink, simulation, ray workers), SIGKILL what is left (at once: ``grace=0``)."""
    if proc.poll() is None and grace > 0:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM one process we started, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
