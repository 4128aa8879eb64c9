"""radfed's coordinator under cProfile in every thread it runs (bench/bench_loso.py ``--profile-server``).

Copied as ``losoapp.py`` into a scratch app folder beside radfed's code (bench.bench_messages.make_app). cProfile
sees only the thread it was enabled in, and under ``fold-batching`` each fold runs in a thread of its own: every
thread started during the run gets its own profiler (``threading.Thread.run`` wrapped). Writes
``<output-dir>/server-main.prof`` (the ServerApp's thread: the folds' coordinator packing, sending, unpacking) and
``<output-dir>/server-thread-<i>.prof`` as each other thread ends (the folds' own work, and Flower's threads; merged
by the bench: the launcher stops the run's processes once its end is logged, and at 48 sites merging them at the
end left no file).
"""

from __future__ import annotations

import cProfile
import threading
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.app import main as radfed_main

profiled = ServerApp()
_THREADS = [0]  # thread profiles written
_OUT: list[Path] = []  # the run's output folder
_LOCK = threading.Lock()


def _profiled_run(run):  # type: ignore[no-untyped-def]
    def wrapped(self: threading.Thread) -> None:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            run(self)
        finally:
            profiler.disable()
            if profiler.getstats() and _OUT:  # on disk as the thread ends: the launcher stops the run's processes
                # once the run logs its end, before a ServerApp's last lines could write 48 fold threads' profiles
                with _LOCK:
                    _THREADS[0] += 1
                    name = f"server-thread-{_THREADS[0]}.prof"
                profiler.dump_stats(str(_OUT[0] / name))

    return wrapped


@profiled.main()
def profiled_main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["output-dir"])).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _OUT[:] = [out]
    original = threading.Thread.run
    threading.Thread.run = _profiled_run(original)  # type: ignore[method-assign]
    main = cProfile.Profile()
    main.enable()
    try:
        radfed_main(grid, context)
    finally:
        main.disable()
        threading.Thread.run = original  # type: ignore[method-assign]
        main.dump_stats(str(out / "server-main.prof"))
