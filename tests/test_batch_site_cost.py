"""What a site works out once per ``query.batch`` rather than once per sub-request (issue 20, the site's side of
leave-one-site-out): the guard's view of the site (run config, settings, ledger), the ledger a sub-request's split is
drawn against, the releases.jsonl line of sets already described in the batch, and a reply's arrays built once.
Every sub-reply is still checked on its own (tests/test_batch_site.py); these check that the repeated work is gone
and that what the site sends and logs is what it was."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flwr.app import Array, ConfigRecord, Context, Message, Metadata, RecordDict

from client import guard, ledger, runcache, steps
from common import batch, protocol
from common.canon import sha256_json
from radfed import synth
from radfed.cli import approve_demo_plan
from radfed.launch import app_run_config

K = 5
FOLDS = ["a", "b", "c", "d", "e"]

pytestmark = pytest.mark.usefixtures("server_identity")  # tests/conftest.py


def _request(message_type: str, content: RecordDict, message_id: str) -> Message:
    meta = Metadata(run_id=1, message_id=message_id, src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content, metadata=meta)


def _received(sent: Message, message_id: str) -> Message:
    return Message(sent.content, metadata=Metadata(
        run_id=1, message_id=message_id, src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="",
        created_at=time.time(), ttl=3600.0, message_type=sent.metadata.message_type))


@pytest.fixture(scope="module")
def joined(tmp_path_factory) -> Iterator[tuple[Context, list[str]]]:
    """A tiny site through the real ClientApp's plan and features phases; the context and 4 agreed features (one
    site for the module's tests: each sends its own messages to it)."""
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import app

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # as tests/conftest.py server_identity
    site = synth.write_site(tmp_path_factory.mktemp("sites"), synth.tiny_sites(1, 12)[0], seed=5)
    config = app_run_config({"data-root": str(site.parent), "harmonization": "none", "min-cases-per-class": K})
    approve_demo_plan([site], config)
    ctx = Context(run_id=1, node_id=7, node_config={"site-dir": str(site)}, state=RecordDict(), run_config=config)
    app(_request(protocol.PLAN, RecordDict({"config": ConfigRecord({})}), "plan"), ctx)
    names = [str(n) for n in app(_request(protocol.FEATURES, RecordDict({"config": ConfigRecord({})}), "f"),
                                 ctx).content["config"]["features"]][:4]
    time.sleep(2 * runcache.SETTLE_FINE_NS / 1e9)  # files written just before a load are not trusted (client.runcache)
    yield ctx, names
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def _moments_batch(names: list[str], tag: str) -> Message:
    agreed = {"features": names, "features-sha256": sha256_json(names)}
    [packed] = batch.pack([_request(protocol.MOMENTS, RecordDict({"config": ConfigRecord({**agreed, "fold": f})}),
                                    f"{tag}-{f}") for f in FOLDS])
    return _received(packed.message, tag)


def _counting(monkeypatch, module: object, name: str) -> list[int]:
    calls = [0]
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_the_guard_and_the_split_read_the_sites_state_once_per_batch(joined, monkeypatch):
    """Five folds' moments in one batch: each sub-reply passes the guard (five outbox lines, five releases), but the
    guard reads the site's settings and the split its ledger once for the batch, not once per sub-request."""
    from client.app import app

    ctx, names = joined
    app(_moments_batch(names, "b0"), ctx)  # the folds' first releases freeze the site's blocks
    settings = _counting(monkeypatch, guard, "site_settings")
    ledgers = _counting(monkeypatch, steps, "ledger")
    reply = app(_moments_batch(names, "b1"), ctx)  # a later round: the same sets again
    assert not any(reply.content[batch.INDEX]["errors"])  # type: ignore[union-attr]
    assert settings[0] == 1
    assert ledgers[0] == 2  # the batch's ledger, and the split drawn from it once (5 + 1 before)
    outbox = Path(str(ctx.node_config["site-dir"])) / ".radfed" / "outbox.jsonl"
    assert [json.loads(line).get("fold") for line in outbox.read_text().splitlines()][-5:] == FOLDS


