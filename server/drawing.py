"""The report's figures drawn ahead, in a child process at the lowest CPU priority (SCHED_IDLE, nice 19), while
the run's last rounds go on, and beside the outputs, which draw the rest from the other end (``Ahead.share``); the
outputs take each one whose plot, data, colours and options are the same, byte for byte
(``report_blocks.figure_key``), so the report is the same as drawn at the end.

Why a process, not a thread of the ServerApp: drawing (matplotlib, ~2.5 s of CPU for the demo's report) took the
coordinator's GIL and a core from the sites while the folds ran (48 sites: leave-one-site-out's folds 15.3 s with the
drawing thread, 12.5 s without it). A child at the lowest priority holds no lock of the coordinator's and runs only
on a core the sites and the coordinator leave free (the folds' coordinator turns use one; the waits between rounds).

``python -m server.drawing`` is the child, started with the run (it warms up meanwhile): the metrics document in
(pickled, on stdin, once the results so far are known), each (figure key, PNG) out as it is drawn (pickled, on
stdout). It reads only what the parent hands it and writes nothing else. The outputs draw what has not arrived,
from the last figure back, take what arrives meanwhile, then stop a child still drawing: at the lowest priority it
may not run at all on a busy machine, and they never wait for it (they draw the rest at normal priority, as without
it). The demo's outputs drew 6 of its 9 figures at the end (0.76 s) before the child went on beside them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("flwr.radfed.server")

NICE = 19  # the lowest priority: the sites and the coordinator first


def draw_each(doc: dict[str, Any]) -> Iterator[tuple[bytes, bytes]]:
    """(key, PNG) of every figure the metrics document ``doc`` gives, one at a time: a section the document cannot
    build yet is skipped (drawn at the end if it is there then), as is a figure that cannot be drawn (explained at
    the end)."""
    from server import plots
    from server.report_blocks import keyed_figures
    from server.report_sections import SECTIONS, all_site_names

    colours = plots.site_colours(all_site_names(doc))
    drawn: set[bytes] = set()
    for _sid, _title, build in SECTIONS:
        try:
            blocks = build(doc).blocks
        except Exception:  # noqa: BLE001  # a section the results so far cannot build yet
            continue
        for key, b in keyed_figures(blocks, colours):
            if key in drawn:
                continue
            drawn.add(key)
            try:
                png = b.plot(*b.args, colours, **b.options)
            except ValueError:
                continue
            yield key, png


class Ahead(threading.Thread):
    """Runs the child from the run's start, so that its imports and matplotlib's first figure (fonts: ~0.3 s of the
    first) are done, at the lowest priority, before there is anything to draw; ``hand`` gives it the document
    (``report.draw_ahead``). Collects its figures as each arrives (``drawn``), with its ``priority``. The outputs
    ``take`` them: a child still drawing (or still waiting for a document) then is stopped (at the lowest priority
    it may wait for ever on a busy machine), and the outputs draw the rest themselves, as they do for any figure a
    failed child did not send."""

    def __init__(self) -> None:
        super().__init__(name="radfed-draw-ahead", daemon=True)
        self._doc: bytes | None = None
        self._handed = threading.Event()  # set by hand, or by take (then with no document: nothing is drawn)
        self.drawn: dict[bytes, bytes] = {}
        self.priority: tuple[int, int | None] | None = None  # the child's (nice, scheduling policy)
        self._child: subprocess.Popen | None = None
        self._taken = False  # the outputs took the figures: no child is started after that
        self._lock = threading.Lock()

    def hand(self, doc: dict[str, Any]) -> None:
        """The metrics document to draw from (the run's results so far), once; ignored after ``take``."""
        with self._lock:
            if not self._taken and self._doc is None:
                self._doc = pickle.dumps(doc, protocol=pickle.HIGHEST_PROTOCOL)
                self._handed.set()

    @property
    def pid(self) -> int | None:
        """The child's pid, once started."""
        return None if self._child is None else self._child.pid

    def run(self) -> None:
        # the child imports this app's packages from where this process found them (Flower's app folder in a run)
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
               "MPLBACKEND": "Agg"}
        try:
            with self._lock:
                if self._taken:
                    return
                self._child = subprocess.Popen([sys.executable, "-m", "server.drawing"], stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=root)
            child = self._child
            _lowest_priority(child.pid)
            with child:
                self._handed.wait()
                if self._doc is None:  # taken before any document: the child is stopped
                    return
                child.stdin.write(self._doc)  # type: ignore[union-attr]
                child.stdin.close()  # type: ignore[union-attr]
                self.priority = pickle.load(child.stdout)  # type: ignore[arg-type]  # noqa: S301  # our own child
                while True:
                    try:
                        key, png = pickle.load(child.stdout)  # type: ignore[arg-type]  # noqa: S301
                    except EOFError:
                        break
                    self.drawn[key] = png
        except Exception as exc:  # noqa: BLE001  # drawing ahead is only a head start: the outputs draw everything
            log.debug("report figures not drawn ahead: %s: %s", type(exc).__name__, exc)

    def share(self, figures: Sequence[tuple[bytes, Callable[[], bytes]]]) -> dict[bytes, bytes]:
        """The outputs' figures (key, drawing function, in the report's order), drawn here from the last one back
        while the child, if it is still drawing, goes on from the first, on the core the sites have left: each it
        sent before this process got to it is taken, the others drawn here (the two meet in the middle; at most the
        figure they both reached is drawn twice). Never waits for the child: one that gets no CPU leaves all of
        them to this process. Then ``take``. A figure that cannot be drawn is left out (the report explains it)."""
        mine: dict[bytes, bytes] = {}
        for key, plot in reversed(figures):
            if key in self.drawn:
                continue
            try:
                mine[key] = plot()
            except Exception:  # noqa: BLE001  # drawn again by the report, which says what broke
                continue
        return {**self.take(), **mine}

    def take(self) -> dict[bytes, bytes]:
        """The figures drawn so far; the child, if still drawing, is stopped first (by its pid) and waited for."""
        with self._lock:
            self._taken = True
            if self._child is not None and self._child.poll() is None:
                with contextlib.suppress(OSError):
                    self._child.kill()
            self._handed.set()
        if self.is_alive() or self.ident is not None:
            self.join()
        return dict(self.drawn)


