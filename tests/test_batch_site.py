"""A site answering ``query.batch`` (several folds' requests in one message): every sub-request goes through the
same handler and the same mods (approval, DP, privacy guard, release ledger, outbox) as when sent alone, and a
sub-reply that breaks a rule is refused on its own, through the real guard (issue 20)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from client import ledger
from client.batch import BatchingClientApp
from client.guard import privacy_guard, redact_local_paths
from common import batch, protocol
from common.canon import sha256_json
from radfed import synth
from radfed.cli import approve_demo_plan
from radfed.launch import app_run_config

K = 5


pytestmark = pytest.mark.usefixtures("server_identity")  # tests/conftest.py


def _request(message_type: str, content: RecordDict, message_id: str, node_id: int = 7) -> Message:
    """A request as the server's fold grid hands it over: its own id, before packing."""
    meta = Metadata(run_id=1, message_id=message_id, src_node_id=0, dst_node_id=node_id, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content, metadata=meta)


def _as_received(sent: Message, message_id: str) -> Message:
    """The batch as the site's runtime hands it to the ClientApp (the SuperLink gives it an id)."""
    meta = sent.metadata
    return Message(sent.content, metadata=Metadata(
        run_id=1, message_id=message_id, src_node_id=0, dst_node_id=meta.dst_node_id, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=3600.0, message_type=meta.message_type))


def _outbox(site: Path) -> list[dict]:
    path = site / ".radfed" / "outbox.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_a_batch_sub_reply_that_breaks_k_is_refused_alone_through_the_real_guard(tmp_path):
    """Two folds in one batch: one reply over 6 + 6 cases, one over 3 + 3 (fewer than k = 5). The guard refuses
    the second only (its error goes back as that fold's sub-reply); the first leaves, and the outbox and the
    release ledger hold exactly the first."""
    app = BatchingClientApp(mods=[redact_local_paths, privacy_guard])

    @app.query("moments")
    def moments(msg: Message, context: Context) -> Message:
        n = 6 if msg.content["config"]["fold"] == "good" else 3
        hgg, bm = frozenset(f"h{i}" for i in range(n)), frozenset(f"b{i}" for i in range(n))
        ledger.declare(msg.metadata.message_id, ledger.Declaration(
            {"train": hgg | bm, "train-hgg": hgg, "train-bm": bm},
            {"n": "train", "n-hgg": "train-hgg", "n-bm": "train-bm"}, None))
        return Message(RecordDict({"metrics": MetricRecord({"n": 2 * n, "n-hgg": n, "n-bm": n})}), reply_to=msg)

    context = Context(run_id=1, node_id=7, node_config={"site-dir": str(tmp_path)}, state=RecordDict(),
                      run_config=app_run_config({"min-cases-per-class": K}))
    requests = [_request(protocol.MOMENTS, RecordDict({"config": ConfigRecord({"fold": fold})}), f"sub-{fold}")
                for fold in ("good", "small")]
    [packed] = batch.pack(requests)
    reply = app(_as_received(packed.message, "batch-1"), context)
    packed.message.metadata.__dict__["_message_id"] = "batch-1"  # as the grid stamps it when it sends
    subs = batch.unpack_replies([packed], [reply])

    good, small = subs["sub-good"], subs["sub-small"]
    assert not good.has_error() and int(good.content["metrics"]["n-hgg"]) == 6
    assert small.has_error() and "'n-hgg' = 3 is fewer than k = 5" in small.error.reason
    assert good.metadata.reply_to_message_id == "sub-good" and good.metadata.message_type == protocol.MOMENTS
    assert [(e["type"], e.get("fold")) for e in _outbox(tmp_path)] == [(protocol.MOMENTS, "good")]
    released = ledger.Ledger(tmp_path / ".radfed" / "release", K).released_sets()
    assert len(max(released, key=len)) == 12 and all(len(s) != 3 for s in released)


