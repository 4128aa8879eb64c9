"""radfed's site (ClientApp) under cProfile inside the simulation (bench/bench_loso.py ``--profile-sites``).

Copied as ``lososites.py`` into a scratch app folder beside radfed's code (bench.bench_messages.make_app). Every call
of radfed's ClientApp (every message and ``query.batch``, all mods included) runs under one profiler per Ray worker
process; each worker writes ``<output-dir>/site-<pid>.prof`` and ``site-<pid>.json`` (per message type: calls, wall
and CPU seconds inside the ClientApp, and the process's CPU in all) every 10 calls, so the last state is on disk when
Flower stops the workers. In-process profiling of one site (``--profile``) misses what the simulation does: one worker
serving every site, its caches shared between them.
"""

from __future__ import annotations

import cProfile
import json
import os
import time
from pathlib import Path

from flwr.app import Context, Message

from client.app import app as radfed

_PROFILER = cProfile.Profile()
_SPENT: dict[str, list[float]] = {}  # message type -> [calls, wall s, CPU s] inside the ClientApp
_CALLS = [0]


class _Profiled(type(radfed)):  # type: ignore[misc]  # Flower's loader wants a ClientApp
    def __init__(self) -> None:
        self.__dict__.update(radfed.__dict__)
        self._where = "lososites:profiled_site"  # shipped by reference (client.appref): to this app, not radfed's

    def __call__(self, message: Message, context: Context) -> Message:
        wall, cpu = time.perf_counter(), time.process_time()
        _PROFILER.enable()
        try:
            return radfed(message, context)
        finally:
            _PROFILER.disable()
            spent = _SPENT.setdefault(message.metadata.message_type, [0, 0.0, 0.0])
            spent[0] += 1
            spent[1] += time.perf_counter() - wall
            spent[2] += time.process_time() - cpu
            _CALLS[0] += 1
            if _CALLS[0] % 10 == 0:
                _dump(Path(str(context.run_config["output-dir"])).expanduser())


def _dump(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _PROFILER.dump_stats(str(out / f"site-{os.getpid()}.prof"))
    (out / f"site-{os.getpid()}.json").write_text(json.dumps({"spent": _SPENT, "cpu": time.process_time()}),
                                                  encoding="utf-8")


profiled_site = _Profiled()
