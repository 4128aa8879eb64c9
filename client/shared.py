"""What a ``query.batch``'s sub-requests of one type share, worked out once per (type, batch).

A batch carries one request per fold the site belongs to (47 at 48 sites), mostly of one type, and each goes through
its handler on its own (client.batch). The handler's inputs that do not depend on the fold, such as the ~860-name
feature list every fold's moments request carries (copied and hashed: ~40 us per request), are the same object of
work for all of them: ``once`` makes such a value for the first sub-request of a type and hands it to the later ones
of that type in the same batch, if it fits their own input (the caller checks it: e.g. the list sent equals the
one checked). Outside a batch (one message) it makes the value every time: one implementation for both paths.

Only inputs are shared: every sub-request still has its own fold's work, DP noise, guard check, ledger check (with
the batch's earlier sub-replies) and outbox line, in the order sent. An error is not kept: the next sub-request that
asks makes it again and raises again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from flwr.app import Message

T = TypeVar("T")
_SHARED: ContextVar[dict[Hashable, object] | None] = ContextVar("radfed_batch_shared", default=None)


@contextmanager
def batch_scope() -> Iterator[None]:
    """Share values between the sub-requests answered inside the block (one ``query.batch``)."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def once(msg: Message, what: str, key: Hashable, make: Callable[[], T], fits: Callable[[T], bool]) -> T:
    """``make()`` for ``(what, key)``, once per type of ``msg`` and batch: a later sub-request of the same type gets
    the kept value when ``fits(value)`` holds for it (else it is made again, and kept for the ones after). Every time
    outside a batch."""
    memo = _SHARED.get()
    if memo is None:
        return make()
    slot = (msg.metadata.message_type, what, key)
    if slot in memo:
        kept: T = memo[slot]  # type: ignore[assignment]
        if fits(kept):
            return kept
    value = make()
    memo[slot] = value
    return value
