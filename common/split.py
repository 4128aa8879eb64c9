"""Deterministic stratified train / held-out split of a site's cases (pure numpy)."""

from __future__ import annotations

import hashlib

import numpy as np


def stratified_split(case_ids: list[str], labels: np.ndarray, test_fraction: float,
                     seed: int) -> np.ndarray:
    """Boolean (n,) mask, True = held-out case.

    Each class contributes ``round(test_fraction * n_class)`` cases (at least one when the class has
    two or more). The draw depends only on the seed and the case ids, not on manifest order, so a
    site gets the same split on every run and on every machine.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test-fraction must be between 0 and 1, got {test_fraction}")
    labels = np.asarray(labels)
    held_out = np.zeros(len(case_ids), dtype=bool)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        # order by a seeded hash of the id: stable under manifest reordering
        keys = [hashlib.sha256(f"{seed}:{case_ids[i]}".encode()).hexdigest() for i in idx]
        ordered = idx[np.argsort(keys)]
        held_out[ordered[:held_out_count(len(idx), test_fraction)]] = True
    return held_out


def held_out_count(n_class: int, test_fraction: float) -> int:
    """Held-out cases a class of ``n_class`` contributes (the rule ``stratified_split`` applies)."""
    n_test = int(round(test_fraction * n_class))
    return min(max(n_test, 1), n_class - 1) if n_class >= 2 else n_test


def eligibility_problem(n_hgg: int, n_bm: int, k: int, test_fraction: float) -> str | None:
    """Why a site with these class counts cannot take part, or None.

    Every reply must aggregate over at least k cases: each class needs k cases; each class's
    training cases (class-wise moments for selection) and the held-out split (evaluation) need k.
    """
    if min(n_hgg, n_bm) < k:
        return f"{n_hgg} HGG and {n_bm} BM cases; at least {k} of each are needed"
    test_hgg, test_bm = held_out_count(n_hgg, test_fraction), held_out_count(n_bm, test_fraction)
    if min(n_hgg - test_hgg, n_bm - test_bm) < k or test_hgg + test_bm < k:
        return (f"a {test_fraction:.0%} held-out split of {n_hgg} HGG + {n_bm} BM cases leaves "
                f"{n_hgg - test_hgg} HGG + {n_bm - test_bm} BM training cases and {test_hgg + test_bm} held-out; "
                f"each training class and the held-out split need at least {k}")
    return None
