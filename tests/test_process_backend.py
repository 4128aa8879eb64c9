"""The demo's ClientApp workers (radfed/process_backend.py): Flower's simulation backend interface served by
processes forked from one that loaded the ClientApp. A reply and the node's context come back as the ClientApp left
them; a ClientApp that raises, or a worker that dies, becomes Flower's ClientAppException (its simulation then replies
with an Error message) and the next message is served; Flower's simulation builds this backend where it would build
its Ray one only inside ``process_backend``; no worker, forkserver or resource tracker outlives it."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import psutil
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.client_app import ClientAppException

from radfed.process_backend import RAY_BACKEND_MODULE, WORKERS_LOG, ProcessBackend, process_backend

TESTS = Path(__file__).resolve().parent
APP = "process_backend_app:app"


def _ask(what: str, node: int = 5) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"what": what})}), dst_node_id=node, message_type="query")


def _context(node: int = 5) -> Context:
    return Context(run_id=1, node_id=node, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def _backend(tmp_path: Path, workers: int, nodes: int = 0) -> ProcessBackend:
    backend = ProcessBackend({}, APP, TESTS, tmp_path / WORKERS_LOG, workers, nodes)
    backend.build(lambda: None)
    return backend


def _forkserver_and_workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if "multiprocessing.forkserver" in " ".join(p.cmdline())]


def _resource_trackers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "multiprocessing.resource_tracker" in " ".join(p.cmdline())]


def test_replies_and_the_node_context_come_back_from_the_worker_processes(tmp_path, server_identity):
    backend = _backend(tmp_path, workers=2)
    try:
        assert backend.num_workers == 2 and backend.is_worker_idle()
        context, pids = _context(), set()
        for expected in (1, 2, 3):
            reply, context = backend.process_message(_ask("answer"), context)
            assert reply.content["config"]["seen"] == expected  # the node's state travelled with each message
            pids.add(reply.content["config"]["pid"])
        assert sys.modules.get("process_backend_app") is None  # loaded in the workers, not here
        assert not pids & {psutil.Process().pid}
    finally:
        backend.terminate()


def test_each_node_s_messages_go_to_one_worker_and_the_nodes_are_dealt_out_in_turn(tmp_path, server_identity):
    """A site is loaded into one worker's run cache, not into each: every message of a node is served by the same
    process; Flower gets one thread per node, so a message waiting for its node's worker holds no other back."""
    backend = _backend(tmp_path, workers=2, nodes=3)
    try:
        assert backend.num_workers == 3
        contexts = {node: _context(node) for node in (11, 12, 13)}
        served: dict[int, set[int]] = {node: set() for node in contexts}
        for _ in range(3):
            for node in contexts:
                reply, contexts[node] = backend.process_message(_ask("answer", node), contexts[node])
                served[node].add(int(reply.content["config"]["pid"]))
        assert all(len(pids) == 1 for pids in served.values())
        assert served[11] == served[13] != served[12]
    finally:
        backend.terminate()


def test_a_raising_clientapp_and_a_dying_worker_become_flower_s_exception_and_the_next_message_is_served(
        tmp_path, server_identity, caplog):
    backend = _backend(tmp_path, workers=1)
    try:
        with pytest.raises(ClientAppException, match="ValueError: hospital-x: a damaged feature table"):
            backend.process_message(_ask("raise"), _context())
        reply, _ = backend.process_message(_ask("answer"), _context())
        first = reply.content["config"]["pid"]
        ended = f"worker process {first} ended (exit code 3) while it handled this message (its output: {tmp_path}"
        with pytest.raises(ClientAppException, match=re.escape(ended)):
            backend.process_message(_ask("die"), _context())
        reply, _ = backend.process_message(_ask("answer"), _context())
        assert reply.content["config"]["pid"] != first and backend.is_worker_idle()
        assert 'raise ValueError("hospital-x: a damaged feature table")' in caplog.text  # the worker's traceback
    finally:
        backend.terminate()


def test_flower_s_simulation_gets_the_process_backend_only_inside_the_block_and_nothing_outlives_it(tmp_path):
    ray_backend_before = sys.modules.get(RAY_BACKEND_MODULE)
    with process_backend(APP, TESTS, tmp_path, workers=2) as built:
        # what flwr/server/superlink/fleet/vce/vce_api.py start_vce runs to make its backend
        made = importlib.import_module(RAY_BACKEND_MODULE).RayBackend({"client_resources": {"num_cpus": 1}})
        assert isinstance(made, ProcessBackend) and built == [made]
        made.build(lambda: None)
        assert len(_forkserver_and_workers()) == 3  # the forkserver and its two workers
        assert len(_resource_trackers()) == 1  # started with the forkserver
    assert sys.modules.get(RAY_BACKEND_MODULE) is ray_backend_before
    assert not _forkserver_and_workers()
    assert not _resource_trackers()  # waited for: a launcher that exits at once leaves none behind either
