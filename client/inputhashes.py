"""sha256 of a case's input files (what the feature cache is keyed by and duplicate patients are found by), once per
file version, and remembered across processes in the site's ``input-hashes.json`` (in its output_dir).

A file version is its path and stamp (inode, size, mtime_ns, ctime_ns): any write changes mtime and ctime, a
replaced file has another inode, and ctime cannot be set back from user space, so a changed file always gets a
new stamp and is hashed again. Within a process this saved re-hashing per message; kept in the site's output_dir
it also spares each new process (every simulation worker, at its first message of every run) re-hashing every
image and mask of the site (the demo's 4 sites: 680 files, 0.3-0.8 s per worker on the 2-core machine), while a
changed file is still noticed: its stamp is not in the file. As with ``client.runcache``, a hash is kept only when
the file had settled before it was hashed (``runcache.has_settled``: a write in the same clock tick as the hash
could otherwise leave the stamp as it was). The file is local, never sent, and only ever read as a hint keyed by stamps.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from client import runcache
from client.site import Case, Site
from client.sitefiles import write_unless_same
from common.canon import file_sha256

SCHEMA = "radfed.input-hashes/1"
Key = tuple[str, int, int, int, int]

_HASHES: dict[Key, str] = {}  # one hash per file version per process
_TRUSTED: set[Key] = set()  # hashed after the file had settled (or read from a site's file): may be written out
_LOADED: dict[str, tuple[int, int, int, int] | None] = {}  # each site's file as last read in this process
_LOCK = threading.Lock()


def _key(path: Path) -> Key:
    st = path.stat()
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns  # ctime: any rewrite


def file_hash(path: Path) -> str:
    """file_sha256, once per file version (in this process, or recorded in a site's file read by ``recall``)."""
    key = _key(path)
    known = _HASHES.get(key)
    if known is not None:
        return known
    started = time.time_ns()
    digest = file_sha256(path)
    with _LOCK:
        _HASHES[key] = digest
        if runcache.has_settled(key[1:], started) and _key(path) == key:
            _TRUSTED.add(key)
    return digest


def input_sha256(path: Path) -> str:
    """sha256 of a volume: the file, or for a DICOM series folder every file's relative name and hash."""
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return file_hash(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()}\0{file_sha256(item)}\n".encode())
    return "dir:" + digest.hexdigest()


def input_hashes(case: Case, label_map: Mapping[int, str] | None = None) -> dict[str, str]:
    """What a case's cache entry is keyed by: each image's and the mask's sha256 (and the label map)."""
    paths = {**{seq: p for seq, p in case.images.items()}, "mask": case.mask}
    hashes = {key: input_sha256(p) for key, p in paths.items()}
    if label_map is not None:  # the same mask under another map gives other regions
        hashes["label_map"] = json.dumps({str(k): v for k, v in sorted(label_map.items())})
    return hashes


def recall(site: Site) -> None:
    """Read the hashes the site recorded (once per version of its file per process); a missing or damaged file
    only means hashing again."""
    path = site.files.input_hashes
    now = runcache.stamp(path)
    if now is None or _LOADED.get(str(path)) == now:
        return
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        rows = doc["files"] if isinstance(doc, dict) and doc.get("schema") == SCHEMA else []
        known = {(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])): str(r[5]) for r in rows
                 if isinstance(r, list) and len(r) == 6 and isinstance(r[5], str) and len(r[5]) == 64}
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    with _LOCK:
        for key, digest in known.items():
            _HASHES.setdefault(key, digest)
            _TRUSTED.add(key)
        _LOADED[str(path)] = now


def record(site: Site, files: Iterable[Path]) -> None:
    """Write the settled hashes of ``files`` (the site's current inputs) to the site's file, unless it holds them
    already: a file that changed since is left out, so the file never lists an outdated version."""
    rows = []
    for path in files:
        try:
            key = _key(path)
        except OSError:
            continue
        if key in _TRUSTED and key in _HASHES:
            rows.append([*key, _HASHES[key]])
    target = site.files.input_hashes
    target.parent.mkdir(parents=True, exist_ok=True)
    if write_unless_same(target, json.dumps({"schema": SCHEMA, "files": sorted(rows)}, separators=(",", ":"))):
        with _LOCK:
            _LOADED[str(target)] = runcache.stamp(target)
