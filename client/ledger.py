"""A site's release ledger: its permanent patient blocks and every case set it has ever released.

The guard (client.guard) consults it before any reply leaves: the reply's case sets, added to every set
the site released in any earlier run, must not single out a group of fewer than k patients
(``common.release.isolated_group``). Runs stay well inside that rule because a site only aggregates over
unions of whole blocks: each class's patients are cut once into blocks of k to 2k - 1 in an order keyed by
a secret that never leaves the site; a block is frozen the first time any of its patients is released,
and a frozen block is used whole or not at all.

Files, under ``<output_dir>/release/`` (never sent anywhere)::

    secret          32 random bytes (hex), created on first use; deleting it re-draws unfrozen blocks only
    ledger.json     frozen blocks and every released case set (case ids), with the first run that sent it
    releases.jsonl  one line per reply that left: run, message type, the sets by hash

A reply whose sets are all in ledger.json already, touching no block that is not frozen (every FedAvg or Newton
round after the first releases the training set again), teaches the ledger nothing: ledger.json is not rewritten and
its releases.jsonl line is appended without fsync, as the outbox line is. The guarantee rests on ledger.json: every
set a reply releases is in it, durably, before the reply leaves; the repeat's sets were put there by an earlier
reply. The reply is still checked in full first. ledger.json is parsed once and kept while its stamp is unchanged
(client.runcache), so a repeat costs neither a parse nor a write.

A ``query.batch`` (several folds' requests in one message, client.batch) is answered inside ``deferred()``: each
sub-reply is still checked on its own, against everything on disk PLUS the sets this batch already accepted (so
two folds whose case sets differ by one patient cannot both leave in one batch), and its sets are booked in
memory; the batch's ledger update, its releases.jsonl lines and its outbox lines are then written once, durably
(fsync), re-checked under the ledger's lock, before the batch's reply is handed to Flower. A refused sub-request
books nothing; a batch that fails before that write sends nothing and writes nothing.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from client import runcache
from client.sitefiles import append_lines, atomic_write
from common import release

LEDGER_SCHEMA = "radfed.release-ledger/1"
CLASS_NAMES = {1: "HGG", 0: "BM"}


class ReleaseRefused(RuntimeError):
    """A reply (or a run plan) that, with what the site released before, would single out patients."""


@dataclass
class Blocking:
    """This run's view of the site's blocks: block id -> (label, case ids), and the cases left out."""

    secret: bytes
    blocks: dict[str, tuple[int, list[str]]]
    left_out: dict[str, str] = field(default_factory=dict)  # case id -> why (plain words)

    @property
    def cases(self) -> set[str]:
        return {c for _, members in self.blocks.values() for c in members}

    def held_out(self, case_ids: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
        """(n,) bool over ``case_ids``: the cases of each class's held-out blocks."""
        held: set[str] = set()
        for label in CLASS_NAMES:
            ids = sorted(b for b, (lab, _) in self.blocks.items() if lab == label)
            for b in release.choose_held_out(self.secret, ids, test_fraction, seed):
                held.update(self.blocks[b][1])
        return np.array([c in held for c in case_ids], dtype=bool)

    def cv_folds(self, case_ids: Sequence[str], folds: int, seed: int, repeats: int = 1) -> np.ndarray:
        """(repeats, n) int over ``case_ids``: each case's cross-validation fold in each repeat (its whole block's),
        stratified by class."""
        out = np.full((repeats, len(case_ids)), -1, dtype=np.int64)
        for r in range(repeats):
            fold: dict[str, int] = {}
            for label in CLASS_NAMES:
                ids = sorted(b for b, (lab, _) in self.blocks.items() if lab == label)
                for b, v in release.assign_folds(self.secret, ids, folds, seed, r).items():
                    fold.update({c: v for c in self.blocks[b][1]})
            out[r] = [fold.get(c, -1) for c in case_ids]
        return out

    def n_blocks(self, label: int) -> int:
        return sum(1 for lab, _ in self.blocks.values() if lab == label)


@functools.lru_cache(maxsize=1024)  # every round declares the same few sets again
def _set_key(members: frozenset[str]) -> str:
    return hashlib.sha256("\n".join(sorted(members)).encode()).hexdigest()


