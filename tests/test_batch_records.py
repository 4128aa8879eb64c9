"""common/batch.py and server/harmonization.py build their Flower records without Flower's per-record rebuilding: the
same records under the same names, every value still a Flower record (an Array in an ArrayRecord), and the pack ->
split -> join -> unpack round trip hands each fold exactly what its site answered."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from common import batch
from common.npy import encode
from server import harmonization

pytestmark = pytest.mark.usefixtures("server_identity")  # tests/conftest.py


def _request(j: int, node_id: int) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{node_id}-{j}", src_node_id=0, dst_node_id=node_id,
                    reply_to_message_id="", group_id=str(j), created_at=0.0, ttl=60.0, message_type="query.newton")
    content = RecordDict({"arrays": ArrayRecord({"coef": Array(np.arange(4.0) + j)}),
                          "config": ConfigRecord({"fold": f"site-{j}", "server-round": 1})})
    return Message(content, metadata=meta)


def _answer(j: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"grad": Array(np.full(4, float(j)))}),
                       "metrics": MetricRecord({"n": 20 + j})})


def test_pack_split_join_unpack_hand_each_fold_its_own_records_without_flowers_setitem(monkeypatch):
    requests = [_request(j, node) for node in (7, 8) for j in range(5)]
    answers = [_answer(j) for j in range(5)]  # the sites' handlers' replies (built with Flower's setitem)
    calls = []
    original = RecordDict.__setitem__
    monkeypatch.setattr(RecordDict, "__setitem__", lambda self, k, v: (calls.append(k), original(self, k, v)))
    batches = batch.pack(requests)
    for b in batches:  # the ids Flower gives them as they are pushed
        b.message.metadata.__dict__["_message_id"] = f"batch-{b.node_id}"
    subs = {b.node_id: batch.split(b.message) for b in batches}
    replies = [batch.join(b.message, [Message(answers[j], reply_to=s) for j, s in enumerate(subs[b.node_id])])
               for b in batches]
    out = batch.unpack_replies(batches, replies)
    # ~11,000 sub-requests per side at 48 sites: none through RecordDict.__setitem__ (a KeyError raised and caught
    # per record); the records are the very objects sent, under the same names
    assert calls == []
    for b in batches:
        assert list(b.message.content.keys())[-1] == batch.INDEX
        for j, (sent, got) in enumerate(zip(b.requests, subs[b.node_id], strict=True)):
            assert got.metadata.message_id == sent.metadata.message_id and got.metadata.group_id == str(j)
            assert list(got.content.keys()) == ["arrays", "config"]
            assert got.content["arrays"] is sent.content["arrays"] and got.content["config"] is sent.content["config"]
            answer = out[sent.metadata.message_id]
            assert not answer.has_error(), answer.error.reason
            assert list(answer.content.keys()) == ["arrays", "metrics"]
            assert answer.content["arrays"]["grad"].numpy().tolist() == [float(j)] * 4
            assert int(answer.content["metrics"]["n"]) == 20 + j


def test_a_value_that_is_not_a_flower_record_is_refused():
    with pytest.raises(TypeError, match="not a Flower record"):
        batch._record_dict([("0/arrays", {"coef": np.zeros(3)})])
    with pytest.raises(batch.BatchError, match="twice"):
        batch._record_dict([("a", ConfigRecord({})), ("a", ConfigRecord({}))])
    with pytest.raises(TypeError):
        harmonization._array_record({"beta": np.zeros(3)})  # type: ignore[dict-item]


def test_the_moments_estimates_record_equals_flowers_and_shares_its_arrays(monkeypatch):
    beta = np.random.default_rng(0).normal(size=(48, 861))[np.r_[3]]
    shared = {"grand-mean": Array(np.arange(861.0)), "var-pooled": Array(np.ones(861))}
    expected = ArrayRecord({"beta": Array(beta), **shared})  # what the moments request held before
    rebuilt = []
    monkeypatch.setattr(ArrayRecord, "from_array_dict", classmethod(lambda cls, *a, **k: rebuilt.append(a)))
    record = harmonization._array_record({"beta": encode(beta), **shared})
    assert rebuilt == []  # Flower's constructor rebuilds each Array attribute by attribute (2,256 records per round)
    assert record == expected and list(record.keys()) == list(expected.keys())
    assert all(record[k].data == expected[k].data and record[k].shape == expected[k].shape for k in expected)
    assert record["grand-mean"] is shared["grand-mean"]