def test_a_batch_nested_in_a_batch_or_with_repeated_ids_is_refused_before_anything_is_read(tmp_path):
    app = BatchingClientApp(mods=[redact_local_paths, privacy_guard])
    context = Context(run_id=1, node_id=7, node_config={"site-dir": str(tmp_path)}, state=RecordDict(),
                      run_config=app_run_config({"min-cases-per-class": K}))
    twice = [_request(protocol.MOMENTS, RecordDict({"config": ConfigRecord({})}), "same") for _ in range(2)]
    [packed] = batch.pack(twice)
    reply = app(_as_received(packed.message, "b"), context)
    assert reply.has_error() and "unique id" in reply.error.reason
    nested = [_request(batch.BATCH, RecordDict({"config": ConfigRecord({})}), "inner")]
    [packed] = batch.pack(nested)
    reply = app(_as_received(packed.message, "b2"), context)
    assert reply.has_error() and "may not hold another batch" in reply.error.reason
    assert _outbox(tmp_path) == []


@pytest.fixture
def site(tmp_path) -> Path:
    return synth.write_site(tmp_path / "sites", synth.tiny_sites(1, 12)[0], seed=5)


def test_a_batch_through_the_real_client_app_equals_each_request_alone(site, tmp_path):
    """The real ClientApp (every mod): two folds' moments and one request with a bad feature hash in one batch
    give the same replies, outbox entries and refusals as the three sent one by one at a twin site."""
    from client.app import app

    config = app_run_config({"data-root": str(site.parent), "harmonization": "none", "min-cases-per-class": K})
    twin = tmp_path / "twin" / site.name
    twin.parent.mkdir()
    import shutil

    shutil.copytree(site, twin)
    approve_demo_plan([site, twin], config)

    def context(where: Path) -> Context:
        return Context(run_id=1, node_id=7, node_config={"site-dir": str(where)}, state=RecordDict(),
                       run_config=config)

    batched, alone = context(site), context(twin)
    for ctx in (batched, alone):
        app(_request(protocol.PLAN, RecordDict({"config": ConfigRecord({})}), "plan"), ctx)
        names = [str(n) for n in app(_request(protocol.FEATURES, RecordDict({"config": ConfigRecord({})}), "f"),
                                     ctx).content["config"]["features"]][:4]

    def requests() -> list[Message]:
        agreed = {"features": names, "features-sha256": sha256_json(names)}
        return [_request(protocol.MOMENTS, RecordDict({"config": ConfigRecord({**agreed, "fold": "a"})}), "m-a"),
                _request(protocol.MOMENTS, RecordDict({"config": ConfigRecord(
                    {**agreed, "features-sha256": "0" * 64, "fold": "bad"})}), "m-bad"),
                _request(protocol.MOMENTS, RecordDict({"config": ConfigRecord({**agreed, "fold": "b"})}), "m-b")]

    [packed] = batch.pack(requests())
    reply = app(_as_received(packed.message, "batch-1"), batched)
    packed.message.metadata.__dict__["_message_id"] = "batch-1"
    subs = batch.unpack_replies([packed], [reply])
    one_by_one = {m.metadata.message_id: app(m, alone) for m in requests()}
    for sub_id, single in one_by_one.items():
        assert subs[sub_id].has_error() == single.has_error(), sub_id
        if single.has_error():
            assert "does not match its hash" in subs[sub_id].error.reason == single.error.reason
            continue
        for key in ("mean-hgg", "mean-bm"):
            assert subs[sub_id].content["arrays"][key].numpy().tolist() == \
                single.content["arrays"][key].numpy().tolist()
        assert dict(subs[sub_id].content["metrics"]) == dict(single.content["metrics"])

    def sent(where: Path) -> list[tuple]:
        return [(e["type"], e.get("fold"), json.dumps(e["records"], sort_keys=True)) for e in _outbox(where)]

    assert sent(site) == sent(twin) and [f for _, f, _ in sent(site)][-2:] == ["a", "b"]


