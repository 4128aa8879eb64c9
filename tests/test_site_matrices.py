"""A site keeps the matrices its handlers compute on between messages (client.matrices): a fold's harmonised model
inputs serve its next Newton rounds, yet every answer equals computing them again, and a change to the site's files
or to the fold's ComBat parameters is never answered from an older matrix. Real site folders, real extraction, and
radfed's ClientApp with all its mods driven by real Flower messages (bench/site_messages.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from site_helpers import extracted_site, settled_copy

from bench.site_messages import BatchHarness
from client import combat_state, matrices, runcache, steps
from common import combat
from radfed import synth
from radfed.launch import app_run_config

CONFIG = {"min-cases-per-class": 5}
FULL = app_run_config(CONFIG)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    return extracted_site(tmp_path_factory.mktemp("matrices"), 7, FULL)


@pytest.fixture
def site(extracted, tmp_path) -> Path:
    copy = settled_copy(extracted, tmp_path)
    matrices.forget()
    yield copy
    runcache.clear()
    matrices.forget()


def _harmonizer(data: steps.SiteData, agreed: list[str], shift: float) -> combat_state.Harmonizer:
    """A fold's ComBat parameters as the node keeps them: the site's own fit against pooled estimates (``shift``
    moves the pooled grand mean, i.e. another fold's estimates)."""
    x, _ = steps.site_matrix(data, agreed, held_out=False)
    d = x.shape[1]
    pooled = combat.PooledEstimates.for_joiner(2, 2 * len(x), x.mean(axis=0) + shift, x.var(axis=0) + 1.0,
                                               np.zeros((0, d)), np.zeros(d))
    return combat_state.Harmonizer(combat_state.pack(combat.fit_site(x, pooled)))


def _fresh(data: steps.SiteData, *args, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    matrices.forget()
    return steps.site_matrix(data, *args, **kwargs)


def test_a_kept_matrix_equals_computing_it_again_and_is_a_copy(site):
    data = steps.load_site_data(site, FULL)
    agreed = steps.features_reply(data)[0]  # finite at every case, as the features phase agrees them
    names = agreed[3:9]
    harmonize = _harmonizer(data, agreed, 0.5)
    for held_out in (False, True, None):
        first = steps.site_matrix(data, agreed, held_out=held_out, names=names, harmonize=harmonize)
        made = matrices.counts["made"]
        kept = steps.site_matrix(data, agreed, held_out=held_out, names=names, harmonize=harmonize)
        assert matrices.counts["made"] == made  # served from memory
        fresh = _fresh(data, agreed, held_out=held_out, names=names, harmonize=harmonize)
        for a, b, c in zip(first, kept, fresh, strict=True):
            assert a.tobytes() == b.tobytes() == c.tobytes()
        kept[0][:] = 0.0  # what a caller does to its copy never reaches the next caller
        again = steps.site_matrix(data, agreed, held_out=held_out, names=names, harmonize=harmonize)
        assert again[0].tobytes() == fresh[0].tobytes()
    # the raw training matrix every fold's moments request reads: kept too, and equal
    raw = steps.site_matrix(data, agreed, held_out=False)
    assert raw[0].tobytes() == _fresh(data, agreed, held_out=False)[0].tobytes()



def test_every_folds_full_harmonised_matrix_adjusts_the_kept_raw_one(site, monkeypatch):
    """Each fold's moments request harmonises all ~860 agreed features of the training split: the columns are taken
    from the table once (the raw matrix the site keeps), not again per fold, and each fold's matrix equals its
    parameters applied to the raw features, to the bit."""
    data = steps.load_site_data(site, FULL)
    agreed = steps.features_reply(data)[0]
    folds = [_harmonizer(data, agreed, shift) for shift in (0.25, 0.5, 1.0)]
    raw, _ = _fresh(data, agreed, held_out=False)
    taken = []
    real = type(data.table).columns
    monkeypatch.setattr(type(data.table), "columns", lambda table, names: taken.append(1) or real(table, names))
    for harmonize in folds:
        x, _ = steps.site_matrix(data, agreed, held_out=False, harmonize=harmonize)
        assert x.tobytes() == harmonize(raw.copy(), None).tobytes()
    assert taken == []

def test_another_folds_parameters_or_columns_are_never_served_the_kept_matrix(site):
    data = steps.load_site_data(site, FULL)
    agreed = steps.features_reply(data)[0]  # finite at every case, as the features phase agrees them
    names = agreed[:4]
    one, other = _harmonizer(data, agreed, 0.5), _harmonizer(data, agreed, -2.0)
    x_one, _ = steps.site_matrix(data, agreed, held_out=False, names=names, harmonize=one)
    x_other, _ = steps.site_matrix(data, agreed, held_out=False, names=names, harmonize=other)
    assert not np.array_equal(x_one, x_other)
    assert x_other.tobytes() == _fresh(data, agreed, held_out=False, names=names, harmonize=other)[0].tobytes()
    x_cols, _ = steps.site_matrix(data, agreed, held_out=False, names=agreed[1:5], harmonize=one)
    assert x_cols.tobytes() == _fresh(data, agreed, held_out=False, names=agreed[1:5], harmonize=one)[0].tobytes()
    # another split of the same table (a cross-validation fold's view holds other rows out): its own rows
    flipped = steps.SiteData(data.site, data.profile, data.table, ~data.held_out, data.covariates, data.blocking)
    x_flip, _ = steps.site_matrix(flipped, agreed, held_out=False, names=names, harmonize=one)
    assert x_flip.shape[0] == int(data.held_out.sum())
    assert x_flip.tobytes() == _fresh(flipped, agreed, held_out=False, names=names, harmonize=one)[0].tobytes()


def _newton_replies(harness: BatchHarness) -> list[dict]:
    reply = harness.batch()
    return [{k: reply.content[k]["grad"].numpy().tobytes() + reply.content[k]["hess"].numpy().tobytes()}
            for k in reply.content if k.endswith("/arrays")]


def test_batched_newton_rounds_from_kept_matrices_equal_a_site_computing_them_every_time(site, server_identity):
    harness = BatchHarness(site, {"min-cases-per-class": 5}, n_sites=5)
    first = _newton_replies(harness)
    made = matrices.counts["made"]
    kept = [_newton_replies(harness) for _ in range(2)]
    assert matrices.counts["made"] == made  # the later rounds computed no matrix
    fresh = []
    for _ in range(2):
        matrices.forget()
        fresh.append(_newton_replies(harness))
    assert kept == fresh and first == fresh[0]


def test_a_changed_image_is_answered_from_the_new_features_not_a_kept_matrix(site, server_identity):
    harness = BatchHarness(site, {"min-cases-per-class": 5}, n_sites=3)
    before = _newton_replies(harness)
    data = steps.load_site_data(site, FULL)
    case = data.table.case_ids[int(np.flatnonzero(~data.held_out)[0])]
    with (site / "manifest.csv").open(encoding="utf-8") as fh:
        row = next(r for r in csv.DictReader(fh) if r["case_id"] == case)
    for seq in synth.SEQUENCES:  # a brighter scan of one training case: its features change
        path = site / row[seq]
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32) * 1.7 + 40.0, str(path))
    after = _newton_replies(harness)
    assert after != before
    runcache.clear()
    matrices.forget()
    assert after == _newton_replies(harness)  # what a site reloading and recomputing every message sends
