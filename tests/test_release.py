"""The release rule's math (common/release.py), the site's ledger (client/ledger.py) and the guard's use of it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from client import runcache
from client.guard import PrivacyError, check_release
from client.ledger import Blocking, Declaration, Ledger
from common import protocol
from common.release import choose_held_out, held_out_blocks, isolated_group, make_blocks


def _brute_force(sets: list[frozenset[str]], k: int) -> int | None:
    """Smallest 1..k-1 patient group some combination of the sets is supported inside, by patient rows."""
    patients = sorted(set().union(*sets))
    matrix = np.array([[1.0 if p in s else 0.0 for s in sets] for p in patients])
    full = np.linalg.matrix_rank(matrix)
    for size in range(1, k):
        for group in itertools.combinations(range(len(patients)), size):
            rest = np.delete(matrix, group, axis=0)
            if (np.linalg.matrix_rank(rest) if rest.size else 0) < full:
                return size
    return None


def test_isolated_group_is_exact_against_brute_force():
    rng = np.random.default_rng(3)
    patients = [f"p{i}" for i in range(9)]
    found = 0
    for _ in range(150):
        n_sets = int(rng.integers(1, 5))
        sets = [frozenset(p for p in patients if rng.random() < 0.6) for _ in range(n_sets)]
        sets = [s for s in sets if s] or [frozenset(patients)]
        k = int(rng.integers(2, 5))
        expected = _brute_force(sets, k)
        got = isolated_group(sets, k)
        assert (got is None) == (expected is None), (sets, k)
        if got is not None:
            found += 1
            assert got.proven and len(got.patients) == expected  # the smallest group is the one named
    assert found > 20  # the random cases exercise both answers


def test_two_sets_differing_by_one_patient_isolate_it_and_overlapping_ones_need_not():
    t = frozenset(f"p{i}" for i in range(10))
    assert isolated_group([t, t - {"p3"}], 5).patients == {"p3"}
    a, b = frozenset({"a1", "a2", "a3", "a4", "a5", "x"}), frozenset({"x", "b1", "b2", "b3", "b4", "b5"})
    assert isolated_group([a, b], 5) is None  # x is its own atom but no combination isolates it


def test_blocks_hold_k_to_2k_minus_1_and_splits_are_whole_blocks():
    assert [len(b) for b in make_blocks([str(i) for i in range(23)], 5)] == [6, 6, 6, 5]
    assert make_blocks(["a", "b", "c"], 5) == []
    assert [held_out_blocks(n, 0.3) for n in (1, 2, 3, 4, 7, 10)] == [0, 1, 1, 1, 2, 3]
    ids = [f"blk-{i}" for i in range(10)]
    assert choose_held_out(b"s", ids, 0.3, 7) == choose_held_out(b"s", list(reversed(ids)), 0.3, 7)
    assert choose_held_out(b"s", ids, 0.3, 7) != choose_held_out(b"other secret", ids, 0.3, 7)


def test_ledger_freezes_blocks_and_leaves_a_broken_block_out(tmp_path):
    ledger = Ledger(tmp_path / "release", 5)
    ids = [f"c{i:02d}" for i in range(24)]
    labels = np.array([1] * 12 + [0] * 12)
    blocking = ledger.blocking(ids, labels)
    assert sorted(len(m) for _, m in blocking.blocks.values()) == [6, 6, 6, 6] and not blocking.left_out
    assert ledger.blocking(ids, labels).blocks == blocking.blocks  # the same secret: the same blocks
    held = blocking.held_out(ids, 0.3, seed=1)
    train = frozenset(c for c, h in zip(ids, held, strict=True) if not h)
    ledger.record(1, "query.features", {"all": frozenset(ids)}, blocking)  # freezes every block
    ledger.record(1, "query.moments", {"train": train}, blocking)
    # a new patient waits; a frozen block that lost one patient sits out whole
    later = ledger.blocking([*ids[1:], "new-1"], np.array([1] * 11 + [0] * 12 + [1]))
    assert "new-1" in later.left_out and "waits for 5 new HGG cases" in later.left_out["new-1"]
    lost_with = next(m for _, m in blocking.blocks.values() if "c00" in m)
    assert set(lost_with) - {"c00"} <= set(later.left_out)
    # re-releasing a set is free; a set one patient smaller is refused with the reason
    assert ledger.check({"train": train}) == ""
    why = ledger.check({"train": train - {sorted(train)[0]}})
    assert "would single out 1 patient (fewer than k = 5)" in why


def test_a_repeated_release_rewrites_nothing_yet_new_sets_and_blocks_are_still_checked_and_recorded(tmp_path):
    ledger = Ledger(tmp_path / "release", 5)
    ids = [f"c{i:02d}" for i in range(24)]
    blocking = ledger.blocking(ids, np.array([1] * 12 + [0] * 12))
    held = blocking.held_out(ids, 0.3, seed=1)
    train = frozenset(c for c, h in zip(ids, held, strict=True) if not h)
    ledger.record(1, "train", {"train": train}, blocking)  # the first round: a new set, its blocks frozen
    path, log = ledger.folder / "ledger.json", ledger.folder / "releases.jsonl"
    before = path.read_bytes(), runcache.stamp(path)
    for _ in range(3):  # every later round releases the same set: checked, logged, and ledger.json left alone
        assert ledger.check({"train": train}) == ""
        ledger.record(1, "train", {"train": train}, blocking)
    assert (path.read_bytes(), runcache.stamp(path)) == before
    lines = log.read_text().splitlines()
    assert len(lines) == 4 and len({line.split('"sets": ')[1] for line in lines}) == 1  # one line per reply
    # a set one patient smaller is still refused; the held-out set is new: recorded, its blocks frozen
    assert "would single out 1 patient" in ledger.check({"train": train - {sorted(train)[0]}})
    test = frozenset(ids) - train
    ledger.record(1, "evaluate", {"test": test}, blocking)
    assert runcache.stamp(path) != before[1] and test in ledger.released_sets()
    assert len(ledger.load()["blocks"]) == len(blocking.blocks)
    # a known set touching a block the ledger has not frozen (another blocking of the same cases) is written too
    other = Blocking(blocking.secret, {"unfrozen": (1, sorted(train)[:5])})
    ledger.record(2, "train", {"train": train}, other)
    assert "unfrozen" in ledger.load()["blocks"]


def _moments_reply(n_hgg: int, n_bm: int) -> RecordDict:
    arrays = {k: Array(np.zeros(3)) for k in ("mean", "m2", "mean-hgg", "m2-hgg", "mean-bm", "m2-bm")}
    return RecordDict({"arrays": ArrayRecord(arrays),
                       "metrics": MetricRecord({"n": n_hgg + n_bm, "n-hgg": n_hgg, "n-bm": n_bm})})


def test_guard_needs_the_case_sets_behind_every_count_and_checks_the_ledger(tmp_path):
    ledger = Ledger(tmp_path / "release", 5)
    hgg, bm = frozenset(f"h{i}" for i in range(6)), frozenset(f"b{i}" for i in range(6))
    counts = {"n": "train", "n-hgg": "train-hgg", "n-bm": "train-bm"}
    with pytest.raises(PrivacyError, match="does not name the cases"):
        check_release(protocol.MOMENTS, _moments_reply(6, 6), None, ledger, 1)
    lying = Declaration({"train": hgg | bm, "train-hgg": hgg, "train-bm": bm}, counts, None)
    with pytest.raises(PrivacyError, match="'n' = 13 but its case set 'train' holds 12 patients"):
        check_release(protocol.MOMENTS, _moments_reply(7, 6), lying, ledger, 1)
    check_release(protocol.MOMENTS, _moments_reply(6, 6), lying, ledger, 1)  # honest: recorded
    assert len(ledger.released_sets()) == 3
    smaller = Declaration({"train": (hgg | bm) - {"h0"}, "train-hgg": hgg - {"h0"}, "train-bm": bm}, counts, None)
    with pytest.raises(PrivacyError, match="single out 1 patient"):
        check_release(protocol.MOMENTS, _moments_reply(5, 6), smaller, ledger, 2)
    assert len(ledger.released_sets()) == 3  # the refused reply released nothing
