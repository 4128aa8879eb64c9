"""The audit chain verifies intact logs and names the first line of any tampering."""

import json

import pytest

from radfed.cli import main as cli
from server.audit import AuditLog, verify


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.append("run-start", run_id=1, config={"a": 1})
    for r in range(1, 4):
        audit.append("round-train", round=r, sites={"a": {"n": 10, "loss": 0.5 / r}})
    audit.append("run-end", status="completed", auc=float("nan"))
    return path


def test_intact_log_verifies(log):
    result = verify(log)
    assert result.ok and result.entries == 5
    assert result.events == {"run-start": 1, "round-train": 3, "run-end": 1}
    assert json.loads(log.read_text().splitlines()[-1])["data"]["auc"] is None  # NaN stored as strict JSON


def test_reopened_log_continues_the_chain(log):
    AuditLog(log).append("note", text="appended later")
    assert verify(log).ok and verify(log).entries == 6


def _lines(path):
    return path.read_text().splitlines()


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_changed_byte_is_found(log):
    lines = _lines(log)
    lines[2] = lines[2].replace('"loss":0.25', '"loss":0.15')
    _write(log, lines)
    result = verify(log)
    assert not result.ok and result.bad_line == 4  # the next line no longer chains to it


def test_deleted_line_is_found(log):
    lines = _lines(log)
    del lines[1]
    _write(log, lines)
    assert verify(log).bad_line == 2


def test_reordered_lines_are_found(log):
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    assert verify(log).bad_line == 2


def test_inserted_line_is_found(log):
    lines = _lines(log)
    lines.insert(3, lines[3])
    _write(log, lines)
    assert not verify(log).ok


def test_cli_exit_codes(log, capsys):
    assert cli(["audit", "verify", str(log)]) == 0
    assert "intact: 5 entries" in capsys.readouterr().out
    _write(log, _lines(log)[:1] + _lines(log)[2:])
    assert cli(["audit", "verify", str(log)]) == 1
    assert "BROKEN at line 2" in capsys.readouterr().out
