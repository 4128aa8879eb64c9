"""The release rule, as pure functions: which groups of patients a site's aggregates single out.

Every statistic a site sends is a function of the set of patients it aggregates over. An observer who
holds several releases can add and subtract them, so what they learn is any sum over a vector in the span
of the released sets' indicator vectors (two runs whose training sets differ by one patient give that
patient's values exactly). The site's invariant, over everything it ever released:

    no nonzero vector in span{1_S : S released} is supported on fewer than k patients.

``isolated_group`` decides it exactly: patients that every released set treats alike form an *atom*, every
vector of the span is constant on atoms, and a vector supported on a group U of atoms exists iff dropping
U's rows from the atoms x sets membership matrix lowers its rank. Sites keep it cheap and always true in
normal use by aggregating only over unions of permanent blocks of at least k patients per class
(``make_blocks``, ``choose_held_out``): every atom is then a union of blocks.
"""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from hashlib import sha256

import numpy as np

MAX_SUBSETS = 50_000  # groups of small atoms examined before the site gives up and refuses (conservatively)


@dataclass(frozen=True)
class Isolation:
    """A group of fewer than k patients the releases single out (``proven``: False when the search was cut
    short and the site refuses because it cannot rule it out)."""

    patients: frozenset[str]
    proven: bool = True


def atoms(sets: Sequence[frozenset[str]]) -> tuple[list[frozenset[str]], np.ndarray]:
    """Patients grouped by which of ``sets`` hold them, and the (atoms, sets) 0/1 membership matrix.

    Patients in no set are left out (nothing released covers them)."""
    signature: dict[str, list[int]] = {}
    for j, members in enumerate(sets):
        for patient in members:
            signature.setdefault(patient, []).append(j)
    groups: dict[tuple[int, ...], set[str]] = {}
    for patient, sig in signature.items():
        groups.setdefault(tuple(sig), set()).add(patient)
    keys = sorted(groups, key=lambda s: (len(groups[s]), s))
    matrix = np.zeros((len(keys), len(sets)))
    for i, sig in enumerate(keys):
        matrix[i, list(sig)] = 1.0
    return [frozenset(groups[s]) for s in keys], matrix


def _rank(matrix: np.ndarray) -> int:
    return int(np.linalg.matrix_rank(matrix)) if matrix.size else 0


def isolated_group(sets: Sequence[frozenset[str]], k: int, max_subsets: int = MAX_SUBSETS) -> Isolation | None:
    """The smallest group of 1..k-1 patients some combination of sums over ``sets`` is supported on, or None.

    Exact: a combination supported inside a group U of atoms exists iff rank(A without U's rows) < rank(A).
    Only groups of atoms with fewer than k patients in all need checking; if the large atoms alone keep the
    rank, none exists. Returns an unproven Isolation when more than ``max_subsets`` groups would be needed.
    """
    groups, matrix = atoms([s for s in sets if s])
    sizes = np.array([len(g) for g in groups])
    small = np.flatnonzero(sizes < k)
    if small.size == 0:
        return None
    full = _rank(matrix)
    if _rank(matrix[sizes >= k]) == full:
        return None
    examined = 0
    for count in range(1, min(len(small), k - 1) + 1):  # fewer atoms first: the smallest group is found first
        candidates = [tuple(c) for c in itertools.combinations(small.tolist(), count)
                      if sizes[list(c)].sum() < k]
        for group in sorted(candidates, key=lambda c: sizes[list(c)].sum()):
            examined += 1
            if examined > max_subsets:
                return Isolation(frozenset().union(*(groups[i] for i in small)), proven=False)
            keep = np.ones(len(groups), dtype=bool)
            keep[list(group)] = False
            if _rank(matrix[keep]) < full:
                return Isolation(frozenset().union(*(groups[i] for i in group)))
    return None


def keyed_order(secret: bytes, items: Iterable[str], salt: str = "") -> list[str]:
    """``items`` in an order only the holder of ``secret`` can compute (HMAC-SHA256 of salt and item)."""
    return sorted(items, key=lambda item: hmac.new(secret, f"{salt}\0{item}".encode(), sha256).hexdigest())


def block_id(secret: bytes, members: Iterable[str]) -> str:
    """A block's stable name: keyed hash of its sorted members (reveals nothing without the secret)."""
    return "blk-" + hmac.new(secret, "\n".join(sorted(members)).encode(), sha256).hexdigest()[:16]


def make_blocks(ordered: Sequence[str], size: int) -> list[list[str]]:
    """``ordered`` patients cut into floor(n / size) blocks of ``size`` to 2 * size - 1 consecutive patients
    (the remainder spread over the first blocks); [] when fewer than ``size``."""
    n_blocks = len(ordered) // size
    if n_blocks == 0:
        return []
    extra, spread = divmod(len(ordered) - n_blocks * size, n_blocks)
    blocks, start = [], 0
    for i in range(n_blocks):
        width = size + extra + (1 if i < spread else 0)
        blocks.append(list(ordered[start:start + width]))
        start += width
    return blocks


def held_out_blocks(n_blocks: int, test_fraction: float) -> int:
    """Blocks of one class that go to the held-out split: round(fraction x blocks), at least one and at least
    one left for training (0 when the class has fewer than two blocks)."""
    if n_blocks < 2:
        return 0
    return min(max(int(round(test_fraction * n_blocks)), 1), n_blocks - 1)


def assign_folds(secret: bytes, block_ids: Sequence[str], folds: int, seed: int, repeat: int = 0) -> dict[str, int]:
    """Cross-validation folds of one class's blocks: block -> fold in 0..folds-1, dealt in turn in the site's
    secret order for this seed and repeat, so each fold holds whole blocks (>= k patients each) and, with at
    least ``folds`` blocks, every fold holds one or more."""
    order = keyed_order(secret, block_ids, salt=f"cv-seed:{seed}" + (f":repeat:{repeat}" if repeat else ""))
    return {b: i % folds for i, b in enumerate(order)}


def choose_held_out(secret: bytes, block_ids: Sequence[str], test_fraction: float, seed: int) -> set[str]:
    """The held-out blocks of one class: ``held_out_blocks`` of them, drawn by the run's split seed in the
    site's secret order (so a seed names no patient the coordinator could aim at)."""
    order = keyed_order(secret, block_ids, salt=f"split-seed:{seed}")
    return set(order[: held_out_blocks(len(block_ids), test_fraction)])