def _lowest_priority(pid: int) -> None:
    """Nice 19 and, on Linux, SCHED_IDLE: Ray runs the simulated sites at nice 15, against which nice 19 alone still
    takes 15 / (15 + 36) of a shared core; SCHED_IDLE runs only where nothing else is runnable. The child starts at
    ours for a few ms: its imports run at the lowest priority too."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, NICE)
    if hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))


def warm() -> None:
    """What every figure needs before the first is drawn: the plots' imports, matplotlib's Agg canvas and its fonts
    (loaded when a first text is drawn)."""
    from server import plots

    plots.roc_png({"warm": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]}}, "warm")


def main() -> None:
    """The child: warmed up first (``warm``), then the document from stdin (it waits for it); to stdout, the priority
    it draws at, then each figure as it is drawn. A parent that stops before sending one closes the pipe: it ends."""
    with contextlib.suppress(Exception):  # only a head start: whatever fails here fails again below, or in the outputs
        warm()
    try:
        doc = pickle.load(sys.stdin.buffer)  # noqa: S301  # from the parent, through a pipe
    except EOFError:
        return
    out = sys.stdout.buffer
    policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
    pickle.dump((os.getpriority(os.PRIO_PROCESS, 0), policy), out)
    out.flush()
    for item in draw_each(doc):
        pickle.dump(item, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()  # each figure is the parent's as soon as it is drawn: the outputs may stop the child any time


if __name__ == "__main__":
    main()