def test_interleaved_folds_keep_their_own_feature_lists_at_the_site(site):
    """Folds in one batch interleave at the site: fold "a" joins its harmonisation on 4 agreed features, fold "b"
    then agrees 6, and fold "a" scores its model. Fold "a" must harmonise with its own 4-feature list (a single
    list for every fold would hand it fold b's 6 and its ComBat parameters would not fit), and its reply must equal
    fold "a" alone at a fresh site."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from client import runcache
    from client.app import app
    from common import model

    config = app_run_config({"data-root": str(site.parent), "harmonization": "combat", "min-cases-per-class": K})
    approve_demo_plan([site], config)

    def fresh() -> Context:
        ctx = Context(run_id=1, node_id=7, node_config={"site-dir": str(site)}, state=RecordDict(), run_config=config)
        app(_request(protocol.PLAN, RecordDict({"config": ConfigRecord({})}), "plan"), ctx)
        return ctx

    ctx = fresh()
    names = [str(n) for n in app(_request(protocol.FEATURES, RecordDict({"config": ConfigRecord({})}), "f"),
                                 ctx).content["config"]["features"]]

    def agreed(d: int, fold: str) -> dict:
        return {"features": names[:d], "features-sha256": sha256_json(names[:d]), "fold": fold}

    def join(d: int, fold: str, mid: str) -> Message:
        arrays = ArrayRecord({"grand-mean": Array(np.zeros(d)), "var-pooled": Array(np.ones(d)),
                              "beta-cov": Array(np.zeros((0, d))), "zero-variance": Array(np.zeros(d))})
        return _request(protocol.COMBAT_JOIN, RecordDict({"config": ConfigRecord(
            {**agreed(d, fold), "n-sites": 2, "n-pooled": 40}), "arrays": arrays}), mid)

    selected = names[:2]
    state = ArrayRecord(model.build_model(np.zeros(2), np.ones(2)).state_dict())
    evaluate = {"features": selected, "features-sha256": sha256_json(selected), "pos-weight": 1.0,
                "server-round": 1, "split": "all", "fold": "a"}

    def score(mid: str) -> Message:
        return _request(protocol.EVALUATE, RecordDict({"config": ConfigRecord(evaluate), "arrays": state}), mid)

    requests = [join(4, "a", "j-a"), join(6, "b", "j-b"), score("e-a")]
    [packed] = batch.pack(requests)
    reply = app(_as_received(packed.message, "batch-1"), ctx)
    packed.message.metadata.__dict__["_message_id"] = "batch-1"
    subs = batch.unpack_replies([packed], [reply])
    assert not any(m.has_error() for m in subs.values()), [m.error.reason for m in subs.values() if m.has_error()]

    runcache.clear()
    alone = fresh()
    app(join(4, "a", "j-a2"), alone)
    single = app(score("e-a2"), alone)
    assert dict(subs["e-a"].content["metrics"]) == dict(single.content["metrics"])


def _one_patient_apart_app(crash_on: str = "") -> BatchingClientApp:
    """The real guard and ledger behind a handler whose fold "a" sums over 6 + 6 patients and fold "b" over the same
    and one more HGG patient: each reply is within k alone, but the two differ by exactly one patient."""
    app = BatchingClientApp(mods=[redact_local_paths, privacy_guard])

    @app.query("moments")
    def moments(msg: Message, context: Context) -> Message:
        fold = str(msg.content["config"]["fold"])
        if fold == crash_on:
            raise KeyboardInterrupt("the site's process is stopped mid-batch")  # not an Exception: nothing catches it
        if fold == "boom":
            raise RuntimeError("this fold's handler failed")
        extra = 1 if fold == "b" else 0
        hgg, bm = frozenset(f"h{i}" for i in range(6 + extra)), frozenset(f"b{i}" for i in range(6))
        ledger.declare(msg.metadata.message_id, ledger.Declaration(
            {"train": hgg | bm, "train-hgg": hgg, "train-bm": bm},
            {"n": "train", "n-hgg": "train-hgg", "n-bm": "train-bm"}, None))
        return Message(RecordDict({"metrics": MetricRecord({"n": len(hgg | bm), "n-hgg": len(hgg), "n-bm": 6})}),
                       reply_to=msg)

    return app


def _send_folds(app: BatchingClientApp, site: Path, folds: list[str]) -> tuple[Message | None, dict[str, Message]]:
    site.mkdir(parents=True, exist_ok=True)
    context = Context(run_id=1, node_id=7, node_config={"site-dir": str(site)}, state=RecordDict(),
                      run_config=app_run_config({"min-cases-per-class": K}))
    requests = [_request(protocol.MOMENTS, RecordDict({"config": ConfigRecord({"fold": f})}), f"sub-{f}")
                for f in folds]
    [packed] = batch.pack(requests)
    reply = app(_as_received(packed.message, "batch-1"), context)
    packed.message.metadata.__dict__["_message_id"] = "batch-1"
    return reply, batch.unpack_replies([packed], [reply])


def _released(site: Path) -> list[frozenset[str]]:
    return ledger.Ledger(site / ".radfed" / "release", K).released_sets()


def test_two_folds_one_patient_apart_in_one_batch_the_second_is_refused(tmp_path):
    """Red team: two sub-requests of ONE batch whose case sets differ by one patient (h6). Each is fine against the
    ledger as it was before the batch, so a site checking every sub-reply against that alone would send both and
    h6's values would be their difference. The second must be checked against the first's sets too: refused, and
    the ledger, releases.jsonl and the outbox on disk hold the first only."""
    reply, subs = _send_folds(_one_patient_apart_app(), tmp_path, ["a", "b"])
    assert not reply.has_error()
    assert not subs["sub-a"].has_error()
    assert subs["sub-b"].has_error() and "would single out 1 patient" in subs["sub-b"].error.reason
    released = _released(tmp_path)
    assert frozenset(f"h{i}" for i in range(6)) | frozenset(f"b{i}" for i in range(6)) in released
    assert all("h6" not in s for s in released)
    lines = (tmp_path / ".radfed" / "release" / "releases.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["type"] == protocol.MOMENTS
    assert [e.get("fold") for e in _outbox(tmp_path)] == ["a"]

    # the same two folds in two messages: the ledger on disk refuses the second the same way
    again, subs = _send_folds(_one_patient_apart_app(), tmp_path, ["b"])
    assert subs["sub-b"].has_error() and "would single out 1 patient" in subs["sub-b"].error.reason


def test_a_fold_that_fails_mid_batch_books_nothing_and_a_crash_sends_and_writes_nothing(tmp_path):
    """A later sub-request that raises (its handler fails) is that fold's error only: the earlier fold leaves and is
    booked, the failed one neither. A crash that stops the batch itself (nothing catches it) sends no reply and
    leaves nothing of the batch on disk: no set is recorded that did not leave, and none leaves unrecorded (the
    ledger is written before the reply is handed to Flower, so that order holds whatever stops the site)."""
    reply, subs = _send_folds(_one_patient_apart_app(), tmp_path / "fails", ["a", "boom"])
    assert not subs["sub-a"].has_error() and subs["sub-boom"].has_error()
    assert len(_released(tmp_path / "fails")) == 3 and [e.get("fold") for e in _outbox(tmp_path / "fails")] == ["a"]

    crashed = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):
        _send_folds(_one_patient_apart_app(crash_on="b"), crashed, ["a", "b"])
    assert _released(crashed) == [] and _outbox(crashed) == []
    assert not (crashed / ".radfed" / "release" / "releases.jsonl").exists()
    # the site answers the next batch as if the crashed one had never come
    reply, subs = _send_folds(_one_patient_apart_app(), crashed, ["a"])
    assert not subs["sub-a"].has_error() and len(_released(crashed)) == 3


def test_a_batch_of_repeats_writes_its_lines_without_fsync_a_batch_that_releases_a_set_with_it(tmp_path, monkeypatch):
    """A batch that releases a set the ledger does not hold writes ledger.json, releases.jsonl and the outbox durably
    (fsync) before its reply leaves; a batch of repeats (a fold's later Newton rounds) leaves ledger.json as it is and
    appends its releases.jsonl and outbox lines without fsync, as a single reply of repeats does: the sets it
    releases are on disk, durably, from the first batch. Either way every line is on disk before the reply."""
    import os

    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    reply, subs = _send_folds(_one_patient_apart_app(), tmp_path, ["a"])
    assert not reply.has_error() and not subs["sub-a"].has_error()
    names = sorted(Path(p).name for p in synced)
    assert "outbox.jsonl" in names and "releases.jsonl" in names and any("ledger.json" in n for n in names)
    ledger_before = (tmp_path / ".radfed" / "release" / "ledger.json").read_bytes()
    synced.clear()
    reply, subs = _send_folds(_one_patient_apart_app(), tmp_path, ["a", "a2"])  # the same sets again
    assert not reply.has_error() and not subs["sub-a"].has_error() and not subs["sub-a2"].has_error()
    assert synced == []
    assert (tmp_path / ".radfed" / "release" / "ledger.json").read_bytes() == ledger_before
    assert [e.get("fold") for e in _outbox(tmp_path)] == ["a", "a", "a2"]
    lines = (tmp_path / ".radfed" / "release" / "releases.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
