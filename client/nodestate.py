"""What a node keeps for a run besides Flower's ``context.state``: the large things a run fixes once (agreed name
lists, each cohort's fitted ComBat parameters, cross-validation's out-of-fold scores), kept by the sha256 of their
bytes in the site's own run folder (``<output_dir>/run-state/run-<run id>/<sha256>``) and in this process's memory;
``context.state`` holds only the hashes.

Why: Flower ships a node's whole Context with every message, to the ClientApp and back (simulation: pickled to the
Ray actor and returned, flwr/server/superlink/fleet/vce/backend/raybackend.py; deployment: from the SuperNode to the
ClientApp process). A radfed site's state was ~80 KB in training rounds (the ~860 agreed names 42 KB, the ComBat
parameters 35 KB), one more 35 KB per leave-one-site-out fold; the trivial ClientApp's is empty.

Correct wherever a message runs: memory only saves reading the file again. A message on another Ray actor, or after
a restart, reads the file; a file is used only when its bytes hash to the name the state holds, so a changed or
cut file is refused (restart the run), and a node reads only its own site's folder. Nothing here is ever sent; a
run's folder is not needed once the run has ended (prediction reads ``harmonization/run-<id>.json``), so a run's
first write removes the folders last written more than 7 days before (``prune``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, RecordDict

from client import runcache
from client.site import SiteError, work_dir
from client.steps import locate_site, run_config

MEMORY_BYTES = 128 * 2 ** 20  # a process keeps up to this much, the least recently used leave first (read again)
MAX_WRITTEN = 100_000
KEEP_SECONDS = 7 * 24 * 3600  # a run's folder outlives its last write by this much (runs last hours)

_MEMORY: OrderedDict[str, bytes] = OrderedDict()
_WRITTEN: set[tuple[str, str]] = set()  # (folder, sha256) known on disk: a put of the same bytes skips the stat
_FOLDERS: set[str] = set()  # run folders this process made or found (a folder removed under it: restart the run)
_LOCK = threading.Lock()
_held = [0]  # bytes in _MEMORY


@dataclass(frozen=True)
class NodeState:
    """A node's run state: Flower's ``state`` (small records, hashes) and ``folder``, where the run's blobs are."""

    state: RecordDict
    folder: Path

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Keep ``data``; returns its sha256 (pass ``digest`` when the caller has just computed it)."""
        digest = digest or hashlib.sha256(data).hexdigest()
        _remember(digest, data)
        folder = str(self.folder)
        if (folder, digest) in _WRITTEN:
            return digest
        path = os.path.join(folder, digest)  # str paths: a 48-site run writes ~2,300 fold blobs per site process
        if not os.path.exists(path):
            if folder not in _FOLDERS:  # once per process and run folder, not per blob
                if not self.folder.exists():  # a run's first blob here: older runs' folders go (nothing reads them)
                    prune(self.folder.parent, keep=self.folder)
                self.folder.mkdir(parents=True, exist_ok=True)
                with _LOCK:
                    _FOLDERS.add(folder)
            part = os.path.join(folder, f".{digest}.{os.getpid()}.{threading.get_ident()}")
            with open(part, "wb") as fh:
                fh.write(data)
            os.replace(part, path)  # whole or absent: a crash never leaves half a file under the name
        with _LOCK:
            if len(_WRITTEN) >= MAX_WRITTEN:  # a long-lived process serving many runs: stat again, rather than grow
                _WRITTEN.clear()
            _WRITTEN.add((folder, digest))
        return digest

    def has(self, digest: str) -> bool:
        """Whether this process wrote (or found) ``digest`` in the node's run folder: a caller may then name it
        without building its bytes again (e.g. the same ~860-name list each fold agrees)."""
        with _LOCK:
            return (str(self.folder), digest) in _WRITTEN

    def get(self, digest: str, what: str) -> bytes:
        """The bytes kept as ``digest``; ``what`` names them in the refusal when they are missing or changed."""
        with _LOCK:
            data = _MEMORY.get(digest)
            if data is not None:
                _MEMORY.move_to_end(digest)
                return data
        path = self.folder / digest
        try:
            data = path.read_bytes()
        except OSError:
            raise SiteError(f"this site no longer holds the {what} it agreed in this run ({path} is missing); "
                            "restart the run") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise SiteError(f"the {what} this site agreed in this run changed on disk ({path} does not match its "
                            "hash); restart the run")
        _remember(digest, data)
        return data


def _remember(digest: str, data: bytes) -> None:
    with _LOCK:
        if digest in _MEMORY:
            _MEMORY.move_to_end(digest)
            return
        _MEMORY[digest] = data
        _held[0] += len(data)
        while _held[0] > MEMORY_BYTES and len(_MEMORY) > 1:
            _held[0] -= len(_MEMORY.popitem(last=False)[1])


def prune(parent: Path, keep: Path, now: float | None = None) -> list[Path]:
    """Remove the ``run-*`` folders under ``parent`` (but ``keep``) last written more than KEEP_SECONDS ago: a
    run's state is read only during the run, and a site would otherwise keep every run's folder for ever.
    Returns what was removed."""
    now = time.time() if now is None else now
    gone = []
    for folder in parent.glob("run-*") if parent.is_dir() else []:
        try:
            old = folder != keep and folder.is_dir() and now - folder.stat().st_mtime > KEEP_SECONDS
        except OSError:
            continue  # another process removed it first
        if old:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


def of(context: Context) -> NodeState:
    """The run state of the node answering ``context`` (its site's run folder found once per message)."""
    def make() -> NodeState:
        site = locate_site(context.node_config, run_config(context.run_config))
        return NodeState(context.state, work_dir(site) / "run-state" / f"run-{context.run_id}")

    return runcache.in_look(("node-state", id(context)), context, make)


def clear() -> None:
    """Forget what this process holds (as a fresh process, or another Ray actor, would): benchmarks, tests."""
    with _LOCK:
        _MEMORY.clear()
        _WRITTEN.clear()
        _FOLDERS.clear()
        _held[0] = 0
