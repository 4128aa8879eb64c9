"""What bench/bench_families.py and bench/fedavg_pooled.py rest on: the pooled references of the FedAvg families
minimise the federation's own objectives, the in-process FedAvg replay is the sites' training averaged by case
counts, and the cost table counts every family's round trips (tree levels for gbt) from the audit log."""

from __future__ import annotations

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench import fedavg_pooled as fp
from bench.bench_families import per_family_costs
from common import families, mlp
from server.audit import AuditLog


def _data(seed: int, n: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, s))
    return z, (z[:, 0] - 0.7 * z[:, 1] + rng.normal(size=n) > 0.4).astype(np.float64)


def test_svm_references_are_the_pooled_optimum_and_fedavg_replay_is_pooled_descent_with_one_epoch():
    z, y = _data(1, 90, 4)
    pos_weight, wd = float(np.sum(y == 0) / np.sum(y == 1)), 0.01
    w, b = fp.svm_newton(z, y, pos_weight, wd)
    _, gw, gb = families.svm_loss_grad(w, b, z, y, pos_weight, wd)
    assert np.max(np.abs(np.r_[gw, gb])) < 1e-10  # the objective's gradient vanishes there
    w2, b2 = fp.svm_sklearn(z, y, pos_weight, wd)  # LinearSVC with C = 1 / (n wd), the same objective
    np.testing.assert_allclose(np.r_[w2, b2], np.r_[w, b], atol=1e-6)
    # FedAvg of one local epoch per round, averaged by case counts, is gradient descent on the pooled data
    initial = {"mean": np.zeros(4), "scale": np.ones(4), "linear.weight": np.zeros((1, 4)), "linear.bias": np.zeros(1)}
    sites = [(z[:30], y[:30]), (z[30:75], y[30:75]), (z[75:], y[75:])]
    options = {"epochs": 1, "lr": 0.1, "weight_decay": wd, "pos_weight": pos_weight}
    fed = fp.fedavg("svm", initial, sites, 40, options)
    pooled = families.svm_train_local(initial, z, y, **{**options, "epochs": 40})[0]
    assert fp._max_diff("svm", fed, pooled) < 1e-12
    assert fp._max_diff("svm", fed, {"linear.weight": w, "linear.bias": np.array([b])}) > 1e-3  # not converged yet


def test_mlp_reference_is_a_stationary_point_of_the_federations_objective():
    """MLPClassifier with alpha = wd n and sample weights = class weights minimises the mlp family's objective
    (class-weighted mean log loss + (wd/2)|W|^2): torch's gradient of that objective vanishes at its fit."""
    z, y = _data(2, 60, 3)
    pos_weight, wd = float(np.sum(y == 0) / np.sum(y == 1)), 0.01
    initial = mlp.initial_arrays(np.zeros(3), np.ones(3), 4, seed=7)
    fit = fp.mlp_sklearn(initial, z, y, pos_weight, wd)
    net = mlp._module({k: np.asarray(v, dtype=np.float64) for k, v in fit.items()})
    loss = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float64))(
        net(torch.as_tensor(z)), torch.as_tensor(y))
    loss = loss + wd / 2 * (net.hidden.weight.pow(2).sum() + net.output.weight.pow(2).sum())
    loss.backward()
    grads = [p.grad.abs().max().item() for p in net.parameters()]
    assert max(grads) < 1e-4, grads
    assert fp._max_diff("mlp", fit, initial) > 0.1  # it moved from the start


def test_cost_table_counts_each_familys_round_trips(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", Ed25519PrivateKey.generate())
    audit.append("run-start", run_id=1, config={}, plan_sha256="ab" * 32)
    two = {"a": {}, "b": {}}
    for family, trip, rounds in (("logistic-l2", "newton-round", 3), ("svm", "round-train", 4),
                                 ("gbt", "tree-level", 5)):
        audit.append("model-init", model_sha256="0" * 64, family=family)
        for r in range(1, rounds + 1):
            audit.append(trip, round=r, sites=two, family=family)
        if trip != "round-train":  # the exact and tree fits close with a round-train entry (no message)
            audit.append("round-train", round=rounds, sites=two, family=family)
        audit.append("round-evaluate", round=rounds, sites=two, family=family)
        audit.append(trip, round=1, sites=two, family=family, fold="a")  # a fold's: not the main run's
    costs = per_family_costs(tmp_path, ["logistic-l2", "svm", "gbt"])
    assert {f: (c["rounds"], c["messages"]) for f, c in costs.items()} == {
        "logistic-l2": (3, 8), "svm": (4, 10), "gbt": (5, 12)}
