"""Waiting for replies without Flower's fixed 3-second nap.

In a deployment, Flower 1.42 gives the ServerApp an ``HttpGrid`` (flwr/superlink/grid/http_grid.py) whose
``send_and_receive`` pulls the replies once right after pushing, then sleeps 3 s between pulls. The sites need well
under a second per query, so every round trip of a deployed run cost 3 s (6 s if a reply just missed a pull): the
main run's ~20 round trips and the folds' ~15 waited well over a minute. (Flower's simulation runs the ServerApp
on an ``InMemoryGrid``, which pulls every 0.1 s.) ``PollingGrid`` pushes and pulls through the same grid's
``push_messages`` / ``pull_messages``, sleeping 10 ms after the first empty pull, growing by half each time up to
0.1 s: a quick query returns within tens of milliseconds, and a slow one costs a pull every 0.1 s, as the
simulation's grid does. A pull that brings replies while others are pending starts the pauses again from 10 ms: the
sites answer a batch within a short span, so the rest are likely close behind, and a batch whose last reply landed
just after a pull no longer waits for the next, longer step (at 10 ms x1.5 the steps are 81, 132, 208 ms after the
push). That costs a few pulls per batch while replies come in (each well under a millisecond in simulation, an
HTTP request in a deployment). Replies, timeouts and errors are Flower's own, exactly as ``send_and_receive``
returns them.

In simulation (Flower's ``InMemoryGrid``: the replies are in the same process's memory, a pull costs tens of
microseconds and no request: 54 us for 4 ids, loaded) the pauses stay at 10 ms instead of growing: a batch's last
reply waited up to 50 ms for the next step there (0.5 s over the demo's 27 round trips after the plan, timed from
each reply's creation), now at most 10 ms. A deployment's grid (each pull an HTTP request) keeps the growing steps.

The first time it has to wait, ``PollingGrid`` runs the work it was given for idle time once (the coordinator's
imports of what it needs later, ``server/app.py``): in simulation the first replies come only after Ray and the
ClientApp actors started, seconds the coordinator otherwise sleeps through.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST, LONGEST, GROWTH = 0.01, 0.1, 1.5  # seconds between pulls: from FIRST, times GROWTH, at most LONGEST


def in_memory(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's in-process ``InMemoryGrid`` (a simulation: the sites are in the same process's
    memory), not a grid whose every call is a request to a SuperLink (a deployment)."""
    local = sys.modules.get("flwr.superlink.grid.inmemory_grid")  # loaded wherever such a grid exists
    return local is not None and isinstance(grid, local.InMemoryGrid)


def longest_pause(grid: Grid) -> float:
    """The longest pause between pulls for this grid: FIRST in simulation (``in_memory``), whose pulls cost next to
    nothing; LONGEST for a grid whose pulls are requests (a deployment)."""
    return FIRST if in_memory(grid) else LONGEST


class PollingGrid:
    """A Grid whose ``send_and_receive`` pulls with a short, growing interval (at most ``longest``, by default
    ``longest_pause(grid)``); everything else is the wrapped Grid's."""

    def __init__(self, grid: Grid, idle: Iterable[Callable[[], None]] = (), longest: float | None = None) -> None:
        self._grid = grid
        self._idle = list(idle)  # run once, at the first wait for replies
        self._longest = longest_pause(grid) if longest is None else longest

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self._grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        pause = FIRST
        while timeout is None or time.time() < end:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(r.metadata.reply_to_message_id for r in got)
            if not pending:
                break
            while self._idle:  # replies pulled after it as after a pause
                self._idle.pop(0)()
            if got:  # replies are coming in: pull again soon
                pause = FIRST
            time.sleep(pause)
            pause = min(pause * GROWTH, self._longest)
        return replies


def polling(grid: Grid, idle: Iterable[Callable[[], None]] = ()) -> Grid:
    """``grid`` waiting for replies in short pulls (a PollingGrid around it), doing ``idle`` at its first wait."""
    return PollingGrid(grid, idle)  # type: ignore[return-value]
