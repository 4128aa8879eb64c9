"""What a node's process keeps between messages, so a site is loaded, checked and hashed once per run rather than
once per message (before, every message re-read the manifest, re-hashed the inputs, re-parsed every cache entry,
rewrote the feature table and recomputed the run plan: over 70% of a site's CPU in training rounds).

Every entry remembers the files it was made from and a stamp of each (inode, size, mtime_ns, ctime_ns; "absent"
when missing). A lookup re-stamps them (a few stat calls per case) and recomputes when any stamp differs, so a
changed, replaced, removed or newly created input is read again by the next message: the site sees what is on
disk, as when it reloaded every message. Files written while an entry was being made are not trusted (their
stamp may predate the last write): such an entry is used once and made again next time.

Inside ``one_look()`` (every message: ``look_mod``; a whole ``query.batch``: client.batch) each entry is stamped once:
the first lookup of the message or batch checks its files, its later lookups (the approval check, the handler and
the guard each ask for the site's settings; a batch's dozens of folds) trust that look and see the same files, so
the message is answered from one consistent state of the site; a change lands in the next message.

Only the node's own process holds it (nothing is written or sent). In a deployment where Flower starts a fresh
ClientApp process per message it is simply empty each time, and the site loads as before.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TypeVar

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

T = TypeVar("T")
Stamp = tuple[int, int, int, int] | None
# A file changed shortly before its entry was made is not trusted: a second write within the same tick of its file
# system's clock would leave its stamp as it was. A stamp with a fraction of a second comes from a file system that
# keeps the kernel's clock (Linux: one tick, 1 to 10 ms); whole seconds may come from one that counts seconds (ext3,
# HFS+) or two (FAT). Before stop 42 every file waited 1 s: the demo's last site, extracted just before its run's
# first message, was loaded again on each message of the run's first second (11 loads instead of one).
SETTLE_NS = 2_000_000_000  # a stamp in whole seconds
SETTLE_FINE_NS = 50_000_000  # a stamp with a fraction of a second: five of the coarsest kernel ticks
# a long-lived process serving many sites and runs drops its oldest entries beyond this. A simulation worker serves
# every site (Ray hands any node's message to any worker), about 5 entries each (site, split, settings, ledger,
# approvals): at 4,096 a 1,000-site run's workers evicted in a cycle and reloaded sites from disk (~72 ms each; the
# correlation round's CPU per site 2.3x the 300-site run's: docs/performance.md, "bench_scale")
MAX_ENTRIES = 65536

_ENTRIES: dict[tuple[str, Hashable], tuple[tuple[str, ...], tuple[Stamp, ...], object]] = {}
_LOCK = threading.Lock()
# the entries already stamped in this look (one query.batch), or None outside one
_LOOKED: ContextVar[set[tuple[str, Hashable]] | None] = ContextVar("radfed_runcache_look", default=None)
_RESOLVED: ContextVar[dict[str, Path] | None] = ContextVar("radfed_runcache_resolved", default=None)
# what one look works out once and its later lookups reuse (the parsed run config, a batch's split), or None outside
_MEMO: ContextVar[dict[Hashable, tuple[object, object]] | None] = ContextVar("radfed_runcache_memo", default=None)


@contextmanager
def one_look() -> Iterator[None]:
    """Stamp each entry's files at most once until the block ends (nested blocks share the outer look)."""
    if _LOOKED.get() is not None:
        yield
        return
    token, paths, memo = _LOOKED.set(set()), _RESOLVED.set({}), _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(memo)
        _RESOLVED.reset(paths)
        _LOOKED.reset(token)


def in_look(key: Hashable, source: object, make: Callable[[], T]) -> T:
    """``make()``, worked out once per look for ``key`` made from the object ``source`` (kept, so the same object is
    asked for, not a new one at a reused id), every time outside a look. Only for values that cannot change within
    one message or batch (Flower does not change a message's run config while it is answered)."""
    memo = _MEMO.get()
    if memo is None:
        return make()
    kept = memo.get(key)
    if kept is not None and kept[0] is source:
        return kept[1]  # type: ignore[return-value]
    value = make()
    memo[key] = (source, value)
    return value


def look_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod (the outermost): one look per message, so the approval check, the handler and the guard, which
    each ask for the site's settings, plan and ledger, stamp their files once and see the same state of the site
    (as a batch's sub-requests do); a change lands in the next message."""
    with one_look():
        return call_next(msg, context)


def resolved(path: str | Path) -> Path:
    """``path`` expanded and resolved (symlinks followed): once per look, every time outside one."""
    memo = _RESOLVED.get()
    if memo is None:
        return Path(path).expanduser().resolve()
    key = str(path)
    if key not in memo:
        memo[key] = Path(path).expanduser().resolve()
    return memo[key]


def stamp(path: str | Path) -> Stamp:
    """(inode, size, mtime_ns, ctime_ns) of a file or folder, None when it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def has_settled(mark: Stamp, before_ns: int) -> bool:
    """Whether a file with stamp ``mark`` (None: absent) had not changed for its settling time (``SETTLE_FINE_NS``,
    or ``SETTLE_NS`` for a stamp in whole seconds) before ``before_ns`` (time.time_ns())."""
    if mark is None:
        return True
    changed = max(mark[2], mark[3])
    coarse = mark[2] % 1_000_000_000 == 0 and mark[3] % 1_000_000_000 == 0
    return changed < before_ns - (SETTLE_NS if coarse else SETTLE_FINE_NS)


def stamps(paths: Iterable[str | Path]) -> tuple[Stamp, ...]:
    return tuple(stamp(p) for p in paths)


def remember(kind: str, key: Hashable, make: Callable[[], T], watch: Callable[[T], Iterable[Path]],
             valid: Callable[[T], bool] | None = None) -> T:
    """``make()``'s value for ``key``, made again whenever a file ``watch(value)`` names has changed since, or
    (``valid``) when the kept value no longer fits what the caller holds (e.g. made from an older object).

    ``kind`` separates what is kept (a site's features, a run plan, approvals); errors are not kept (the next
    message tries again and raises again with the current files)."""
    looked = _LOOKED.get()
    with _LOCK:
        entry = _ENTRIES.get((kind, key))
    if entry is not None and valid is not None and not valid(entry[2]):  # type: ignore[arg-type]
        entry = None
    if entry is not None:
        paths, before, value = entry
        if looked is not None and (kind, key) in looked:
            return value  # type: ignore[return-value]  # stamped earlier in this look
        if stamps(paths) == before:
            if looked is not None:
                looked.add((kind, key))
            return value  # type: ignore[return-value]
    started = time.time_ns()
    value = make()
    paths = tuple(map(os.fspath, watch(value)))  # kept as text: a site's ~10 files per case are stamped every message
    now = stamps(paths)
    settled = all(has_settled(s, started) for s in now)
    with _LOCK:
        if settled:
            _ENTRIES.pop((kind, key), None)
            _ENTRIES[(kind, key)] = (paths, now, value)  # newest last: the oldest leave first
            while len(_ENTRIES) > MAX_ENTRIES:
                del _ENTRIES[next(iter(_ENTRIES))]
            if looked is not None:
                looked.add((kind, key))
        else:
            _ENTRIES.pop((kind, key), None)
    return value


def clear() -> None:
    """Forget everything: the next message of any run loads its site again (benchmarks, tests)."""
    with _LOCK:
        _ENTRIES.clear()
