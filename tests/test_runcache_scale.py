"""A simulation worker serving 1,000 sites keeps every site's run cache entries from one round to the next
(client.runcache): Flower's simulation hands any node's message to any Ray worker, so each worker holds about five
entries per site (site, split, settings, ledger, approvals); a cap below that evicted in a cycle, and every message
of a 1,000-site run reloaded its site from disk (bench/bench_scale.py --profile, docs/performance.md)."""

from __future__ import annotations

from client import runcache

KINDS = ("site", "split", "settings", "ledger", "approvals")  # a site's entries in a worker's process


def _round(sites: int, made: list[tuple[str, int]]) -> None:
    """One message per site, each looking up its site's entries as a message does (one look per message)."""
    for site in range(sites):
        with runcache.one_look():
            for kind in KINDS:
                runcache.remember(kind, f"/sites/site-{site:04d}",
                                  lambda kind=kind, site=site: made.append((kind, site)) or (kind, site),
                                  lambda _: [])


def test_a_worker_serving_1000_sites_loads_each_site_once_per_run():
    runcache.clear()
    made: list[tuple[str, int]] = []
    try:
        _round(1000, made)
        assert len(made) == 1000 * len(KINDS)
        for _ in range(3):  # the run's later rounds (moments, correlation, Newton ...) find every entry kept
            _round(1000, made)
        assert len(made) == 1000 * len(KINDS)
    finally:
        runcache.clear()
