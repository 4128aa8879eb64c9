"""Sending a query to many sites in batches of at most ``send-batch`` messages (run config; 0 = all at once).

Why: Flower 1.42's simulation hands messages to the ClientApps by asking its in-memory SuperLink, every 0.1 s,
for each node's next message, and each such lookup walks every message the SuperLink holds
(``InMemoryLinkState.get_message_ins``). With one message in flight per site, a sweep costs sites^2 checks:
at 1,000 sites about a million every 0.1 s, in the process that also runs the ServerApp, so the ClientApps sat
idle (bench/bench_scale.py). In batches of b messages a sweep costs sites x b. In a deployment every site
computes at the same time, so the default sends everything at once; batches there would only add waiting.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid


class BatchedGrid:
    """A Grid whose ``send_and_receive`` sends at most ``batch`` messages at a time (each batch gets the
    timeout); everything else is the wrapped Grid's."""

    def __init__(self, grid: Grid, batch: int) -> None:
        self._grid, self._batch = grid, batch

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self._batch <= 0 or len(messages) <= self._batch:
            return self._grid.send_and_receive(messages, timeout=timeout)
        return list(self._batches(messages, timeout))

    def _batches(self, messages: list[Message], timeout: float | None) -> Iterator[Message]:
        for start in range(0, len(messages), self._batch):
            yield from self._grid.send_and_receive(messages[start:start + self._batch], timeout=timeout)


def batched(grid: Grid, batch: int) -> Grid:
    """``grid`` itself when batching is off, else a BatchedGrid around it."""
    return grid if batch <= 0 else BatchedGrid(grid, batch)  # type: ignore[return-value]
