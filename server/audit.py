"""The run's audit log: JSON lines, each entry carrying the sha256 of the previous line.

Changing, deleting, inserting or reordering any line breaks the chain at that line, which
``verify`` reports. (Signatures and site receipts come on top of this chain.)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.canon import canonical_json, json_safe

GENESIS = "0" * 64
SCHEMA = "radfed.audit/1"


def line_sha256(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


class AuditLog:
    """Append-only writer; every entry is flushed and fsynced before the run goes on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.prev, self.seq = GENESIS, 0
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            if lines:
                self.prev, self.seq = line_sha256(lines[-1]), len(lines)

    def append(self, event: str, **data: Any) -> str:
        """Write one entry and return its hash (the next entry's ``prev``)."""
        entry = {
            "schema": SCHEMA,
            "seq": self.seq,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": event,
            "prev": self.prev,
            "data": json_safe(data),
        }
        line = canonical_json(entry)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.prev, self.seq = line_sha256(line), self.seq + 1
        return self.prev


@dataclass
class Verification:
    ok: bool
    entries: int
    last_sha256: str
    bad_line: int | None = None  # 1-based
    reason: str = ""
    events: dict[str, int] | None = None


def verify(path: Path) -> Verification:
    """Walk the chain; the first line whose ``prev`` or ``seq`` does not follow is reported."""
    prev, events = GENESIS, {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            return Verification(False, number - 1, prev, number, f"not valid JSON ({exc.msg})", events)
        if not isinstance(entry, dict):
            return Verification(False, number - 1, prev, number, "not a JSON object", events)
        if entry.get("prev") != prev:
            return Verification(False, number - 1, prev, number,
                                "chain broken: 'prev' is not the sha256 of the line before "
                                "(a line was changed, deleted, inserted or reordered)", events)
        if entry.get("seq") != number - 1:
            return Verification(False, number - 1, prev, number,
                                f"sequence number {entry.get('seq')} where {number - 1} was expected", events)
        if canonical_json(entry) != line:
            return Verification(False, number - 1, prev, number, "line is not in canonical form (edited)", events)
        events[entry.get("event", "?")] = events.get(entry.get("event", "?"), 0) + 1
        prev = line_sha256(line)
    if not lines:
        return Verification(False, 0, prev, None, "the log is empty", events)
    return Verification(True, len(lines), prev, None, "", events)
