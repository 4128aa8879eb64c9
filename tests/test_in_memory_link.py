"""How a run starts and how its messages travel on Flower's own in-memory link state (the simulation's): the
coordinator waits for the sites that join together (``server.federation.wait_for_nodes``), and the in-process
demo's pump hands each message to the sites' workers as soon as the ServerApp's grid stores it
(``radfed.message_pump``). Nodes, runs and messages are Flower's, registered as its simulation registers them.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from queue import Queue

import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.superlink.grid import InMemoryGrid
from link_helpers import new_link, serverapp_identity

from radfed import message_pump
from server.federation import RunRefused, wait_for_nodes

FOREVER = 1e9  # a heartbeat interval: the node stays online for the test


@dataclass
class Link:
    state: InMemoryLinkState
    grid: InMemoryGrid

    def join(self) -> int:
        """A node registering, as Flower's simulation registers each (vce_api._register_nodes)."""
        node = self.state.create_node("aid", "account", secrets.token_bytes(32), heartbeat_interval=FOREVER)
        self.state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=FOREVER)
        return node

    def push(self, *nodes: int) -> list[str]:
        return list(self.grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="query")
                                             for n in nodes]))


@pytest.fixture
def link() -> Iterator[Link]:
    with serverapp_identity():
        yield Link(*new_link())


def later(seconds: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


def test_the_run_waits_for_sites_joining_together_then_goes_on_once_none_joined_for_the_grace(link):
    first = [link.join(), link.join()]
    late = later(0.3, link.join)  # joins while the coordinator looks: it gets in
    started = time.monotonic()
    ids = wait_for_nodes(link.grid, min_nodes=2, timeout=30.0, grace=0.6)
    late.join()
    assert len(ids) == 3 and set(first) < set(ids)
    assert time.monotonic() - started >= 0.3 + 0.6  # the grace counts from the last join, not from the first look


def test_with_every_site_there_at_the_first_look_the_run_goes_on_after_one_grace(link):
    nodes = sorted(link.join() for _ in range(4))  # the simulation registers every node in one go
    assert wait_for_nodes(link.grid, min_nodes=2, timeout=30.0, grace=0.1) == nodes


def test_too_few_sites_by_the_timeout_refuse_the_run_and_enough_sites_still_joining_do_not(link):
    link.join()
    with pytest.raises(RunRefused, match="only 1 site"):
        wait_for_nodes(link.grid, min_nodes=2, timeout=0.3, grace=0.1)
    stop = threading.Event()

    def keep_joining() -> None:  # a new site every 0.1 s, for longer than the timeout: never a quiet grace
        while not stop.is_set():
            link.join()
            time.sleep(0.1)

    joining = threading.Thread(target=keep_joining, daemon=True)
    joining.start()
    try:
        ids = wait_for_nodes(link.grid, min_nodes=2, timeout=0.5, grace=0.3)
    finally:
        stop.set()
        joining.join()
    assert len(ids) >= 2  # at the timeout the run goes on with those there


def sweep(link: Link, nodes: list[int]) -> tuple[Queue, threading.Event, threading.Thread]:
    """The sweep Flower's simulation would run, as radfed.inprocess installs it, on this link."""
    from flwr.server.superlink.fleet.vce import vce_api

    queue: Queue = Queue()
    stop = threading.Event()
    with message_pump.prompt_pump() as installed:
        assert installed  # this Flower's sweep is the one the pump replaces (1.42's signature)
        thread = threading.Thread(target=vce_api.add_messages_to_queue,
                                  args=(link.state, queue, {n: i for i, n in enumerate(nodes)}, stop), daemon=True)
        thread.start()  # Flower starts the sweep's thread the same way, looking the function up then
    return queue, stop, thread


def test_the_pump_hands_over_each_message_when_it_is_stored_not_at_the_next_sweep(link, monkeypatch):
    from flwr.server.superlink.fleet.vce import vce_api

    flowers = vce_api.add_messages_to_queue
    nodes = [link.join(), link.join()]
    monkeypatch.setattr(message_pump, "IDLE_WAIT", 30.0)  # an idle pump sleeps 30 s: only the wake-up brings these
    queue, stop, thread = sweep(link, nodes)
    assert vce_api.add_messages_to_queue is flowers  # Flower's own again outside the pump's block
    time.sleep(0.2)  # the pump has swept the empty link and sleeps
    sent = link.push(nodes[0], nodes[1], nodes[0])  # two messages for one node: both handed over, in order
    got = [queue.get(timeout=5.0) for _ in sent]
    assert sorted(m.metadata.message_id for m in got) == sorted(sent)
    assert [m.metadata.message_id for m in got if m.metadata.dst_node_id == nodes[0]] == [sent[0], sent[2]]
    time.sleep(0.2)
    later_sent = link.push(nodes[1])
    assert queue.get(timeout=5.0).metadata.message_id == later_sent[0]
    assert queue.empty()  # nothing handed over twice
    monkeypatch.setattr(message_pump, "IDLE_WAIT", 0.05)
    stop.set()
    link.push(nodes[0])  # wakes the pump, which sees the stop
    thread.join(timeout=10.0)
    assert not thread.is_alive()
    assert "store_message_ins" not in vars(link.state)  # the link state's own method again


def test_a_flower_whose_sweep_differs_keeps_its_own(monkeypatch, caplog):
    from flwr.server.superlink.fleet.vce import vce_api

    def other(state, queue, nodes_mapping, f_stop, interval):  # e.g. a later Flower with another signature
        raise AssertionError("not called here")

    monkeypatch.setattr(vce_api, "add_messages_to_queue", other)
    with message_pump.prompt_pump() as installed:
        assert not installed and vce_api.add_messages_to_queue is other
    assert "its own is kept" in caplog.text
