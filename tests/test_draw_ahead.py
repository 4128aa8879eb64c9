"""The report's figures drawn ahead run in a child process at the lowest CPU priority (``server.drawing``): it draws
the same PNGs this process would; the outputs never wait for it (a child still drawing when they are written is
stopped, by its pid), and when it cannot run they draw everything themselves (tests/test_report_ahead.py: the report
is the same either way)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from report_helpers import SITES, make_result

from server import drawing, report
from server.report_blocks import DRAWN


@pytest.fixture
def result(tmp_path: Path):
    root = tmp_path / "demo-data"
    root.mkdir()
    (root / report.DEMO_STAMP).write_text(json.dumps({"seed": 0, "sites": [{"name": n} for n in SITES]}))
    folder = tmp_path / "run"
    folder.mkdir()
    return make_result(folder, root)


def test_the_child_draws_at_the_lowest_priority_what_this_process_would_draw(result):
    ahead = report.draw_ahead(result)
    ahead.join()
    assert ahead.pid is not None and ahead.pid != os.getpid()
    assert ahead.priority == (max(drawing.NICE, os.getpriority(os.PRIO_PROCESS, 0)), os.SCHED_IDLE)
    with pytest.raises(ProcessLookupError):  # waited for: nothing of it is left running
        os.kill(ahead.pid, 0)
    here = dict(drawing.draw_each(json.loads(json.dumps(result.as_json()))))
    assert len(here) >= 6 and ahead.drawn == here  # the same keys, the same PNG bytes


def test_a_child_that_cannot_start_leaves_the_drawing_to_the_outputs(result, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(Path(result.folder) / "no-such-python"))
    ahead = report.draw_ahead(result)
    ahead.join()
    assert ahead.drawn == {} and ahead.priority is None
    report.write_outputs(result, ahead)
    html = (Path(result.folder) / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 6 and not DRAWN


def test_the_outputs_stop_a_child_still_drawing_and_draw_the_rest(result):
    """A child that gets no CPU (SCHED_IDLE on a busy machine), here one held stopped: the outputs do not wait."""
    ahead = report.draw_ahead(result)
    while ahead.pid is None and ahead.is_alive():
        ahead.join(0.01)
    pid = ahead.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    report.write_outputs(result, ahead)
    assert not ahead.is_alive() and ahead._child is not None and ahead._child.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):  # stopped and waited for
        os.kill(pid, 0)
    html = (Path(result.folder) / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 6 and not DRAWN


def test_a_child_started_before_the_results_warms_up_then_draws_what_it_is_handed(result):
    """The ServerApp starts the child at the run's start (it warms up meanwhile) and hands it the document later."""
    ahead = drawing.Ahead()
    ahead.start()
    while ahead.pid is None and ahead.is_alive():
        ahead.join(0.01)
    assert ahead.pid is not None and ahead.priority is None  # waiting for its document
    report.draw_ahead(result, ahead)
    ahead.join()
    here = dict(drawing.draw_each(json.loads(json.dumps(result.as_json()))))
    assert len(here) >= 6 and ahead.drawn == here


def test_a_child_never_handed_a_document_is_stopped_by_the_outputs(result):
    """A run refused before its folds: the child waited for a document that never came; the outputs stop it."""
    ahead = drawing.Ahead()
    ahead.start()
    while ahead.pid is None and ahead.is_alive():
        ahead.join(0.01)
    pid = ahead.pid
    report.write_outputs(result, ahead)
    assert not ahead.is_alive() and ahead.drawn == {}
    with pytest.raises(ProcessLookupError):  # stopped and waited for
        os.kill(pid, 0)
    html = (Path(result.folder) / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 6 and not DRAWN


def test_the_outputs_draw_from_the_last_figure_back_and_take_what_the_child_sends_meanwhile():
    """``Ahead.share``: the outputs draw the figures the child has not sent, from the last back, while it goes on from
    the first; each it sends before they reach it is taken, not drawn again; one that fails is left to the report."""
    ahead = drawing.Ahead()  # its child's figures arrive in ``drawn``, as the reading thread puts them
    ahead.drawn[b"k0"] = b"child-0"  # sent before the outputs began
    drawn_here: list[int] = []

    def plot(i: int) -> bytes:
        drawn_here.append(i)
        if i == 3:
            raise ValueError("no points")
        ahead.drawn[f"k{6 - i}".encode()] = f"child-{6 - i}".encode()  # the child's next, meanwhile
        return f"here-{i}".encode()

    got = ahead.share([(f"k{i}".encode(), lambda i=i: plot(i)) for i in range(7)])
    assert drawn_here == [6, 5, 4, 3]  # 6 sends 0 (had), 5 sends 1, 4 sends 2, 3 fails (sends nothing): 2, 1 taken
    assert got == {b"k0": b"child-0", b"k1": b"child-1", b"k2": b"child-2", b"k4": b"here-4", b"k5": b"here-5",
                   b"k6": b"here-6"}
