"""The run's audit log: signed, hash-chained JSON lines that an auditor can verify.

Each entry carries the sha256 of the previous line (``prev``) and an Ed25519 signature (``sig``) by
the coordinator's key over the entry without ``sig``; the public key is written beside the log as
``audit.pub``. ``verify`` names the first line that was changed, deleted, inserted or reordered, a bad
signature, a log cut short (no ``run-end``); then every run artifact against the hash ``run-end`` signed
(and any artifact it did not sign), and each site's receipts against the rounds the log says it took part in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.canon import canonical_json, file_sha256, json_safe
from common.plan import plan_sha256

GENESIS = "0" * 64
SCHEMA = "radfed.audit/2"
FINAL_EVENTS = ("run-end",)
# the run folder's outputs that run-end signs by file hash (audit.jsonl and audit.pub verify themselves)
ARTIFACTS = ("metrics.json", "model.pt", "report.html", "report.md", "plan.json", "harmonization.json")
MAX_MISSING_NAMED = 5  # per receipts file; more are counted, not listed


def line_sha256(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def artifact_hashes(folder: Path) -> dict[str, str]:
    """File sha256 of each run artifact present in ``folder``: what run-end signs."""
    return {name: file_sha256(folder / name) for name in ARTIFACTS if (folder / name).is_file()}


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
    """Append-only signed writer; every entry is flushed and fsynced before the run goes on. Thread-safe: folds
    that run together (server/folds.py) append from their own threads, each entry tagged with its fold. Their
    fsyncs are shared (group commit): an entry is written in order under one lock, then its thread waits until an
    fsync that began after the write has returned; one fsync covers every entry written before it began, so the 48
    fold threads of a 48-site run do not each wait out their own (528 fsyncs, 2.4 s of their time). Folds taking turns
    one at a time never overlap their appends, so they write ``deferred`` and their coordinator syncs once per round,
    before the round's requests leave (server/folds.py)."""

    def __init__(self, path: Path, key: Ed25519PrivateKey) -> None:
        self.path = path
        self.key = key
        path.parent.mkdir(parents=True, exist_ok=True)
        self.public = public_pem(key)
        (path.parent / "audit.pub").write_bytes(self.public)
        self.prev, self.seq = GENESIS, 0
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one fsync at a time; taken after _lock is released
        self._synced = 0  # entries (seq) known to be on disk
        self._local = threading.local()  # the fold the calling thread works for (fold_context)
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            if lines:
                self.prev, self.seq = line_sha256(lines[-1]), len(lines)

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public)

    @contextmanager
    def fold_context(self, fold: str) -> Iterator[None]:
        """Every entry this thread appends inside carries ``fold`` (unless it names its own)."""
        before = getattr(self._local, "fold", "")
        self._local.fold = fold
        try:
            yield
        finally:
            self._local.fold = before

    def append(self, event: str, **data: Any) -> str:
        """Write one entry and return its hash (the next entry's ``prev``)."""
        fold = getattr(self._local, "fold", "")
        if fold and "fold" not in data:
            data = {**data, "fold": fold}
        with self._lock:
            digest = self._write(event, data)
            mine = self.seq
        if not getattr(self._local, "deferred", False):
            self._sync(mine)
        return digest

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside (this thread only), ``append`` writes and flushes its entry and leaves the fsync to ``sync``: for
        the fold threads that take turns (server/folds.py), whose coordinator syncs once before any of their
        requests leave and before the folds end, so nothing is sent or concluded on an entry not yet on disk, without
        one fsync per entry on the turns' critical path (where they cannot share one)."""
        before = getattr(self._local, "deferred", False)
        self._local.deferred = True
        try:
            yield
        finally:
            self._local.deferred = before

    def sync(self) -> None:
        """Return once every entry written so far is on disk (one fsync, none when they already are)."""
        with self._lock:
            upto = self.seq
        self._sync(upto)

    def _sync(self, upto: int) -> None:
        """Return once entries up to ``upto`` are on disk: at most one fsync, none when another thread's fsync
        that began after they were written has covered them."""
        with self._sync_lock:
            if self._synced >= upto:
                return
            written = self.seq  # every entry counted here was written (and flushed) before the fsync begins
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._synced = max(self._synced, written)

    def _write(self, event: str, data: dict[str, Any]) -> str:
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
            fh.flush()  # to the OS here; to disk in _sync, outside the write lock
        self.prev, self.seq = line_sha256(line), self.seq + 1
        return self.prev


