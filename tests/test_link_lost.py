"""Errors Flower's SuperLink writes in a site's place reach the right site, and every site's at once stops the run.

A SuperNode that sends no heartbeat for 2 x its interval is offline: Flower's link state then answers each message
to it with a "Node Unavailable" error whose sender is the SuperLink (node id 1), not the site. These tests run the
coordinator's real grid stack (``PackingGrid`` over ``PollingGrid`` over Flower's ``InMemoryGrid``) on Flower's own
in-memory link state, with nodes whose heartbeat interval is 50 ms: they go offline by Flower's rule, not ours.
A site that is online is served by a thread that answers every message as a ClientApp would.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from link_helpers import SUPERLINK, new_link, serverapp_identity

from server import merging
from server.federation import Federation, LinkLost, build, replies_of
from server.polling import PollingGrid
from server.strategy import AuditedFedAvg

ONLINE, OFFLINE = 1e9, 0.05  # heartbeat intervals (s): an offline node's last heartbeat expires after 2 x 50 ms


class Log:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict]] = []

    def append(self, event: str, **data: object) -> None:
        self.entries.append((event, data))


@dataclass
class Link:
    """Flower's in-memory SuperLink state, its grid as the coordinator wraps it, and the sites by name."""

    grid: merging.PackingGrid
    sites: dict[str, int]
    stop: threading.Event = field(default_factory=threading.Event)

    def federation(self, *names: str, min_sites: int = 1) -> Federation:
        return Federation({self.sites[n]: n for n in names}, min_sites=min_sites)


@pytest.fixture
def link_of() -> Iterator:
    links: list[Link] = []

    def make(**heartbeats: float) -> Link:
        state, grid = new_link()
        sites = {}
        for name, interval in heartbeats.items():
            sites[name] = state.create_node("aid", "account", secrets.token_bytes(32), heartbeat_interval=interval)
            state.acknowledge_node_heartbeat(node_id=sites[name], heartbeat_interval=interval)
        link = Link(merging.PackingGrid(PollingGrid(grid)), sites)  # type: ignore[arg-type]

        def serve(node_id: int) -> None:  # a ClientApp answering every message at once
            while not link.stop.is_set():
                for m in state.get_message_ins(node_id=node_id, limit=1):
                    content = RecordDict({"metrics": MetricRecord({"num-examples": 4, "train-loss": 0.5})})
                    if m.metadata.message_type == "train":
                        content["arrays"] = m.content["arrays"]
                    reply = Message(content, reply_to=m)
                    reply.metadata.__dict__["_message_id"] = reply.object_id
                    state.store_message_res(reply)
                time.sleep(0.005)

        for name, interval in heartbeats.items():
            if interval == ONLINE:
                threading.Thread(target=serve, args=(sites[name],), daemon=True).start()
        time.sleep(3 * OFFLINE)  # the offline nodes' heartbeats have expired
        links.append(link)
        return link

    with serverapp_identity():
        yield make
    for link in links:
        link.stop.set()


def ask(link: Link, fed: Federation) -> dict[int, Message]:
    """One query to every site of ``fed`` through the coordinator's exchange, as ``Cohort.ask`` sends it."""
    messages = build(list(fed.sites), "query.features", {"q": 1})
    return merging.exchange(link.grid, messages, 10.0, [], None)


def test_a_superlink_made_error_is_the_site_s_own_and_names_why(link_of):
    link = link_of(a=ONLINE, b=OFFLINE, c=ONLINE)
    fed, log = link.federation("a", "b", "c", min_sites=2), Log()
    started = time.monotonic()
    replies = ask(link, fed)
    assert time.monotonic() - started < 5.0  # the error came back at once, not after the query's timeout
    assert set(replies) == set(link.sites.values())  # found by the message it answers, not by its sender (1)
    assert replies[link.sites["b"]].metadata.src_node_id == SUPERLINK
    assert replies[link.sites["b"]].error.code == ErrorCode.NODE_UNAVAILABLE
    good = replies_of(fed, log, "features", replies)  # type: ignore[arg-type]
    assert sorted(good) == sorted([link.sites["a"], link.sites["c"]])
    [(event, data)] = log.entries
    assert event == "dropout" and data["site"] == "b" and data["reason"].startswith("the site went offline"), data


def test_every_site_offline_at_once_stops_the_run_naming_the_superlink(link_of):
    link = link_of(a=OFFLINE, b=OFFLINE, c=OFFLINE)
    fed, log = link.federation("a", "b", "c", min_sites=2), Log()
    with pytest.raises(LinkLost, match="SuperLink stopped or restarted, or the network") as caught:
        replies_of(fed, log, "correlation", ask(link, fed))  # type: ignore[arg-type]
    assert "the correlation phase" in str(caught.value) and "went offline" in str(caught.value)
    assert log.entries == [] and sorted(fed.sites.values()) == ["a", "b", "c"]  # no site is said to have left


def test_one_site_offline_alone_is_dropped_as_any_failing_site(link_of):
    link = link_of(a=OFFLINE)
    fed, log = link.federation("a"), Log()
    assert replies_of(fed, log, "features", ask(link, fed)) == {}  # type: ignore[arg-type]
    assert [e for e, _ in log.entries] == ["dropout"] and fed.sites == {}


def train_round(link: Link, fed: Federation, log: Log) -> tuple[AuditedFedAvg, list[Message]]:
    """FedAvg's first training round sent to ``fed``'s sites: the strategy and the replies it is to aggregate."""
    strategy = AuditedFedAvg(fed, log, evaluate_rounds=False)  # type: ignore[arg-type]
    messages = list(strategy.configure_train(1, ArrayRecord([np.zeros(3)]), ConfigRecord(), link.grid))  # type: ignore[arg-type]
    return strategy, list(link.grid.send_and_receive(messages, timeout=10.0))


def test_a_training_round_with_every_site_offline_stops_the_run(link_of):
    link = link_of(a=OFFLINE, b=OFFLINE)
    fed, log = link.federation("a", "b", min_sites=1), Log()
    strategy, replies = train_round(link, fed, log)
    with pytest.raises(LinkLost, match="round 1 \\(train\\)"):
        strategy.aggregate_train(1, replies)
    assert log.entries == []


def test_a_training_round_drops_the_offline_site_and_keeps_the_other(link_of):
    link = link_of(a=ONLINE, b=OFFLINE)
    fed, log = link.federation("a", "b", min_sites=1), Log()
    strategy, replies = train_round(link, fed, log)
    strategy.aggregate_train(1, replies)
    assert fed.sites == {link.sites["a"]: "a"}
    assert [(e, d["site"]) for e, d in log.entries if e == "dropout"] == [("dropout", "b")]


def test_replies_are_not_matched_to_requests_a_grid_did_not_stamp(server_identity):
    """A grid that pushed requests without message ids of their own (not Flower's) would give every site the same
    reply: refused, not guessed."""
    requests = build([3, 4], "query.features", {"q": 1})
    replies = [Message(RecordDict(), reply_to=m) for m in requests]
    with pytest.raises(RuntimeError, match="without a message id"):
        merging.by_site(requests, replies)
    for i, m in enumerate(requests):
        m.metadata.__dict__["_message_id"] = f"id-{i}"
    assert sorted(merging.by_site(requests, [Message(RecordDict(), reply_to=m) for m in requests])) == [3, 4]
