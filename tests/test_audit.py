"""The signed audit chain: intact logs verify; every kind of tampering is named at its first line."""

import json
import os
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from radfed.cli import main as cli
from server import audit as audit_module
from server.audit import AuditLog, line_sha256, load_or_create_key, public_pem, verify


def _write_run(path, key, rounds=3):
    audit = AuditLog(path, key)
    audit.append("run-start", run_id=42, config={"a": 1})
    audit.append("model-init", model_sha256="m0")
    for r in range(1, rounds + 1):
        audit.append("round-train", round=r, sites={"a": {"n": 10, "loss": 0.5 / r}}, aggregated_sha256=f"m{r}")
    audit.append("run-end", status="completed", auc=float("nan"))
    return audit


@pytest.fixture
def key(tmp_path):
    return load_or_create_key(tmp_path / "keys" / "coordinator.pem")


@pytest.fixture
def log(tmp_path, key):
    path = tmp_path / "run" / "audit.jsonl"
    _write_run(path, key)
    return path


def _lines(path):
    return path.read_text().splitlines()


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_intact_log_verifies_with_its_key(log):
    result = verify(log)
    assert result.ok, result.reason
    assert result.entries == 6 and result.events["round-train"] == 3
    assert json.loads(_lines(log)[-1])["data"]["auc"] is None  # NaN stored as strict JSON
    assert (log.parent / "audit.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_key_is_created_private_once_and_reused(tmp_path, key):
    path = tmp_path / "keys" / "coordinator.pem"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert public_pem(load_or_create_key(path)) == public_pem(key)


def test_changed_byte_is_found(log):
    lines = _lines(log)
    lines[3] = lines[3].replace('"loss":0.25', '"loss":0.15')
    _write(log, lines)
    result = verify(log)
    assert not result.ok and result.bad_line == 4 and "bad signature" in result.reason


def test_changed_entry_re_chained_but_not_re_signed_is_found(log):
    # an attacker edits a value and fixes every later 'prev' hash: the signature still fails
    lines = _lines(log)
    entry = json.loads(lines[2])
    entry["data"]["aggregated_sha256"] = "forged"
    lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    _write(log, lines)
    result = verify(log)
    assert not result.ok and result.bad_line == 3 and "bad signature" in result.reason


def test_deleted_line_is_found(log):
    lines = _lines(log)
    del lines[1]
    _write(log, lines)
    result = verify(log)
    assert result.bad_line == 2 and "chain broken" in result.reason


def test_reordered_lines_are_found(log):
    lines = _lines(log)
    lines[2], lines[3] = lines[3], lines[2]
    _write(log, lines)
    assert verify(log).bad_line == 3


def test_inserted_line_is_found(log):
    lines = _lines(log)
    lines.insert(3, lines[3])
    _write(log, lines)
    result = verify(log)
    assert not result.ok and result.bad_line == 5


def test_cut_short_log_is_found(log):
    _write(log, _lines(log)[:-1])
    result = verify(log)
    assert not result.ok and "without 'run-end'" in result.reason


def test_log_re_signed_with_another_key_fails_against_the_pinned_key(tmp_path, key, log):
    forged = tmp_path / "forged" / "audit.jsonl"
    _write_run(forged, Ed25519PrivateKey.generate())  # a whole new log with its own audit.pub
    assert verify(forged).ok  # internally consistent...
    pinned = tmp_path / "coordinator.pub"
    pinned.write_bytes(public_pem(key))
    result = verify(forged, pubkey=pinned)  # ...but not signed by the coordinator
    assert not result.ok and result.bad_line == 1 and "bad signature" in result.reason
    assert verify(log, pubkey=pinned).ok


def test_receipts_match_or_name_the_mismatch(tmp_path, log):
    receipts = tmp_path / "receipts.jsonl"
    rows = [{"run_id": 42, "site": "a", "type": "train", "round": 1, "model_sha256": "m0"},
            {"run_id": 42, "site": "a", "type": "evaluate", "round": 1, "model_sha256": "m1"},
            {"run_id": 42, "site": "a", "type": "train", "round": 2, "model_sha256": "m1"},
            {"run_id": 42, "site": "a", "type": "train", "round": 3, "model_sha256": "m2"},
            {"run_id": 7, "site": "a", "type": "train", "round": 1, "model_sha256": "other run"}]
    receipts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = verify(log, receipts=[receipts])
    assert result.ok and result.receipts_checked == 4
    rows[2]["model_sha256"] = "m-substituted"
    receipts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = verify(log, receipts=[receipts])
    assert not result.ok and "receipt mismatch" in result.reason and "line 3" in result.reason


def test_cli_exit_codes(log, capsys):
    assert cli(["audit", "verify", str(log)]) == 0
    assert "intact: 6 entries" in capsys.readouterr().out
    _write(log, _lines(log)[:1] + _lines(log)[2:])
    assert cli(["audit", "verify", str(log)]) == 1
    assert "BROKEN at line 2" in capsys.readouterr().out



def test_threads_share_fsyncs_and_each_entry_is_on_disk_before_append_returns(tmp_path, key, monkeypatch):
    """Fold threads append together: the chain stays intact, every append returns only after an fsync that began
    after its line was written has finished, and under contention one fsync covers several entries (group commit)."""
    path = tmp_path / "run" / "audit.jsonl"
    log = AuditLog(path, key)
    synced = []  # the file's size when each finished fsync began: what it put on disk
    real_fsync = os.fsync

    def slow_fsync(fd):
        size = os.fstat(fd).st_size
        time.sleep(0.01)  # a disk's fsync: long enough for other threads to write meanwhile
        real_fsync(fd)
        synced.append(size)

    monkeypatch.setattr(audit_module.os, "fsync", slow_fsync)
    returned = []  # (entry hash, bytes on disk when its append returned)

    def fold(name):
        for r in range(10):
            digest = log.append("round-train", round=r, fold=name)
            returned.append((digest, max(synced, default=0)))

    threads = [threading.Thread(target=fold, args=(f"site-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = _lines(path)
    log.append("run-end", status="completed")
    assert len(lines) == 80 and verify(path).ok
    ends, total = {}, 0
    for line in lines:
        total += len(line.encode()) + 1
        ends[line_sha256(line)] = total
    assert all(on_disk >= ends[digest] for digest, on_disk in returned)
    assert len(synced) < 80  # one fsync per entry without the group commit