@dataclass
class Verification:
    ok: bool
    entries: int
    last_sha256: str
    bad_line: int | None = None  # 1-based; None when the chain is intact and the problem is in a file
    reason: str = ""
    events: dict[str, int] = field(default_factory=dict)
    receipts_checked: int = 0
    receipt_files: int = 0
    artifacts_checked: list[str] = field(default_factory=list)  # artifacts whose file matches run-end
    problems: list[str] = field(default_factory=list)  # every artifact or receipt problem (reason: the first)


def _load_public(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def verify(path: Path, pubkey: Path | None = None, receipts: list[Path] | None = None,
           artifacts: bool = True) -> Verification:
    """Check the chain, every signature and completeness; then (``artifacts``) each run file beside the log
    against the hash run-end signed, and each site receipts file against the log.

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
    # the chain is trusted from here on: what run-end and the round entries say is what the coordinator signed
    result = Verification(True, len(lines), prev, None, "", events)
    if artifacts:
        result.problems += _check_artifacts(entries, path.parent, result)
    for receipt_file in receipts or []:
        result.receipt_files += 1
        result.problems += _check_receipts(entries, receipt_file, result)
    if result.problems:
        result.ok, result.reason = False, result.problems[0]
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


def _stream(data: dict[str, Any]) -> str:
    """The models one sequence of rounds sent: the fold ("" for the main federation), and the family when the run
    fits several (each family has its own rounds, numbered from 1)."""
    fold, family = str(data.get("fold", "")), str(data.get("family", ""))
    return f"{fold}|{family}" if family else fold


def model_hashes(entries: list[dict[str, Any]]) -> dict[tuple[str, str, int], str]:
    """What the log says each site was sent, by (fold, type, round): ("train", r) -> model of round r-1;
    ("evaluate", r) -> round r. The fold is "" for the main federation, else the leave-one-site-out
    fold's held-out site."""
    sent: dict[tuple[str, str, int], str] = {}
    for entry in entries:
        data = entry["data"]
        fold = _stream(data)
        if data.get("stage"):  # a selection step (LASSO): Newton messages only, nothing a site keeps a receipt of
            continue
        if entry["event"] == "model-init":
            sent[(fold, "train", 1)] = data["model_sha256"]
        elif entry["event"] == "round-train" and data.get("aggregated_sha256"):
            sent[(fold, "evaluate", data["round"])] = data["aggregated_sha256"]
            sent[(fold, "train", data["round"] + 1)] = data["aggregated_sha256"]
    return sent


def _check_artifacts(entries: list[dict[str, Any]], folder: Path, result: Verification) -> list[str]:
    """What differs between the run files in ``folder`` and the hashes run-end signed; [] when all match."""
    end = entries[-1]["data"]
    signed = dict(end.get("artifacts") or {})
    if "metrics.json" not in signed and end.get("metrics_sha256"):
        signed["metrics.json"] = end["metrics_sha256"]  # logs written before run-end named every artifact
    problems: list[str] = []
    for name, expected in sorted(signed.items()):
        if Path(name).name != name:
            problems.append(f"run-end names {name!r}, which is not a file of the run folder: the log is malformed")
            continue
        file = folder / name
        if not file.is_file():
            problems.append(f"{file} is missing: run-end signed sha256 {str(expected)[:16]}... for it; restore the "
                            "run's original file")
            continue
        actual = file_sha256(file)
        if actual != expected:
            problems.append(f"{file} differs from what run-end signed: sha256 {actual[:16]}... on disk, "
                            f"{str(expected)[:16]}... in the log (the file was changed after the run); restore the "
                            "run's original file")
            continue
        result.artifacts_checked.append(name)
    for name in ARTIFACTS:
        if name not in signed and (folder / name).is_file():
            problems.append(f"{folder / name} is not signed: run-end names no hash for it (it was added or replaced "
                            "after the run); remove it or get the original run folder from the coordinator")
    plan_hash = entries[0]["data"].get("plan_sha256") if entries[0]["event"] == "run-start" else None
    if plan_hash and "plan.json" in result.artifacts_checked:
        # the file hash only shows the file is the one written; this shows it is the plan the sites approved
        try:
            written = plan_sha256(json.loads((folder / "plan.json").read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as exc:
            written = f"unreadable ({exc})"
        if written != plan_hash:
            problems.append(f"{folder / 'plan.json'} is run plan {written[:16]}..., but run-start says the run's plan "
                            f"is {plan_hash[:16]}...: it is not the plan the sites approved")
    return problems


def _required_receipts(entries: list[dict[str, Any]]) -> dict[str, set[tuple[str, str, int]]]:
    """Per site, every (fold, type, round) model the log says it received and answered for.

    round-train and round-evaluate list the sites that replied in that round; exact training's Newton
    queries and the trees' level queries (``gbt``) are no train messages, so their round-train needs no train
    receipt. A fold's external-validation
    (without error) means the held-out site scored the fold's last model."""
    training: dict[str, str] = {}
    last_round: dict[str, int] = {}
    required: dict[str, set[tuple[str, str, int]]] = {}
    for entry in entries:
        data, event = entry["data"], entry["event"]
        fold = _stream(data)
        if event == "model-init":
            training[fold] = str(data.get("training", "fedavg"))
        elif event == "round-train":
            last_round[fold] = int(data["round"])
            if training.get(fold, "fedavg") not in ("exact", "gbt"):  # their rounds are queries: no train receipt
                for site in data.get("sites") or {}:
                    required.setdefault(site, set()).add((fold, "train", int(data["round"])))
        elif event == "round-evaluate":
            for site in data.get("sites") or {}:
                required.setdefault(site, set()).add((fold, "evaluate", int(data["round"])))
        elif event == "external-validation" and not data.get("error"):  # every family of the fold was scored
            for stream in (s for s in last_round if s == fold or s.startswith(f"{fold}|")):
                required.setdefault(fold, set()).add((stream, "evaluate", last_round[stream]))
    return required


def _check_receipts(entries: list[dict[str, Any]], receipt_file: Path, result: Verification) -> list[str]:
    """What disagrees between a site's receipts file and the log; [] when every receipt of this run matches
    and the file covers every round the log says its site took part in."""
    run_id = entries[0]["data"].get("run_id")
    if not receipt_file.is_file():
        return [f"{receipt_file} does not exist: give the folder of a site that took part (its receipts are "
                "<output_dir>/receipts.jsonl)"]
    lines = receipt_file.read_text(encoding="utf-8").splitlines()
    if not any(line.strip() for line in lines):
        return [f"{receipt_file} is empty: it holds no receipt at all (receipts deleted, or not the site's file)"]
    sent = model_hashes(entries)
    problems: list[str] = []
    held: set[tuple[str, str, str, int]] = set()  # (site, fold, type, round) of this run's receipts
    sites: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            receipt = json.loads(line)
            if receipt.get("run_id") != run_id:
                continue
            key = (_stream(receipt), str(receipt["type"]), int(receipt["round"]))
            got = str(receipt["model_sha256"])
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            problems.append(f"{receipt_file} line {number} is not a receipt: the file was edited")
            continue
        site = str(receipt.get("site"))
        sites.add(site)
        held.add((site, *key))
        expected = sent.get(key)
        if expected != got:
            problems.append(f"receipt mismatch: {receipt_file} line {number}: site {site} received model "
                            f"{got[:16]}... for {key[1]} round {key[2]}, the log says "
                            f"{(expected or 'nothing')[:16]}...")
            continue
        result.receipts_checked += 1
    if not sites and not problems:
        return [f"{receipt_file} holds no receipt of run {run_id}: wrong site folder or receipts deleted"]
    required = _required_receipts(entries)
    for site in sorted(sites):
        missing = sorted((k for k in required.get(site, set()) if (site, *k) not in held),
                         key=lambda k: (k[0], k[2], k[1]))
        for fold, kind, rnd in missing[:MAX_MISSING_NAMED]:
            where = f" of the leave-one-site-out fold without {fold}" if fold else ""
            problems.append(f"{receipt_file}: site {site} has no receipt for {kind} round {rnd}{where} (the log says "
                            "it took part)")
        if len(missing) > MAX_MISSING_NAMED:
            problems.append(f"{receipt_file}: site {site} lacks {len(missing) - MAX_MISSING_NAMED} more receipt(s) "
                            f"({len(missing)} in all): lines were deleted")
    return problems
