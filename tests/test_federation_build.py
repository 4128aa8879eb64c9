"""server.federation.build: the messages it builds are the ones Flower's own constructors build (each node's
config the shared one with its own values over it, the node's other records as given), its shared values checked
once per call rather than once per node (the folds' turns build 2,256 messages per round at 48 sites)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from server import federation

CONFIG = {"features": [f"original_f{i}" for i in range(50)], "n-sites": 3, "fold": "site-b"}


pytestmark = pytest.mark.usefixtures("server_identity")  # tests/conftest.py


def _own(nid: int) -> RecordDict:
    config = ConfigRecord({"site-index": nid, "n-sites": 99}) if nid % 2 else None  # odd nodes override a value
    content = RecordDict({"arrays": ArrayRecord({"beta": Array(np.arange(3.0) + nid)})})
    if config is not None:
        content["config"] = config
    return content


def test_messages_are_flowers_own():
    ids = [11, 4, 9]
    built = federation.build(ids, "query.moments", CONFIG, _own)
    for nid, m in zip(ids, built, strict=True):
        own = _own(nid)
        expected = Message(RecordDict({"arrays": own["arrays"],
                                       "config": ConfigRecord({**CONFIG, **dict(own.get("config") or {})})}),
                           dst_node_id=nid, message_type="query.moments")
        meta, want = m.metadata, expected.metadata
        for field in ("run_id", "message_id", "src_node_id", "dst_node_id", "src_task_id", "dst_task_id",
                      "reply_to_message_id", "group_id", "ttl", "message_type", "delivered_at"):
            assert getattr(meta, field) == getattr(want, field), field
        assert abs(meta.created_at - want.created_at) < 60
        assert dict(m.content["config"]) == dict(expected.content["config"])
        assert list(m.content.keys()) == ["arrays", "config"]
        assert np.array_equal(m.content["arrays"]["beta"].numpy(), np.arange(3.0) + nid)
        assert not m.has_error()
    # every message its own metadata and config: the folds' grid sets each message's id on its own
    assert len({id(m.metadata) for m in built}) == len({id(m.content["config"]) for m in built}) == len(ids)
    built[1].metadata.__dict__["_message_id"] = "abc"
    assert built[0].metadata.message_id == built[2].metadata.message_id == ""


def test_one_record_handed_to_every_node():
    shared_own = RecordDict({"config": ConfigRecord({"extra": 1})})
    built = federation.build([1, 2], "query.x", {"a": 2}, lambda nid: shared_own)
    assert [dict(m.content["config"]) for m in built] == [{"a": 2, "extra": 1}] * 2
