"""The demo's ClientApp workers: Flower's simulation backend interface served by processes of this machine, forked
from one that has loaded the ClientApp, in place of Ray actors (``radfed demo`` only).

Flower 1.42's simulation hands each message to a ``Backend`` (flwr/server/superlink/fleet/vce/backend/backend.py:
``build``, ``num_workers``, ``is_worker_idle``, ``process_message``, ``terminate``); its ``start_vce`` imports the one
it uses, ``RayBackend``, from ``...vce.backend.raybackend`` at the moment it needs it. Ray's head, GCS, raylet, its
two agents and each actor's Ray worker cost ~6 CPU s to boot (docs/performance.md, stop 41), on the core the demo's
last site extracts on: more than that core has spare. ``ProcessBackend`` starts its workers from multiprocessing's
forkserver with the ClientApp's module preloaded (one import, then each worker is a fork: ~1 CPU s in all), and
``process_backend`` stands it in for that import while the demo's simulation runs. The messages, their order, the
ClientApp and what it does with them are Flower's and radfed's own; a ClientApp that raises or a worker that dies
becomes the same ``ClientAppException`` Flower's actors raise (Flower's simulation replies with an Error message),
and a dead worker is replaced. Runs through a SuperLink (``flwr run``, the tests' and benches' chain) keep Ray.

Each worker's own output (the sites' log lines, which Ray's workers kept in its session folder) goes to
``<FLWR_HOME>/clientapp-workers.log``.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

log = logging.getLogger("flwr.radfed.launch")

RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"  # where start_vce imports its backend from
WORKERS_LOG = "clientapp-workers.log"


def serve(conn: Connection, app_ref: str, log_path: str) -> None:
    """A worker: the ClientApp ``app_ref`` ("module:attribute", preloaded by the forkserver, importable from the
    ``sys.path`` the backend handed it) answers each (message, context) from ``conn`` with ("ok", reply, context) or
    ("raised", what, traceback), until the backend closes its end."""
    with open(log_path, "ab", buffering=0) as out:  # stdout and stderr: print, Flower's console handler, tracebacks
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    module, _, attribute = app_ref.partition(":")
    app = getattr(importlib.import_module(module), attribute)
    while True:
        try:
            message, context = conn.recv()
        except (EOFError, OSError):  # the backend terminated, or the launcher is gone
            return
        try:
            answer: tuple = ("ok", app(message=message, context=context), context)
        except Exception as exc:  # noqa: BLE001  # reported to the backend as Flower's actors report it
            answer = ("raised", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        conn.send(answer)


@dataclass
class Worker:
    process: BaseProcess
    conn: Connection
    lock: threading.Lock  # one message at a time


class ProcessBackend:
    """A Flower simulation backend (the ``Backend`` interface, duck-typed: Flower's module is not imported for it)
    whose workers are ``workers`` processes, each serving one message at a time. Each node's messages go to one
    worker (the nodes dealt out in turn as they first appear): a site is loaded into one worker's run cache
    (client.runcache), not into each (the demo: 4 loads instead of 8, ~80 ms of CPU each). Flower hands messages to
    ``num_workers`` threads, one per node (``nodes``), so a message waiting for its node's worker holds back no other
    worker."""

    def __init__(self, backend_config: dict[str, Any], app_ref: str, app_dir: Path, log_path: Path,
                 workers: int, nodes: int = 0) -> None:
        del backend_config  # Ray's settings (init_args, client_resources): the worker count comes from the caller
        self.app_ref, self.app_dir, self.log_path = app_ref, str(app_dir), str(log_path)
        self.workers, self.threads = workers, max(workers, nodes)
        self.context = multiprocessing.get_context("forkserver")
        self.started: list[Worker] = []  # the live workers, by place
        self.node_worker: dict[int, int] = {}  # node id -> its worker's place
        self.lock = threading.Lock()

    def _start_worker(self) -> Worker:
        here, there = self.context.Pipe()
        process = self.context.Process(target=serve, args=(there, self.app_ref, self.log_path),
                                       name="radfed-clientapp", daemon=True)
        process.start()
        there.close()
        return Worker(process, here, threading.Lock())

    def build(self, app_fn: Callable[[], Any]) -> None:
        """Start the workers (Flower has loaded the ClientApp once in this process already: ``app_fn`` is that)."""
        del app_fn  # each worker loads the ClientApp from its module, as the forkserver preloaded it
        if self.app_dir not in sys.path:
            sys.path.insert(0, self.app_dir)  # the forkserver and its workers get this process's sys.path
        self.context.set_forkserver_preload([self.app_ref.partition(":")[0]])
        for _ in range(self.workers):
            worker = self._start_worker()
            with self.lock:
                self.started.append(worker)

    @property
    def num_workers(self) -> int:
        """How many threads Flower's simulation hands messages to (vce_api.start_vce): one per node."""
        return self.threads

    def is_worker_idle(self) -> bool:
        return any(not w.lock.locked() for w in self.started)

    def _place(self, node_id: int) -> int:
        """The place of the node's worker: the next in turn at its first message, the same ever after."""
        with self.lock:
            return self.node_worker.setdefault(node_id, len(self.node_worker) % self.workers)

    def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
        """The ClientApp's reply to ``message`` and the node's updated ``context``, from the node's worker."""
        from flwr.clientapp.client_app import ClientAppException

        place = self._place(message.metadata.dst_node_id)
        with self.lock:
            worker = self.started[place]
        with worker.lock:
            try:
                worker.conn.send((message, context))
                status, *rest = worker.conn.recv()
            except (EOFError, OSError):  # the worker ended (a broken pipe is an OSError)
                worker.process.join(1.0)
                code = worker.process.exitcode
                worker.conn.close()
                with self.lock:
                    if self.started and self.started[place] is worker:  # not terminated meanwhile
                        self.started[place] = self._start_worker()  # the run goes on with a new worker
                raise ClientAppException(f"the ClientApp's worker process {worker.process.pid} ended (exit code "
                                         f"{code}) while it handled this message (its output: {self.log_path}); a "
                                         "new worker took its place") from None
        if status != "ok":
            what, trace = rest
            log.error("a site's ClientApp raised %s\n%s", what, trace)
            raise ClientAppException(what)
        reply, updated = rest
        return reply, updated

    def terminate(self) -> None:
        """Stop every worker at once (nothing of a run is written by them after their last reply)."""
        with self.lock:
            workers, self.started = self.started, []
        for worker in workers:
            worker.conn.close()
            if worker.process.is_alive():
                worker.process.kill()
        for worker in workers:
            worker.process.join(5.0)


@contextmanager
def process_backend(app_ref: str, app_dir: Path, flwr_home: Path, workers: int,
                    nodes: int = 0) -> Iterator[list[ProcessBackend]]:
    """While the block runs, Flower's simulation builds a ``ProcessBackend`` (``workers`` processes for ``nodes``
    nodes, the ClientApp ``app_ref`` of ``app_dir``, their output in ``<flwr_home>/clientapp-workers.log``) where it
    would build its Ray backend. Yields the backends built so far; on leaving, stops their workers and
    multiprocessing's forkserver."""
    built: list[ProcessBackend] = []

    def backend(backend_config: dict[str, Any]) -> ProcessBackend:
        made = ProcessBackend(backend_config, app_ref, app_dir, flwr_home / WORKERS_LOG, workers, nodes)
        built.append(made)
        return made

    stand_in = types.ModuleType(RAY_BACKEND_MODULE, "radfed.process_backend standing in for Flower's Ray backend")
    stand_in.RayBackend = backend  # type: ignore[attr-defined]
    saved = sys.modules.get(RAY_BACKEND_MODULE)
    sys.modules[RAY_BACKEND_MODULE] = stand_in
    try:
        yield built
    finally:
        if saved is not None:
            sys.modules[RAY_BACKEND_MODULE] = saved
        else:
            sys.modules.pop(RAY_BACKEND_MODULE, None)
        for made in built:
            made.terminate()
        stop_forkserver()


def stop_forkserver() -> None:
    """End multiprocessing's forkserver of this process and then its resource tracker, if it started them, and wait
    for both. They would end after this process (the tracker on its pipe closing), so a caller that ends at once
    left them running for a moment (seen by CI), and one that lives on, such as a test, kept them."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (getattr(forkserver, "_forkserver", None), getattr(resource_tracker, "_resource_tracker", None)):
        stop = getattr(helper, "_stop", None)  # CPython's own: closes the helper's pipe and waits for its exit
        if callable(stop):
            stop()
