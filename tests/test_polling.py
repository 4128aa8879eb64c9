"""server/polling.py: replies are pulled in short, growing steps (Flower's HttpGrid sleeps 3 s between pulls)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server import polling


class _Grid:
    """Pushes give ids 0..n-1; the reply to id i is ready from pull number ``ready[i]`` on (never if None)."""

    def __init__(self, ready: list[int | None]) -> None:
        self.ready, self.pulls, self.pushed = ready, 0, []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [str(i) for i in range(len(self.pushed))]

    def pull_messages(self, ids):
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                if self.ready[int(i)] is not None and self.pulls >= self.ready[int(i)]]

    def get_node_ids(self):
        return [7]


@pytest.fixture
def naps(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(polling.time, "sleep", slept.append)
    return slept


def test_every_reply_once_with_short_growing_pauses(naps):
    grid = _Grid([1, 3, 12])
    replies = polling.polling(grid).send_and_receive(["a", "b", "c"], timeout=60.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1", "2"]
    assert grid.pulls == 12 and len(naps) == 11  # one pause between pulls, none after the last reply
    assert naps[0] == polling.FIRST and max(naps) == polling.LONGEST < 3.0
    for pull, (a, b) in enumerate(zip(naps, naps[1:], strict=False), start=2):  # nap b follows pull number `pull`
        assert b == (polling.FIRST if pull == 3 else min(a * polling.GROWTH, polling.LONGEST))  # pull 3 brought one
    assert polling.polling(grid).get_node_ids() == [7]  # the rest is the wrapped grid's


def test_replies_coming_in_are_pulled_again_after_the_shortest_pause(naps):
    # a batch's replies land one after another from the 5th pull on: each pull that brought one is followed by the
    # shortest pause, not the next longer step (the schedule alone would wait 51, 76, then 100 ms)
    grid = _Grid([5, 6, 7, 8])
    replies = polling.polling(grid).send_and_receive(["a", "b", "c", "d"], timeout=60.0)
    assert len(replies) == 4 and grid.pulls == 8
    assert naps[:4] == [polling.FIRST * polling.GROWTH ** i for i in range(4)]  # nothing yet: growing
    assert naps[4:] == [polling.FIRST] * 3


def test_a_site_that_never_answers_ends_at_the_timeout(naps, monkeypatch):
    clock = iter(range(0, 1000, 1))  # every time.time() call is one second later
    monkeypatch.setattr(polling.time, "time", lambda: float(next(clock)))
    grid = _Grid([1, None])
    replies = polling.polling(grid).send_and_receive(["a", "b"], timeout=10.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]
    assert 1 < grid.pulls < 12


def test_idle_work_runs_once_at_the_first_wait_only(naps):
    done: list[int] = []
    waiting = polling.polling(_Grid([1, 1]), idle=[lambda: done.append(1), lambda: done.append(2)])
    waiting.send_and_receive(["a", "b"], timeout=60.0)  # every reply at the first pull: no wait, no idle work
    assert done == []
    grid = _Grid([3])
    waiting._grid = grid
    assert len(waiting.send_and_receive(["a"], timeout=60.0)) == 1  # replies pulled after the work as before
    assert done == [1, 2] and grid.pulls == 3
    grid.pulls = 0
    waiting.send_and_receive(["a"], timeout=60.0)
    assert done == [1, 2]  # once per run



def _in_memory_grid():
    """Flower's own simulation grid, as flwr/simulation/run_simulation.py builds it (on an empty in-memory state)."""
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return InMemoryGrid(LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()))


def test_a_simulation_s_in_memory_grid_is_pulled_every_shortest_pause_a_deployment_s_with_growing_ones():
    # in simulation a pull reads the same process's memory: no reason to let a reply wait up to 100 ms for it
    assert polling.longest_pause(_in_memory_grid()) == polling.FIRST
    assert polling.longest_pause(_Grid([1])) == polling.LONGEST  # e.g. HttpGrid: each pull a request


def test_with_the_in_memory_grid_s_limit_every_pause_is_the_shortest(naps):
    grid = _Grid([9])
    replies = polling.PollingGrid(grid, longest=polling.longest_pause(_in_memory_grid())).send_and_receive(
        ["a"], timeout=60.0)
    assert len(replies) == 1 and grid.pulls == 9
    assert naps == [polling.FIRST] * 8  # the growing schedule would have waited 10, 15, 22, 34, 51, 76, 100, 100 ms
