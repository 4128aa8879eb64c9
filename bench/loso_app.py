"""radfed's coordinator under cProfile in every thread it runs (bench/bench_loso.py ``--profile-server``).

Copied as ``losoapp.py`` into a scratch app folder beside radfed's code (bench.bench_messages.make_app). cProfile
sees only the thread it was enabled in, and under ``fold-batching`` each fold runs in a thread of its own: every
thread started during the run gets its own profiler (``threading.Thread.run`` wrapped), merged at the end. Writes
``<output-dir>/server-main.prof`` (the ServerApp's thread: the folds' coordinator packing, sending, unpacking) and
``<output-dir>/server-threads.prof`` (every other thread: the folds' own work, and Flower's threads).
"""

from __future__ import annotations

import cProfile
import pstats
import threading
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.app import main as radfed_main

profiled = ServerApp()
_THREADS: list[cProfile.Profile] = []


def _profiled_run(run):  # type: ignore[no-untyped-def]
    def wrapped(self: threading.Thread) -> None:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            run(self)
        finally:
            profiler.disable()
            _THREADS.append(profiler)

    return wrapped


@profiled.main()
def profiled_main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["output-dir"])).expanduser()
    original = threading.Thread.run
    threading.Thread.run = _profiled_run(original)  # type: ignore[method-assign]
    main = cProfile.Profile()
    main.enable()
    try:
        radfed_main(grid, context)
    finally:
        main.disable()
        threading.Thread.run = original  # type: ignore[method-assign]
        out.mkdir(parents=True, exist_ok=True)
        main.dump_stats(str(out / "server-main.prof"))
        recorded = [p for p in _THREADS if p.getstats()]  # pstats refuses a profiler that saw no call
        if recorded:
            pstats.Stats(*recorded).dump_stats(str(out / "server-threads.prof"))
