"""The folds' queries travel as ``merging.Request`` (server/federation.py ``build`` on a fold's grid) and come back
as ``merging.Reply`` (server/folds.py ``_unpack``): no Flower ``Message`` per request and per reply (2,256 of each
per round at 48 sites), while the batch on the wire and what each fold reads are what Flower Messages gave."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from common import batch
from server import folds
from server.federation import Federation, build, replies_of
from server.merging import Reply, Request

pytestmark = pytest.mark.usefixtures("server_identity")  # tests/conftest.py

NODES = [7, 8, 9]


def _per_node(nid: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"coef": Array(np.arange(3.0) + nid)}),
                       "config": ConfigRecord({"site-index": nid})})


def _answer(sub: Message) -> Message:
    """A site's sub-reply: the node 8 fold's second request fails there, in its own words."""
    nid, fold = sub.metadata.dst_node_id, str(sub.content["config"]["fold"])
    if nid == 8 and fold == "b":
        return Message(Error(int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION), "site-8 refused: too few cases"), reply_to=sub)
    return Message(RecordDict({"arrays": ArrayRecord({"grad": Array(np.full(2, float(nid)))}),
                               "metrics": MetricRecord({"n": nid, "fold": len(fold)})}), reply_to=sub)


def _round_trip(requests: list, lose: int | None = None, fail: int | None = None) -> tuple[list[batch.Batch], list]:
    for i, m in enumerate(requests):  # the fold grid's ids
        if isinstance(m, Request):
            m.metadata.message_id = f"r{i}"
        else:
            m.metadata.__dict__["_message_id"] = f"r{i}"
    batches = batch.pack(requests)
    replies = []
    for b in batches:
        b.message.metadata.__dict__["_message_id"] = f"batch-{b.node_id}"
        if b.node_id == lose:
            continue
        if b.node_id == fail:
            replies.append(Message(Error(int(ErrorCode.NODE_UNAVAILABLE), "node went offline"), reply_to=b.message))
            continue
        subs = batch.split(b.message)
        replies.append(batch.join(b.message, [_answer(s) for s in subs]))
    return batches, replies


def _requests(packed: bool) -> list:
    out = []
    for fold in ("a", "b"):
        out += build(NODES, "query.newton", {"fold": fold, "features": ["f1", "f2"], "server-round": 2}, _per_node,
                     packed)
    return out


def test_packed_requests_make_the_same_batches_as_messages():
    light, heavy = _requests(True), _requests(False)
    assert all(isinstance(m, Request) for m in light) and all(isinstance(m, Message) for m in heavy)
    light_batches, _ = _round_trip(light)
    heavy_batches, _ = _round_trip(heavy)
    for lb, hb in zip(light_batches, heavy_batches, strict=True):
        assert lb.node_id == hb.node_id and lb.message.metadata.message_type == batch.BATCH
        assert list(lb.message.content.keys()) == list(hb.message.content.keys())
        for name, record in hb.message.content.items():
            if isinstance(record, ArrayRecord):
                assert {k: a.data for k, a in lb.message.content[name].items()} == {k: a.data for k, a in
                                                                                     record.items()}
            else:
                assert dict(lb.message.content[name].items()) == dict(record.items()), name


@pytest.mark.parametrize("lose, fail", [(None, None), (9, None), (None, 9)])
def test_each_fold_reads_from_a_reply_what_a_flower_message_gave(monkeypatch, lose, fail):
    light, heavy = _requests(True), _requests(False)
    light_batches, light_replies = _round_trip(light, lose, fail)
    heavy_batches, heavy_replies = _round_trip(heavy, lose, fail)
    built = []
    original = Message.__init__
    monkeypatch.setattr(Message, "__init__", lambda self, *a, **k: (built.append(1), original(self, *a, **k))[1])
    got = folds._unpack(light_batches, light_replies)
    assert built == []  # no Flower Message per sub-reply
    monkeypatch.setattr(Message, "__init__", original)
    expected = batch.unpack_replies(heavy_batches, heavy_replies)
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        have = got[key]
        assert isinstance(have, Reply)
        assert have.has_error() == want.has_error()
        assert have.metadata.src_node_id == want.metadata.src_node_id
        assert have.metadata.reply_to_message_id == want.metadata.reply_to_message_id == key
        if want.has_error():
            assert (have.error.code, have.error.reason) == (want.error.code, want.error.reason)
            continue
        assert list(have.content.keys()) == list(want.content.keys())
        assert have.content["arrays"]["grad"].data == want.content["arrays"]["grad"].data
        assert dict(have.content["metrics"].items()) == dict(want.content["metrics"].items())


def test_a_flower_message_among_the_requests_gets_a_flower_message_back():
    requests = _requests(True)[:3] + [Message(_per_node(8), dst_node_id=8, message_type="train")]
    requests[-1].content["config"]["fold"] = "c"
    batches, replies = _round_trip(requests)
    got = folds._unpack(batches, replies)
    assert [type(got[f"r{i}"]) for i in range(4)] == [Reply, Reply, Reply, Message]
    assert got["r3"].metadata.src_node_id == 8 and not got["r3"].has_error()


def test_the_phases_read_replies_and_drop_the_failed_site_as_with_messages():
    class Log:
        def __init__(self):
            self.entries = []

        def append(self, event, **data):
            self.entries.append((event, data))

    light = _requests(True)
    batches, replies = _round_trip(light)
    got = folds._unpack(batches, replies)
    fold_b = {m.metadata.dst_node_id: got[m.metadata.message_id] for m in light[3:]}
    fed = Federation({7: "site-7", 8: "site-8", 9: "site-9"}, min_sites=1)
    log = Log()
    good = replies_of(fed, log, "newton", fold_b)  # type: ignore[arg-type]
    assert sorted(good) == [7, 9] and "site-8" not in fed.sites.values()
    assert log.entries == [("dropout", {"site": "site-8", "phase": "newton", "round": None,
                                        "reason": "site-8 refused: too few cases"})]
