"""bench/bench_loso.py ``occupancy``: how many of the sites' workers were inside the ClientApp, second by second over
the folds, and the gap between one worker's messages within a round (what ``--profile-sites`` prints)."""

from __future__ import annotations

import pytest

from bench.bench_loso import occupancy


def test_seconds_by_busy_workers_and_the_gaps_within_a_round():
    worker_a = [[0.0, 1.0, "query.batch"], [1.05, 2.0, "query.batch"], [5.0, 6.0, "query.batch"]]
    worker_b = [[0.5, 1.5, "query.batch"]]
    busy, gap, gaps = occupancy([worker_a, worker_b], 0.0, 3.0)
    # 0-0.5 one, 0.5-1 two, 1-1.05 one, 1.05-1.5 two, 1.5-2 one, 2-3 none; the call after the window is left out
    assert busy == pytest.approx([1.0, 1.05, 0.95])
    assert sum(busy) == pytest.approx(3.0)
    assert (gap, gaps) == (pytest.approx(0.05), 1)  # 2.0 -> 5.0 is between rounds, not a gap within one


def test_calls_cut_at_the_window():
    busy, _, gaps = occupancy([[[-1.0, 0.5, "x"], [2.5, 4.0, "x"]]], 0.0, 3.0)
    assert busy == pytest.approx([2.0, 1.0]) and gaps == 0
