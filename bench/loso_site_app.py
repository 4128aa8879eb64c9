"""radfed's site (ClientApp) under cProfile inside the simulation (bench/bench_loso.py ``--profile-sites``).

Copied as ``lososites.py`` into a scratch app folder beside radfed's code (bench.bench_messages.make_app). Every call
of radfed's ClientApp (every message and ``query.batch``, all mods included) runs under one profiler per Ray worker
process; each worker writes ``<output-dir>/site-<pid>.prof`` and ``site-<pid>.json`` (per message type: calls, wall
and CPU seconds inside the ClientApp; the process's CPU in all; every call's start and end, ``timeline``) every 10
calls, so the last state is on disk when Flower stops the workers. In-process profiling of one site (``--profile``)
misses what the simulation does: one worker serving every site, its caches shared between them.

With ``RADFED_SITE_PROFILE=0`` no profiler runs (the CPU by message type is then the sites' own, without cProfile's
share). With ``RADFED_CAPTURE_NODE=<partition id>`` in the environment, the worker serving that node also pickles every
message it is handed, with the node's context as it arrived, to ``<output-dir>/capture-<partition id>/<n>.pkl``
(before the call): ``bench/site_messages.py`` ``replay`` answers them again in one process, to time and profile a
site's real batches of every kind (moments, correlation, Newton) and to compare its replies between two versions.
"""

from __future__ import annotations

import cProfile
import gc
import json
import os
import pickle
import time
from pathlib import Path

from flwr.app import Context, Message

from client.app import app as radfed

_PROFILER = cProfile.Profile()
_SPENT: dict[str, list[float]] = {}  # message type -> [calls, wall s, CPU s] inside the ClientApp
_CALLS = [0]
_TIMELINE: list[tuple[float, float, str]] = []  # each call's (start, end) epoch seconds and message type
_GC = {"seconds": [0.0, 0.0, 0.0], "collections": [0, 0, 0], "started": [0.0]}  # the collector's CPU by generation


def _gc_time(phase: str, info: dict) -> None:
    if phase == "start":
        _GC["started"][0] = time.process_time()
        return
    _GC["seconds"][info["generation"]] += time.process_time() - _GC["started"][0]
    _GC["collections"][info["generation"]] += 1


gc.callbacks.append(_gc_time)


class _Profiled(type(radfed)):  # type: ignore[misc]  # Flower's loader wants a ClientApp
    def __init__(self) -> None:
        self.__dict__.update(radfed.__dict__)
        self._where = "lososites:profiled_site"  # shipped by reference (client.appref): to this app, not radfed's

    def __call__(self, message: Message, context: Context) -> Message:
        _capture(message, context)
        profiled = os.environ.get("RADFED_SITE_PROFILE", "1") != "0"  # "0": only the CPU by message type
        wall, cpu, began = time.perf_counter(), time.process_time(), time.time()
        if profiled:
            _PROFILER.enable()
        try:
            return radfed(message, context)
        finally:
            if profiled:
                _PROFILER.disable()
            spent = _SPENT.setdefault(message.metadata.message_type, [0, 0.0, 0.0])
            spent[0] += 1
            spent[1] += time.perf_counter() - wall
            spent[2] += time.process_time() - cpu
            _CALLS[0] += 1
            _TIMELINE.append((began, time.time(), message.metadata.message_type))
            if _CALLS[0] % 10 == 0:
                _dump(Path(str(context.run_config["output-dir"])).expanduser())


def _capture(message: Message, context: Context) -> None:
    """Keep the message and the context it arrived with, for the node ``RADFED_CAPTURE_NODE`` names (if any)."""
    node = os.environ.get("RADFED_CAPTURE_NODE", "")
    if not node or str(context.node_config.get("partition-id", "")) != node:
        return
    folder = Path(str(context.run_config["output-dir"])).expanduser() / f"capture-{node}"
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob("*.pkl")))
    (folder / f"{n:05d}.pkl").write_bytes(pickle.dumps((message, context)))


def _dump(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if os.environ.get("RADFED_SITE_PROFILE", "1") != "0":
        _PROFILER.dump_stats(str(out / f"site-{os.getpid()}.prof"))
    doc = {"spent": _SPENT, "cpu": time.process_time(), "gc": {k: _GC[k] for k in ("seconds", "collections")},
           "timeline": _TIMELINE}
    (out / f"site-{os.getpid()}.json").write_text(json.dumps(doc), encoding="utf-8")


profiled_site = _Profiled()
