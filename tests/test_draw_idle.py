"""The report's figures drawn ahead take the coordinator's GIL only while the folds' coordinator is idle: ``Run.idle``
is clear during the folds' turns, packing and unpacking, set while each round is out and once the folds are over
(server/folds.py), and ``report.draw_ahead`` begins each figure only once it is set. The report stays the same."""

from __future__ import annotations

import json
import threading
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict
from report_helpers import SITES, make_result

from client.steps import run_config
from common import batch
from server import report
from server.audit import AuditLog
from server.federation import Cohort, FeatureAgreement, Federation, Run
from server.folds import FoldJob, run_folds
from server.report_blocks import DRAWN

pytestmark = pytest.mark.usefixtures("server_identity")  # tests/conftest.py
ROOT = Path(__file__).resolve().parent.parent


class Sites:
    """Every site answering every sub-request with an empty reply; notes whether the run was idle at each send."""

    def __init__(self) -> None:
        self.run: Run | None = None
        self.idle_at_send: list[bool] = []

    def send_and_receive(self, messages, *, timeout=None):
        assert self.run is not None
        self.idle_at_send.append(self.run.idle.is_set())
        out = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"batch-{i}"
            if m.metadata.message_type != batch.BATCH:  # the folds one after another: a message each
                out.append(Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=m))
                continue
            out.append(batch.join(m, [Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=s)
                                      for s in batch.split(m)]))
        return out

    def get_node_ids(self):
        return [1, 2]


def _folds(tmp_path: Path, batched: bool, fail: bool, cleared: bool = False) -> tuple[Run, Sites, list[bool]]:
    """Two folds of three queries each (one fails after its second with ``fail``); whether the run was idle at
    every point of the folds' turns."""
    in_turns: list[bool] = []
    fed = Federation({1: "site-a", 2: "site-b"}, min_sites=1)

    def work(fold: str):
        def body(run: Run) -> str:
            cohort = Cohort(fed.subset({"site-a", "site-b"}), FeatureAgreement(["f"], "-", 1.0, {}), fold=fold)
            for i in range(3):
                in_turns.append(run.idle.is_set())
                cohort.ask(run, "probe", "query.probe", {})
                in_turns.append(run.idle.is_set())
                if fail and fold == "b" and i == 1:
                    raise RuntimeError("this fold broke")
            return fold
        return body

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    sites = Sites()
    run = Run(grid=sites, config=run_config({**config, "fold-batching": batched}),  # type: ignore[arg-type]
              audit=AuditLog(tmp_path / "audit.jsonl", Ed25519PrivateKey.generate()), folder=tmp_path,
              profile=None)  # type: ignore[arg-type]
    sites.run = run
    assert run.idle.is_set()  # no folds running: nothing to wait for
    if cleared:
        run.idle.clear()
    try:
        assert run_folds(run, [FoldJob("leave-one-site-out", f, work(f)) for f in ("a", "b")]) == {"a": "a", "b": "b"}
        assert not fail
    except RuntimeError as exc:
        assert fail and "broke" in str(exc)
    return run, sites, in_turns


@pytest.mark.parametrize("fail", [False, True])
def test_the_run_is_idle_only_while_a_round_of_the_folds_is_out(tmp_path, fail):
    run, sites, in_turns = _folds(tmp_path, True, fail)
    assert len(sites.idle_at_send) == 3 and all(sites.idle_at_send)  # the other fold goes on after a failure
    assert in_turns and not any(in_turns)  # every fold's turn: busy
    assert run.idle.is_set()  # the folds are over (a fold's failure too): what waited goes on


def test_folds_one_after_another_leave_the_run_idle(tmp_path):
    run, sites, in_turns = _folds(tmp_path, False, False, cleared=True)  # as the app leaves it for the drawing
    assert all(sites.idle_at_send) and all(in_turns) and run.idle.is_set()


class Gate:
    """Stands for ``Run.idle``: each ``wait`` parks until the test hands out one permit."""

    def __init__(self) -> None:
        self.permits, self.parked = threading.Semaphore(0), threading.Semaphore(0)

    def wait(self, timeout: float | None = None) -> bool:
        self.parked.release()
        return self.permits.acquire()

    def set(self) -> None:  # the join, once the thread has ended here
        pass


def _parked_or_done(gate: Gate, thread: threading.Thread) -> bool:
    """True once the drawing thread waits at the gate again, False once it has ended."""
    while not gate.parked.acquire(timeout=0.05):
        if not thread.is_alive():
            return False
    return True


def test_figures_drawn_ahead_begin_one_at_a_time_only_when_the_run_is_idle(tmp_path):
    root = tmp_path / "demo-data"
    root.mkdir()
    (root / report.DEMO_STAMP).write_text(json.dumps({"seed": 0, "sites": [{"name": n} for n in SITES]}))
    result = make_result(tmp_path, root)
    result.validation = {}  # as before the folds (tests/test_report_ahead.py: the same report either way)
    gate = Gate()
    try:
        ahead = report.draw_ahead(result, gate)  # type: ignore[arg-type]
        assert _parked_or_done(gate, ahead) and not DRAWN  # the coordinator busy: nothing drawn
        gate.permits.release()  # idle: the colours and the sections are made, then the first figure waits
        assert _parked_or_done(gate, ahead) and not DRAWN
        drawn = 0
        while True:
            gate.permits.release()  # idle for one figure
            more = _parked_or_done(gate, ahead)
            drawn += 1
            assert len(DRAWN) == drawn  # exactly one figure per opening
            if not more:
                break
        assert drawn >= 6
        ahead.join()
    finally:
        DRAWN.clear()


def test_joining_the_drawing_opens_its_gate(tmp_path):
    """The outputs join the drawing whatever ended the folds (or kept them from starting, the gate still closed):
    the join lets it draw everything instead of waiting for ever."""
    root = tmp_path / "demo-data"
    root.mkdir()
    (root / report.DEMO_STAMP).write_text(json.dumps({"seed": 0, "sites": [{"name": n} for n in SITES]}))
    result = make_result(tmp_path, root)
    result.validation = {}
    idle = threading.Event()  # as the app clears Run.idle before the folds' first round
    try:
        ahead = report.draw_ahead(result, idle)
        joined = threading.Thread(target=ahead.join, daemon=True)
        joined.start()
        joined.join(120)  # a guard against hanging, not a timing: the join returns once the figures are drawn
        assert not joined.is_alive() and not ahead.is_alive() and idle.is_set() and len(DRAWN) >= 6
    finally:
        DRAWN.clear()
