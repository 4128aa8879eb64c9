"""server/batching.py: a query to many sites goes out in batches of at most send-batch messages."""

from __future__ import annotations

from server.batching import BatchedGrid, batched


class _Grid:
    """Answers each message with itself and records the size of every send_and_receive."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sizes.append(len(messages))
        return messages

    def get_node_ids(self):
        return [1, 2, 3]


def test_batches_cover_every_message_once_in_order_and_off_sends_at_once():
    grid = _Grid()
    out = list(batched(grid, 4).send_and_receive(iter(range(10)), timeout=5.0))
    assert out == list(range(10)) and grid.sizes == [4, 4, 2]
    assert batched(grid, 4).get_node_ids() == [1, 2, 3]  # the rest is the wrapped grid's
    assert batched(grid, 0) is grid and isinstance(batched(grid, 1), BatchedGrid)
    grid.sizes.clear()
    assert list(batched(grid, 20).send_and_receive(range(10))) == list(range(10)) and grid.sizes == [10]
