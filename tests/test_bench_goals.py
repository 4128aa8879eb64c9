"""bench/bench_goals.py's own arithmetic: the cost curve's line and the verdicts (the benches it calls are
checked by their own runs)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_goals import cost_line, verdict


def test_the_cost_curve_is_the_least_squares_line_through_the_sizes() -> None:
    fixed, per_site = cost_line([10, 100, 1000], [9.0 + 0.885 * n for n in (10, 100, 1000)])
    assert fixed == pytest.approx(9.0) and per_site == pytest.approx(0.885)
    # off the line: the fit splits the residuals (numpy's polyfit is the reference)
    sites, walls = [10, 100, 1000], [20.0, 95.0, 894.0]
    assert cost_line(sites, walls) == pytest.approx(tuple(np.polyfit(sites, walls, 1)[::-1]))


def test_the_cost_curve_needs_two_sizes() -> None:
    with pytest.raises(ValueError, match="two different numbers of sites"):
        cost_line([100, 100], [50.0, 52.0])


def test_a_goal_is_met_at_its_bound_and_not_above() -> None:
    assert verdict(2.0, 2.0) == "met" and verdict(2.01, 2.0) == "not met" and verdict(0.09, 0.10) == "met"
