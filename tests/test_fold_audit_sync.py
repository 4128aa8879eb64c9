"""Folds in the same rounds put their audit entries on disk once per round, before any of their requests leaves,
instead of one fsync per entry on the turn-taking's critical path (server/folds.py, server/audit.py ``deferred``)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.steps import run_config
from common import batch
from server import audit as audit_module
from server.audit import AuditLog, verify
from server.federation import Run
from server.folds import FoldJob, run_folds

ROOT = Path(__file__).resolve().parent.parent
ROUNDS, FOLDS = 3, 4


class OneSiteGrid(Grid):
    """One site answering every sub-request of a batch with an empty reply; notes, as each batch leaves, whether
    every audit entry written so far is on disk."""

    def __init__(self, audit: AuditLog, on_disk: list[int]) -> None:
        self.audit, self.on_disk, self.sent = audit, on_disk, []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.append((self.audit.path.stat().st_size, max(self.on_disk, default=0)))
        replies = []
        for m in messages:
            ids = list(m.content[batch.INDEX]["ids"])
            content = RecordDict({batch.INDEX: ConfigRecord({"ids": ids, "error-codes": [0] * len(ids),
                                                             "errors": [""] * len(ids), "records": [""] * len(ids)})})
            replies.append(Message(content, metadata=Metadata(
                run_id=1, message_id="r", src_node_id=1, dst_node_id=0, reply_to_message_id=m.metadata.message_id,
                group_id="", created_at=0.0, ttl=60.0, message_type=batch.BATCH)))
        return replies

    def get_node_ids(self):
        return [1]

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def set_run(self, run_id):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError


def _work(fold: str):
    def go(run: Run) -> str:
        for r in range(ROUNDS):
            run.audit.append("newton-round", round=r)
            run.audit.append("moments", round=r)
            request = Message(RecordDict({"config": ConfigRecord({"fold": fold})}), metadata=Metadata(
                run_id=1, message_id="", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                created_at=0.0, ttl=60.0, message_type="query.newton"))
            [reply] = run.grid.send_and_receive([request])
            assert not reply.has_error()
        run.audit.append("external-validation", auc=0.5)
        return fold
    return go


def test_batched_folds_sync_their_entries_once_per_round_before_the_round_leaves(tmp_path, monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):  # Flower's Message needs them
        monkeypatch.setattr(TaskIdentity, name, value)
    on_disk: list[int] = []  # the log's size when each fsync began: what it put on disk
    real_fsync = os.fsync

    def counting_fsync(fd):
        size = os.fstat(fd).st_size
        real_fsync(fd)
        on_disk.append(size)

    monkeypatch.setattr(audit_module.os, "fsync", counting_fsync)
    path = tmp_path / "run" / "audit.jsonl"
    log = AuditLog(path, Ed25519PrivateKey.generate())
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    grid = OneSiteGrid(log, on_disk)
    run = Run(grid=grid, config=run_config({**config, "fold-batching": True}), audit=log, folder=tmp_path,
              profile=None)  # type: ignore[arg-type]
    folds = [f"site-{i}" for i in range(FOLDS)]
    out = run_folds(run, [FoldJob("leave-one-site-out", f, _work(f)) for f in folds])
    assert out == {f: f for f in folds}
    assert len(grid.sent) == ROUNDS
    assert all(size == synced for size, synced in grid.sent)  # nothing leaves before every entry is on disk
    assert on_disk[-1] == path.stat().st_size  # the folds' end: every entry on disk
    entries = 2 + FOLDS * (2 * ROUNDS + 1)  # fold-start, each fold's entries, folds-end
    assert len(path.read_text().splitlines()) == entries
    # one fsync for fold-start, one per round, one after the last turns and one for folds-end (one per entry, 30,
    # with every entry synced on its own)
    assert len(on_disk) <= ROUNDS + 3
    log.append("run-end", status="completed")
    assert verify(path).ok  # the chain intact, in turn order


def test_a_deferred_entry_is_written_and_flushed_then_synced_by_sync(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(audit_module.os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, Ed25519PrivateKey.generate())
    with log.deferred():
        for r in range(5):
            log.append("round", r=r)
    assert not calls and len(path.read_text().splitlines()) == 5  # written and flushed, not yet fsynced
    log.sync()
    assert len(calls) == 1
    log.sync()
    assert len(calls) == 1  # nothing new: no fsync
    log.append("run-end")
    assert len(calls) == 2 and verify(path).ok  # outside ``deferred`` every entry is on disk before append returns