def test_a_batch_makes_each_releases_line_once_and_logs_what_it_logged_before(joined, monkeypatch):
    """Within one second, five folds releasing the same training sets log five equal releases.jsonl lines; the line
    is made once and appended five times, byte for byte what making it each time wrote."""
    from client.app import app

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206
            return datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    ctx, names = joined
    monkeypatch.setattr(ledger, "datetime", Frozen)
    made = _counting(monkeypatch, ledger, "_release_line")
    releases = Path(str(ctx.node_config["site-dir"])) / ".radfed" / "release" / "releases.jsonl"
    before = len(releases.read_text().splitlines())
    app(_moments_batch(names, "b2"), ctx)
    lines = releases.read_text().splitlines()[before:]
    assert made[0] == 1 and len(lines) == len(FOLDS) and len(set(lines)) == 1
    entry = json.loads(lines[0])
    assert lines[0] + "\n" == ledger._release_line(entry["time"], entry["run_id"], entry["type"], entry["sets"])


def test_a_replys_arrays_are_built_once(joined, monkeypatch):
    """A moments reply's six arrays are made once each (Flower's ArrayRecord(dict) built every Array again)."""
    from client.app import app

    ctx, names = joined
    made = _counting(monkeypatch, Array, "__init__")
    agreed = {"features": names, "features-sha256": sha256_json(names), "fold": "a"}
    reply = app(_request(protocol.MOMENTS, RecordDict({"config": ConfigRecord(agreed)}), "m1"), ctx)
    assert not reply.has_error() and made[0] == len(reply.content["arrays"]) == 6


def test_a_types_shared_list_is_checked_once_per_batch_and_every_sub_reply_by_the_guard(joined, monkeypatch):
    """Five folds' moments in one batch carry the same agreed list: copied and hashed once for the batch
    (client.shared), while the guard checks all five sub-replies and the ledger books all five; one message on its
    own checks its list every time."""
    from client.app import app

    ctx, names = joined
    hashed = _counting(monkeypatch, steps, "names_sha256")
    checked = _counting(monkeypatch, guard, "check_reply")
    released = _counting(monkeypatch, guard, "check_release")
    reply = app(_moments_batch(names, "b3"), ctx)
    assert not any(reply.content[batch.INDEX]["errors"])  # type: ignore[union-attr]
    assert hashed[0] == 1 and checked[0] == released[0] == len(FOLDS)
    agreed = {"features": names, "features-sha256": sha256_json(names), "fold": "a"}
    for i in range(2):
        assert not app(_request(protocol.MOMENTS, RecordDict({"config": ConfigRecord(agreed)}), f"s{i}"),
                       ctx).has_error()
    assert hashed[0] == 3 and checked[0] == released[0] == len(FOLDS) + 2


def test_a_sub_request_whose_list_differs_from_the_checked_one_is_checked_itself(joined):
    """A fold whose list is not the one checked for the batch's earlier folds, under the same claimed hash, is
    hashed itself and refused (its error sub-reply); the folds before and after it are answered."""
    from client.app import app

    ctx, names = joined
    claimed = sha256_json(names)
    requests = [_request(protocol.MOMENTS, RecordDict({"config": ConfigRecord(
        {"features": names[::-1] if f == "c" else names, "features-sha256": claimed, "fold": f})}), f"b4-{f}")
        for f in FOLDS]
    [packed] = batch.pack(requests)
    errors = [str(e) for e in app(_received(packed.message, "b4"), ctx).content[batch.INDEX]["errors"]]  # type: ignore[union-attr]
    assert [bool(e) for e in errors] == [f == "c" for f in FOLDS]
    assert "does not match its hash" in errors[FOLDS.index("c")]