class Ledger:
    """The release ledger in ``folder`` (``<output_dir>/release``); ``k`` is the site's own minimum."""

    def __init__(self, folder: Path, k: int) -> None:
        self.folder, self.k = folder, k

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def seed_secret(self, secret: bytes) -> None:
        """Set the secret unless one exists: for synthetic demo sites only, so their splits are reproducible
        (a real site's secret is random and never leaves it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.folder / "secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as fh:
            fh.write(secret.hex())

    @property
    def secret(self) -> bytes:
        path = self.folder / "secret"
        if not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
        return bytes.fromhex(path.read_text().strip())

    def _read(self) -> dict:
        """The ledger on disk."""
        path = self.folder / "ledger.json"
        if not path.exists():
            return {"schema": LEDGER_SCHEMA, "blocks": {}, "sets": {}}
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ReleaseRefused(f"the release ledger {path} is damaged ({exc.msg}); restore it from the site's "
                                 "backup: without it the site cannot know what it released before") from None
        if not isinstance(doc, dict) or doc.get("schema") != LEDGER_SCHEMA:
            raise ReleaseRefused(f"{path} is not a radfed release ledger ({LEDGER_SCHEMA}); restore it from backup")
        return doc

    @property
    def files(self) -> tuple[Path, Path]:
        """What the blocks are drawn from: ``ledger.json`` (frozen blocks) and ``secret`` (the order of the rest)."""
        return self.folder / "ledger.json", self.folder / "secret"

    def _snapshot(self) -> _Snapshot:
        """The ledger on disk, parsed once and kept until ``ledger.json`` changes (client.runcache stamps it on every
        call); read only: a change is always made on a fresh read under the lock."""
        path = self.folder / "ledger.json"

        def make() -> _Snapshot:
            doc = self._read()
            sets = [frozenset(e["cases"]) for e in doc["sets"].values()]
            return _Snapshot(doc, sets, frozenset(doc["sets"]))

        return runcache.remember("ledger", str(path), make, lambda _: [path])

    def _pending(self) -> _Pending | None:
        """This ledger's share of the batch being answered (read from disk at its first use), or None outside one."""
        book = _BOOK.get()
        if book is None:
            return None
        key = str(runcache.resolved(self.folder))
        if key not in book.ledgers:
            doc = self._read()
            sets = [frozenset(e["cases"]) for e in doc["sets"].values()]
            book.ledgers[key] = _Pending(self, doc, sets, set(sets))
        return book.ledgers[key]

    def load(self) -> dict:
        """The ledger: on disk, and inside a batch with the sets its earlier sub-replies released."""
        pending = self._pending()
        return pending.doc if pending is not None else self._snapshot().doc

    def frozen_blocks(self) -> int:
        """How many blocks are frozen (inside a batch, with the batch's): blocks are only ever added, so within one
        look at the site an unchanged number means unchanged blocks (client.steps keeps a batch's split by it)."""
        return len(self.load()["blocks"])

    def released_sets(self) -> list[frozenset[str]]:
        pending = self._pending()
        if pending is not None:
            return pending.sets
        return list(self._snapshot().sets)

    def blocking(self, case_ids: Sequence[str], labels: np.ndarray) -> Blocking:
        """Blocks over these usable cases: frozen blocks whose every patient is usable, then the remaining
        patients of each class cut into new blocks of k to 2k - 1 in the secret order. Patients of a frozen
        block that lost a member, and the few left over when a class has fewer than k new patients, are
        left out (named with why)."""
        secret = self.secret
        label_of = dict(zip(case_ids, (int(v) for v in labels), strict=True))
        blocks: dict[str, tuple[int, list[str]]] = {}
        left_out: dict[str, str] = {}
        taken: set[str] = set()
        for bid, entry in self.load()["blocks"].items():
            members = list(entry["cases"])
            taken.update(members)
            missing = [c for c in members if c not in label_of or label_of[c] != int(entry["label"])]
            if missing:
                for c in members:
                    if c in label_of:
                        left_out[c] = (f"its release block was sent in an earlier run together with {len(missing)} "
                                       "case(s) not usable now; sending the rest would let the two runs be "
                                       "subtracted")
            else:
                blocks[bid] = (int(entry["label"]), members)
        for label, name in CLASS_NAMES.items():
            fresh = [c for c in case_ids if label_of[c] == label and c not in taken]
            cut = release.make_blocks(release.keyed_order(secret, fresh, "blocks"), self.k)
            for members in cut:
                blocks[release.block_id(secret, members)] = (label, members)
            placed = {c for members in cut for c in members}
            for c in fresh:
                if c not in placed:
                    left_out[c] = (f"waits for {self.k} new {name} cases to form a release block of its own "
                                   f"(k = {self.k})")
        return Blocking(secret, blocks, left_out)

    def check(self, sets: Mapping[str, frozenset[str]]) -> str:
        """'' when releasing ``sets`` keeps the invariant with everything released before, else why not."""
        pending = self._pending()
        if pending is not None:  # in a batch: the set of what it holds is kept with the list (not rebuilt per reply)
            return _why(pending.sets, sets, self.k, pending.known)
        return _why(self.released_sets(), sets, self.k)

    def record(self, run_id: int, message_type: str, sets: Mapping[str, frozenset[str]],
               blocking: Blocking | None) -> None:
        """Add the sets to the ledger and freeze every block any of them touches (inside a batch: in memory, written
        with the batch's other sub-replies' by ``Book.write``)."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        pending = self._pending()
        if pending is not None:
            keys = _apply(pending.doc, run_id, message_type, sets, blocking, now)
            for members in sets.values():
                if members and members not in pending.known:
                    pending.known.add(members)
                    pending.sets.append(members)
            pending.records.append((run_id, message_type, dict(sets), blocking, now))
            line_key = (now, run_id, message_type, tuple(sorted(keys.items())))
            line = pending.line_of.get(line_key)
            if line is None:  # a batch's folds mostly release the same sets in the same second: the same line
                line = pending.line_of[line_key] = _release_line(now, run_id, message_type, keys)
            pending.lines.append(line)
            return
        known = self._snapshot()
        if not _learns(known, sets, blocking):  # every set and block already on disk: ledger.json stays as it is
            keys = {name: _set_key(members) for name, members in sets.items() if members}
            append_lines(self.folder / "releases.jsonl", [_release_line(now, run_id, message_type, keys)])
            return
        with self._locked():
            doc = self._read()
            keys = _apply(doc, run_id, message_type, sets, blocking, now)
            atomic_write(self.folder / "ledger.json", json.dumps(doc, indent=1, sort_keys=True), durable=True)
            append_lines(self.folder / "releases.jsonl", [_release_line(now, run_id, message_type, keys)],
                         durable=True)

    def _write_pending(self, pending: _Pending) -> bool:
        """A batch's releases in one durable write, checked again under the lock against the ledger as it is now
        (another run on the same site may have released since the batch first read it). True when ledger.json was
        rewritten (the batch released a set or froze a block it did not hold), False for a batch of repeats."""
        with self._locked():
            doc = self._read()
            every = {f"{i}:{name}": members for i, (_, _, sets, _, _) in enumerate(pending.records)
                     for name, members in sets.items()}
            why = _why([frozenset(e["cases"]) for e in doc["sets"].values()], every, self.k)
            if why:
                raise ReleaseRefused(f"this batch's replies, checked again before they leave: {why}")
            new = any(_learns(_Snapshot(doc, [], frozenset(doc["sets"])), sets, blocking)
                      for _, _, sets, blocking, _ in pending.records)
            if not new:  # a batch of repeats: ledger.json stays as it is, the lines are appended (as in record)
                append_lines(self.folder / "releases.jsonl", pending.lines)
                return False
            for run_id, message_type, sets, blocking, now in pending.records:
                _apply(doc, run_id, message_type, sets, blocking, now)
            atomic_write(self.folder / "ledger.json", json.dumps(doc, indent=1, sort_keys=True), durable=True)
            append_lines(self.folder / "releases.jsonl", pending.lines, durable=True)
            return True


def _why(before: list[frozenset[str]], sets: Mapping[str, frozenset[str]], k: int,
         known: set[frozenset[str]] | None = None) -> str:
    """'' when ``sets`` added to the ``before`` releases single out no group of fewer than k patients (``known``:
    ``set(before)``, when the caller keeps it)."""
    known = set(before) if known is None else known
    new = {str(name): s for name, s in sets.items() if s and s not in known}
    if not new:
        return ""
    found = release.isolated_group([*before, *new.values()], k)
    if found is None:
        return ""
    n = len(found.patients)
    if not found.proven:
        return (f"the site cannot rule out that {', '.join(sorted(new))} together with its {len(before)} earlier "
                f"release(s) single out fewer than k = {k} patients (too many small groups to check)")
    return (f"{', '.join(sorted(new))} together with the site's {len(before)} earlier release(s) would single "
            f"out {n} patient{'s' if n != 1 else ''} (fewer than k = {k}): subtracting the sums of two "
            "releases whose case sets differ by so few patients recovers their values")


def _learns(known: _Snapshot, sets: Mapping[str, frozenset[str]], blocking: Blocking | None) -> bool:
    """Whether recording ``sets`` would change the ledger ``known``: a set it does not hold, or a block they touch
    that is not frozen yet (what ``_apply`` would add)."""
    if any(members and _set_key(members) not in known.keys for members in sets.values()):
        return True
    touched = frozenset().union(*sets.values()) if sets else frozenset()
    blocks = known.doc["blocks"]
    return any(bid not in blocks and touched.intersection(members)
               for bid, (_, members) in (blocking.blocks.items() if blocking else ()))


def _apply(doc: dict, run_id: int, message_type: str, sets: Mapping[str, frozenset[str]], blocking: Blocking | None,
           now: str) -> dict[str, str]:
    """Add the sets (first sender kept) and the blocks they touch to the ledger ``doc``; the sets' keys by name."""
    keys = {}
    for name, members in sets.items():
        if not members:
            continue
        key = keys[name] = _set_key(members)
        doc["sets"].setdefault(key, {"cases": sorted(members), "first_run": run_id, "first_message": message_type,
                                     "first_set": name, "first_time": now})
    touched = frozenset().union(*sets.values()) if sets else frozenset()
    for bid, (label, members) in (blocking.blocks.items() if blocking else ()):
        if bid not in doc["blocks"] and touched.intersection(members):
            doc["blocks"][bid] = {"label": label, "cases": sorted(members), "frozen": now}
    return keys


