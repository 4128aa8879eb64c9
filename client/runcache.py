"""What a node's process keeps between messages, so a site is loaded, checked and hashed once per run rather than
once per message (before, every message re-read the manifest, re-hashed the inputs, re-parsed every cache entry,
rewrote the feature table and recomputed the run plan: over 70% of a site's CPU in training rounds).

Every entry remembers the files it was made from and a stamp of each (inode, size, mtime_ns, ctime_ns; "absent"
when missing). A lookup re-stamps them (a few stat calls per case) and recomputes when any stamp differs, so a
changed, replaced, removed or newly created input is read again by the next message: the site sees what is on
disk, as when it reloaded every message. Files written while an entry was being made are not trusted (their
stamp may predate the last write): such an entry is used once and made again next time.

Only the node's own process holds it (nothing is written or sent). In a deployment where Flower starts a fresh
ClientApp process per message it is simply empty each time, and the site loads as before.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
Stamp = tuple[int, int, int, int] | None
SETTLE_NS = 1_000_000_000  # a file changed less than 1 s before its entry was made is not trusted
MAX_ENTRIES = 4096  # a long-lived process serving many sites and runs drops its oldest entries beyond this

_ENTRIES: dict[tuple[str, Hashable], tuple[tuple[Path, ...], tuple[Stamp, ...], object]] = {}
_LOCK = threading.Lock()


def stamp(path: Path) -> Stamp:
    """(inode, size, mtime_ns, ctime_ns) of a file or folder, None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def stamps(paths: Iterable[Path]) -> tuple[Stamp, ...]:
    return tuple(stamp(p) for p in paths)


def remember(kind: str, key: Hashable, make: Callable[[], T], watch: Callable[[T], Iterable[Path]]) -> T:
    """``make()``'s value for ``key``, made again whenever a file ``watch(value)`` names has changed since.

    ``kind`` separates what is kept (a site's features, a run plan, approvals); errors are not kept (the next
    message tries again and raises again with the current files)."""
    with _LOCK:
        entry = _ENTRIES.get((kind, key))
    if entry is not None:
        paths, before, value = entry
        if stamps(paths) == before:
            return value  # type: ignore[return-value]
    started = time.time_ns()
    value = make()
    paths = tuple(watch(value))
    now = stamps(paths)
    settled = all(s is None or max(s[2], s[3]) < started - SETTLE_NS for s in now)
    with _LOCK:
        if settled:
            _ENTRIES.pop((kind, key), None)
            _ENTRIES[(kind, key)] = (paths, now, value)  # newest last: the oldest leave first
            while len(_ENTRIES) > MAX_ENTRIES:
                del _ENTRIES[next(iter(_ENTRIES))]
        else:
            _ENTRIES.pop((kind, key), None)
    return value


def clear() -> None:
    """Forget everything: the next message of any run loads its site again (benchmarks, tests)."""
    with _LOCK:
        _ENTRIES.clear()
