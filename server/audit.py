"""The run's audit log: signed, hash-chained JSON lines that an auditor can verify.

Each entry carries the sha256 of the previous line (``prev``) and an Ed25519 signature (``sig``) by
the coordinator's key over the entry without ``sig``; the public key is written beside the log as
``audit.pub``. ``verify`` names the first line that was changed, deleted, inserted or reordered, a bad
signature, a log cut short (no ``run-end``), and any site receipt that disagrees with the log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.canon import canonical_json, json_safe

GENESIS = "0" * 64
SCHEMA = "radfed.audit/2"
FINAL_EVENTS = ("run-end",)


def line_sha256(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The coordinator's signing key (PEM, created once with mode 600 and reused across runs, so auditors
    can pin its public key)."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key: remove it to let radfed create one")
        return key
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return key


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(public: bytes) -> str:
    """sha256 of the PEM public key: what the log's first entry records and an auditor can compare."""
    return hashlib.sha256(public).hexdigest()


class AuditLog:
    """Append-only signed writer; every entry is flushed and fsynced before the run goes on."""

    def __init__(self, path: Path, key: Ed25519PrivateKey) -> None:
        self.path = path
        self.key = key
        path.parent.mkdir(parents=True, exist_ok=True)
        self.public = public_pem(key)
        (path.parent / "audit.pub").write_bytes(self.public)
        self.prev, self.seq = GENESIS, 0
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            if lines:
                self.prev, self.seq = line_sha256(lines[-1]), len(lines)

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public)

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
        entry["sig"] = base64.b64encode(self.key.sign(canonical_json(entry).encode("utf-8"))).decode("ascii")
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
    events: dict[str, int] = field(default_factory=dict)
    receipts_checked: int = 0


def _load_public(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def verify(path: Path, pubkey: Path | None = None, receipts: list[Path] | None = None) -> Verification:
    """Check the chain, every signature and completeness; then each site receipt against the log.

    ``pubkey`` pins the coordinator's key (default: ``audit.pub`` beside the log, which only proves the
    log is internally consistent; an auditor should pin the key the coordinator published).
    """
    key_path = pubkey or path.parent / "audit.pub"
    public = _load_public(key_path)
    prev, events, entries = GENESIS, {}, []
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return Verification(False, 0, prev, None, "the log is empty", events)
    for number, line in enumerate(lines, start=1):
        entry, problem = _check_line(line, number, prev, public, key_path)
        if problem:
            return Verification(False, number - 1, prev, number, problem, events)
        events[entry["event"]] = events.get(entry["event"], 0) + 1
        entries.append(entry)
        prev = line_sha256(line)
    if entries[-1]["event"] not in FINAL_EVENTS:
        return Verification(False, len(lines), prev, len(lines) + 1,
                            f"the log ends after line {len(lines)} without 'run-end': it was cut short, or the run "
                            "is still going", events)
    result = Verification(True, len(lines), prev, None, "", events)
    for receipt_file in receipts or []:
        problem = _check_receipts(entries, receipt_file, result)
        if problem:
            result.ok, result.reason = False, problem
            return result
    return result


def _check_line(line: str, number: int, prev: str, public: Ed25519PublicKey,
                key_path: Path) -> tuple[dict[str, Any], str]:
    """The parsed entry and '' if the line follows ``prev`` and is signed, else what is wrong with it."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        return {}, f"not valid JSON ({exc.msg}): the line was changed"
    if not isinstance(entry, dict) or "sig" not in entry:
        return {}, "not a signed audit entry"
    if entry.get("prev") != prev:
        return entry, ("chain broken: 'prev' is not the sha256 of the line before (a line was changed, deleted, "
                       "inserted or reordered)")
    if entry.get("seq") != number - 1:
        return entry, (f"sequence number {entry.get('seq')} where {number - 1} was expected (a line was deleted, "
                       "inserted or reordered)")
    if canonical_json(entry) != line:
        return entry, "line is not in canonical form: it was edited"
    unsigned = {k: v for k, v in entry.items() if k != "sig"}
    try:
        public.verify(base64.b64decode(entry["sig"]), canonical_json(unsigned).encode("utf-8"))
    except (InvalidSignature, ValueError):
        return entry, f"bad signature: the entry was changed or signed by another key than {key_path}"
    return entry, ""


def model_hashes(entries: list[dict[str, Any]]) -> dict[tuple[str, str, int], str]:
    """What the log says each site was sent, by (fold, type, round): ("train", r) -> model of round r-1;
    ("evaluate", r) -> round r. The fold is "" for the main federation, else the leave-one-site-out
    fold's held-out site."""
    sent: dict[tuple[str, str, int], str] = {}
    for entry in entries:
        data = entry["data"]
        fold = str(data.get("fold", ""))
        if entry["event"] == "model-init":
            sent[(fold, "train", 1)] = data["model_sha256"]
        elif entry["event"] == "round-train" and data.get("aggregated_sha256"):
            sent[(fold, "evaluate", data["round"])] = data["aggregated_sha256"]
            sent[(fold, "train", data["round"] + 1)] = data["aggregated_sha256"]
    return sent


def _check_receipts(entries: list[dict[str, Any]], receipt_file: Path, result: Verification) -> str:
    """'' when every receipt of this run matches the log, else what disagrees."""
    run_id = entries[0]["data"].get("run_id")
    sent = model_hashes(entries)
    for number, line in enumerate(receipt_file.read_text(encoding="utf-8").splitlines(), start=1):
        receipt = json.loads(line)
        if receipt.get("run_id") != run_id:
            continue
        expected = sent.get((str(receipt.get("fold", "")), receipt["type"], receipt["round"]))
        if expected != receipt["model_sha256"]:
            return (f"receipt mismatch: {receipt_file} line {number}: site {receipt.get('site')} received model "
                    f"{receipt['model_sha256'][:16]}... for {receipt['type']} round {receipt['round']}, the log says "
                    f"{(expected or 'nothing')[:16]}...")
        result.receipts_checked += 1
    return ""