def _release_line(now: str, run_id: int, message_type: str, keys: dict[str, str]) -> str:
    return json.dumps({"time": now, "run_id": run_id, "type": message_type, "sets": keys}, sort_keys=True) + "\n"


@dataclass(frozen=True)
class _Snapshot:
    """The ledger as read from disk (never changed in place): the document, its released sets and their keys."""

    doc: dict
    sets: list[frozenset[str]]
    keys: frozenset[str]


@dataclass
class _Pending:
    """One ledger's releases in the batch being answered: the ledger as read at its first use with the batch's
    accepted sets added (``doc``, ``sets``), and what to write (``records``, ``lines`` for releases.jsonl)."""

    ledger: Ledger
    doc: dict
    sets: list[frozenset[str]]
    known: set[frozenset[str]]
    records: list[tuple[int, str, dict[str, frozenset[str]], Blocking | None, str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    line_of: dict[tuple, str] = field(default_factory=dict)  # releases.jsonl lines made in this batch, by content


@dataclass
class Book:
    """What a batch releases, kept until its reply is ready: per ledger folder its releases, per file (the outbox)
    the lines to append."""

    ledgers: dict[str, _Pending] = field(default_factory=dict)
    appends: dict[Path, list[str]] = field(default_factory=dict)

    def write(self) -> None:
        """Every ledger first (what the site released must be known before it leaves), then the outbox lines, each
        in one write; durable (fsync) when a ledger learned something. A batch of repeats only (every Newton round
        after a fold's first: sets and blocks the ledger already holds) writes its outbox lines as a single reply of
        repeats does, without fsync (the guarantee rests on ledger.json, which then already holds every set: docs/
        privacy.md, "The ledger in a batch"; one fsync per site and round was ~6 ms of a batch's wall time).
        Raises when a ledger, checked again, refuses: nothing of the batch may leave."""
        learned = False
        for pending in self.ledgers.values():
            if pending.records:
                learned = pending.ledger._write_pending(pending) or learned
        for path, lines in self.appends.items():
            append_lines(path, lines, durable=learned)


_BOOK: ContextVar[Book | None] = ContextVar("radfed_release_book", default=None)


@contextmanager
def deferred() -> Iterator[Book]:
    """Answer a batch: the ledgers and appends of the block are kept in the yielded Book until ``Book.write``
    (by the caller, once the reply is ready); if the block raises, nothing of it is written."""
    book = Book()
    token = _BOOK.set(book)
    try:
        yield book
    finally:
        _BOOK.reset(token)


def in_batch() -> bool:
    """Whether a batch is being answered (its releases booked in memory, ``deferred``)."""
    return _BOOK.get() is not None


def append_line(path: Path, line: str) -> None:
    """Append a line to a site file (the outbox): now, or inside a batch with the batch's release (``Book.write``)."""
    book = _BOOK.get()
    if book is None:
        append_lines(path, [line])
    else:
        book.appends.setdefault(path, []).append(line)


@dataclass
class Declaration:
    """What a handler aggregated over: named case sets (e.g. ``train``, ``train-hgg``, ``train|sex=M``), which
    of them each count key of the reply counts, and the blocking they were drawn from."""

    sets: dict[str, frozenset[str]]
    counts: dict[str, str]
    blocking: Blocking | None


# Handlers declare the case sets behind a reply here; the guard takes them (same process, same message).
_DECLARED: dict[str, Declaration] = {}


def declare(message_id: str, declaration: Declaration) -> None:
    _DECLARED[message_id] = declaration


def take(message_id: str) -> Declaration | None:
    return _DECLARED.pop(message_id, None)
