"""Gradient-boosted trees from histograms (common/trees.py): the federated fit, sites simulated in-process by their
own histogram function and summed as the server sums them, equals a pooled fit written independently here
(direct threshold masks over all sites' rows, recursive growth): same splits, leaf values within 1e-9."""

from __future__ import annotations

import numpy as np
import pytest

from common import trees
from common.metrics import roc_auc

PARAMS = trees.TreeParams(rounds=8, depth=3, bins=16, learning_rate=0.3, l2=1.0, min_child_cases=10,
                          min_child_hessian=0.5)


def _site(rng: np.random.Generator, n_per_class: int, shift: float, k: int = 5, s: int = 6):
    """One site's cases (n, s) with labels and release blocks of k to 2k - 1 cases of one class."""
    y = np.r_[np.ones(n_per_class), np.zeros(n_per_class)]
    x = rng.normal(size=(2 * n_per_class, s)) + shift
    x[:, 0] += 1.2 * y
    x[:, 1] -= 0.8 * y
    x[:, 2] += 0.9 * y * (x[:, 3] > shift)  # an interaction a tree can use
    blocks = np.empty(len(y), dtype=object)
    for label in (1, 0):
        idx = rng.permutation(np.flatnonzero(y == label))
        for b, members in enumerate(np.array_split(idx, len(idx) // k)):
            blocks[members] = f"c{label}-b{b:02d}"
    return x, y, blocks


def _sites(seed: int = 3):
    rng = np.random.default_rng(seed)
    return [_site(rng, n, shift) for n, shift in ((30, 0.0), (22, 0.3), (41, -0.2))]


def _pooled_standardisation(sites):
    x = np.vstack([s[0] for s in sites])
    return x.mean(axis=0), x.std(axis=0)


def _rows(sites, mean, scale, edges):
    out = []
    for x, y, blocks in sites:
        zb, yb, wb = trees.block_rows(trees.standardise(x, mean, scale), y, blocks)
        out.append((trees.bin_of(zb, edges), yb, wb))
    return out


def _reference(bins: np.ndarray, y: np.ndarray, w: np.ndarray, p: trees.TreeParams):
    """Pooled boosting written from the definition: per node every (feature, edge) by a direct mask."""
    n_int, n_leaf = 2 ** p.depth - 1, 2 ** p.depth
    feature, split, leaf = np.full((p.rounds, n_int), -1), np.full((p.rounds, n_int), -1), np.zeros((p.rounds, n_leaf))
    margin = np.zeros(len(y))

    def value(rows):
        return -p.learning_rate * np.sum(w[rows] * grad[rows]) / (np.sum(w[rows] * hess[rows]) + p.l2)

    def grow(t, heap, rows, level):
        first, width = (heap - (2 ** level - 1)) * 2 ** (p.depth - level), 2 ** (p.depth - level)
        if level == p.depth:
            leaf[t, first] = value(rows)
            return
        g, h = np.sum(w[rows] * grad[rows]), np.sum(w[rows] * hess[rows])
        best, choice = 0.0, None
        gains = []
        for f in range(bins.shape[1]):
            for j in range(p.bins - 1):
                left = rows & (bins[:, f] <= j)
                right = rows & ~(bins[:, f] <= j)
                gl, hl, cl = np.sum(w[left] * grad[left]), np.sum(w[left] * hess[left]), np.sum(w[left])
                gr, hr, cr = g - gl, h - hl, np.sum(w[right])
                if min(cl, cr) < p.min_child_cases or min(hl, hr) < p.min_child_hessian:
                    continue
                gains.append((0.5 * (gl**2 / (hl + p.l2) + gr**2 / (hr + p.l2) - g**2 / (h + p.l2)), f, j))
        if gains:
            top = max(gain for gain, _, _ in gains)
            if top > 0:
                best, choice = top, next((f, j) for gain, f, j in gains if gain >= top - trees.TIE * max(1, top))
        if choice is None or best <= 0:
            leaf[t, first:first + width] = value(rows)
            return
        feature[t, heap], split[t, heap] = choice
        goes_left = bins[:, choice[0]] <= choice[1]
        grow(t, 2 * heap + 1, rows & goes_left, level + 1)
        grow(t, 2 * heap + 2, rows & ~goes_left, level + 1)

    def predict(t, rows_bins):
        heap = np.zeros(len(rows_bins), dtype=int)
        for _ in range(p.depth):
            f = feature[t, heap]
            right = (f >= 0) & (rows_bins[np.arange(len(heap)), np.maximum(f, 0)] > split[t, heap])
            heap = 2 * heap + 1 + right
        return leaf[t, heap - n_int]

    for t in range(p.rounds):
        prob = 1 / (1 + np.exp(-margin))
        grad, hess = prob - y, prob * (1 - prob)
        grow(t, 0, np.ones(len(y), dtype=bool), 0)
        margin = margin + predict(t, bins)
    return feature, split, leaf


def test_federated_trees_equal_pooled_reference():
    sites = _sites()
    mean, scale = _pooled_standardisation(sites)
    rows = _rows(sites, mean, scale, trees.z_edges(PARAMS.bins))
    fed, trips = trees.fit_rows(rows, PARAMS, mean, scale)
    feature, split, leaf = _reference(*(np.concatenate(parts) for parts in zip(*rows, strict=True)), PARAMS)
    assert np.array_equal(fed["feature"], feature)
    assert np.array_equal(fed["split"], split)
    assert np.max(np.abs(fed["leaf"] - leaf)) < 1e-9
    assert (fed["feature"] >= 0).sum() > PARAMS.rounds  # real trees, not stumps or empty ones
    assert trips <= PARAMS.rounds * PARAMS.depth  # one round trip per tree level at most


def test_site_order_and_partition_do_not_change_the_model():
    """Summing histograms is order-free: the same blocks split over other sites give the same ensemble."""
    sites = _sites(seed=8)
    mean, scale = _pooled_standardisation(sites)
    rows = _rows(sites, mean, scale, trees.z_edges(PARAMS.bins))
    a, _ = trees.fit_rows(rows, PARAMS, mean, scale)
    for other in (rows[::-1], [tuple(np.concatenate(p) for p in zip(*rows, strict=True))]):
        b, _ = trees.fit_rows(other, PARAMS, mean, scale)
        assert np.array_equal(a["feature"], b["feature"]) and np.array_equal(a["split"], b["split"])
        assert np.max(np.abs(a["leaf"] - b["leaf"])) < 1e-9


def test_trees_learn_and_predict_cases_by_their_own_values():
    sites = _sites(seed=5)
    mean, scale = _pooled_standardisation(sites)
    model, _ = trees.fit_rows(_rows(sites, mean, scale, trees.z_edges(PARAMS.bins)), PARAMS, mean, scale)
    test_x, test_y, _ = _site(np.random.default_rng(99), 200, 0.0)
    prob = trees.predict_proba(model, test_x)
    assert prob.shape == (400,) and np.all((prob > 0) & (prob < 1))
    assert roc_auc(test_y, prob) > 0.75
    # a threshold is an agreed edge: a case exactly on it goes left, just above it goes right
    t, heap = 0, 0
    f, j = int(model["feature"][t, heap]), int(model["split"][t, heap])
    z_edge = model["edges"][j]
    on, above = mean.copy(), mean.copy()
    on[f] = mean[f] + z_edge * scale[f]
    above[f] = mean[f] + (z_edge + 1e-6) * scale[f]
    bins = trees.bin_of(trees.standardise(np.vstack([on, above]), mean, scale), model["edges"])
    assert trees.route(model, 0, bins, 1).tolist() == [0, 1]


def test_mixed_block_and_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="both classes"):
        trees.block_rows(np.zeros((2, 1)), np.array([1.0, 0.0]), np.array(["b", "b"]))
    with pytest.raises(ValueError, match="tree-depth"):
        trees.TreeParams(depth=0)


def test_site_splits_only_at_the_agreed_edges_and_routes_whole_blocks():
    """The site refuses a model whose edges are not the run's (a coordinator's own thresholds could isolate a
    value), and merges blocks into units of >= the run's k when that exceeds the site's block size."""
    from client.ledger import Blocking
    from client.site import SiteError
    from client.trees import check_model, routing_units

    params = trees.TreeParams(rounds=2, depth=2, bins=8)
    model = {**trees.empty_model(params, np.zeros(3), np.ones(3)), "open": np.array([1.0, 0.0])}
    assert check_model(model, params, 3)["edges"].shape == (7,)
    with pytest.raises(SiteError, match="agreed"):
        check_model({**model, "edges": model["edges"] + 0.01}, params, 3)
    with pytest.raises(SiteError, match="shape"):
        check_model(model, params, 4)
    ids = [f"c{i}" for i in range(17)]
    labels = np.array([1] * 11 + [0] * 6)
    blocks = {"b1": (1, ids[0:5]), "b2": (1, ids[5:11]), "b3": (0, ids[11:17])}
    units = routing_units(ids, labels, Blocking(b"s", blocks), k=5)
    assert len(set(units[:5])) == 1 and units[0] != units[5] and len(set(units)) == 3  # blocks as they are
    merged = routing_units(ids, labels, Blocking(b"s", blocks), k=8)
    assert len(set(merged[:11])) == 1 and len(set(merged)) == 2  # two blocks of 5 and 6 make one unit of 11


def test_radfed_predict_reads_and_scores_a_trees_model_file(tmp_path):
    """The gbt family is one entry of the registry: its model file loads and scores each case by its own values,
    and a file whose arrays are not a trees model is refused naming the family."""
    import torch

    from client.modelfile import load_model_file
    from client.predict_refusals import PredictRefusal
    from common import families

    sites = _sites(seed=5)
    mean, scale = _pooled_standardisation(sites)
    model, _ = trees.fit_rows(_rows(sites, mean, scale, trees.z_edges(PARAMS.bins)), PARAMS, mean, scale)
    x = _site(np.random.default_rng(98), 30, 0.0)[0]
    state = {k: torch.from_numpy(v) for k, v in model.items()}
    names = [f"f{i}" for i in range(x.shape[1])]
    doc = {"state_dict": state, "features": names, "profile_sha256": "x", "protocol": "3", "family": "gbt"}
    torch.save(doc, tmp_path / "model.pt")
    loaded = load_model_file(tmp_path / "model.pt")
    assert loaded.family == "gbt" and not families.family("gbt").linear
    scored = families.predict_proba("gbt", {k: v.numpy() for k, v in loaded.state.items()}, x)
    assert np.array_equal(scored, trees.predict_proba(model, x)) and len(np.unique(scored)) > 1
    torch.save({**doc, "state_dict": {k: v for k, v in state.items() if k != "leaf"}}, tmp_path / "broken.pt")
    with pytest.raises(PredictRefusal, match="gbt model"):
        load_model_file(tmp_path / "broken.pt")


def test_runs_that_cannot_protect_trees_are_refused_naming_the_fix():
    from common.runconfig import RunConfigError, parse
    from radfed.launch import app_run_config

    with pytest.raises(RunConfigError, match="dp-query-noise-multiplier = 0"):
        parse(app_run_config({"models": "gbt", "dp-query-noise-multiplier": 1.0}))
    with pytest.raises(RunConfigError, match="take gbt out of models"):
        parse(app_run_config({"models": "logistic-l2,gbt", "training": "fedavg", "dp-noise-multiplier": 1.0}))
    assert parse(app_run_config({"models": "gbt"})).tree_params().open_nodes == 4
    # two bins would be one edge at z = -3: no grid to split on (privacy.md's resolution 6 / (tree-bins - 2))
    with pytest.raises(RunConfigError, match="tree-bins"):
        parse(app_run_config({"models": "gbt", "tree-bins": 2}))
    assert parse(app_run_config({"models": "gbt", "tree-bins": 3})).tree_params().bins == 3
