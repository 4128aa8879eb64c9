"""Model families (common/families.py, common/mlp.py): one scoring interface, and each family's federated fit
against a pooled fit of the same objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from scipy.optimize import minimize

from client import compute
from client.guard import PrivacyError, check_reply
from common import families, mlp, model, protocol, runconfig
from radfed.launch import APP_DIR, app_run_config

DEFAULTS = app_run_config(app_dir=APP_DIR)


def _data(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.4).astype(float)
    x = rng.normal(0, 1, (n, d)) + 0.9 * y[:, None] * rng.normal(0, 1, d)
    return x * rng.uniform(0.5, 3, d) + rng.normal(0, 5, d), y


def test_models_knob_is_validated_naming_the_key_and_the_known_families():
    assert runconfig.parse({**DEFAULTS, "models": " svm ,mlp"}).families == ["svm", "mlp"]
    for bad, words in (("logistic-l2,bogus", "unknown model family 'bogus'"), ("", "models is empty"),
                       ("svm,svm", "more than once")):
        with pytest.raises(runconfig.RunConfigError, match=words) as err:
            runconfig.parse({**DEFAULTS, "models": bad})
        assert "'models'" in str(err.value) and ("logistic-l1" in str(err.value) or "once" in str(err.value))


def test_linear_scoring_is_the_torch_logistic_model():
    rng = np.random.default_rng(1)
    x, _ = _data(rng, 40, 6)
    net = model.build_model(x.mean(0), x.std(0))
    with torch.no_grad():
        net.linear.weight.copy_(torch.as_tensor(rng.normal(0, 1, (1, 6))))
        net.linear.bias.fill_(-0.3)
    arrays = {k: v.numpy() for k, v in net.state_dict().items()}
    np.testing.assert_allclose(families.predict_proba("logistic-l2", arrays, x), model.predict_proba(net, x),
                               rtol=1e-13, atol=1e-15)
    # a family's scoring refuses another family's arrays, naming what is missing
    with pytest.raises(families.FamilyError, match="hidden.weight"):
        families.predict_proba("mlp", arrays, x)


def test_mlp_numpy_scoring_equals_its_torch_module_and_training_is_deterministic():
    rng = np.random.default_rng(2)
    x, y = _data(rng, 60, 5)
    start = mlp.initial_arrays(x.mean(0), x.std(0), hidden=4, seed=7)
    again_start = mlp.initial_arrays(x.mean(0), x.std(0), 4, 7)
    np.testing.assert_array_equal(start["hidden.weight"], again_start["hidden.weight"])
    trained, loss = mlp.train_local(start, x, y, epochs=30, lr=0.1, weight_decay=0.001, pos_weight=1.5)
    again, loss2 = mlp.train_local(start, x, y, epochs=30, lr=0.1, weight_decay=0.001, pos_weight=1.5)
    assert loss == loss2 and all(np.array_equal(trained[k], again[k]) for k in trained)
    _, loss0 = mlp.train_local(start, x, y, epochs=1, lr=0.1, weight_decay=0.001, pos_weight=1.5)
    assert loss < loss0
    net = mlp._module(trained)
    with torch.no_grad():
        reference = torch.sigmoid(net(torch.as_tensor(x))).numpy()
    np.testing.assert_allclose(families.predict_proba("mlp", trained, x), reference, rtol=1e-12, atol=1e-15)
    # the site's train step returns the mlp's arrays, which the guard accepts at the agreed sizes only
    config = {"family": "mlp", "local-epochs": 2, "learning-rate": 0.1, "weight-decay": 0.0, "pos-weight": 1.0}
    new_state, metrics = compute.train_step(x, y, start, config)
    reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in new_state.items()}),
                        "metrics": MetricRecord(metrics)})
    check_reply(protocol.TRAIN, reply, k=5, sizes={"s": 5, "u": 4})
    with pytest.raises(PrivacyError, match="hidden.weight"):
        check_reply(protocol.TRAIN, reply, k=5, sizes={"s": 5, "u": 3})


def _svm_objective(theta: np.ndarray, z: np.ndarray, y: np.ndarray, pos_weight: float, wd: float) -> float:
    loss, _, _ = families.svm_loss_grad(theta[1:], theta[0], z, y, pos_weight, wd)
    return loss


def _pooled_svm_newton(z: np.ndarray, y: np.ndarray, pos_weight: float, wd: float) -> np.ndarray:
    """The pooled squared-hinge fit by generalised Newton (active-set Hessian), [b, w...]."""
    n, d = z.shape
    t, c = 2 * y - 1, np.where(y == 1, pos_weight, 1.0)
    a = np.c_[np.ones(n), z]
    theta = np.zeros(d + 1)
    reg = np.diag(np.r_[0.0, np.full(d, wd)])
    for _ in range(100):
        slack = np.maximum(0, 1 - t * (a @ theta))
        grad = a.T @ (-2 * c * slack * t) / n + reg @ theta
        active = slack > 0
        hess = 2 * (a[active].T * c[active]) @ a[active] / n + reg
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if np.abs(step).max() < 1e-14:
            break
    return theta


def test_svm_fedavg_with_one_local_epoch_reaches_the_pooled_squared_hinge_fit():
    """FedAvg of one full-batch gradient step per site, weighted by case counts, is a gradient step on the pooled
    objective: the rounds converge to the pooled fit, here within 1e-6 of a pooled generalised-Newton fit (and of
    scipy's BFGS on the same objective)."""
    rng = np.random.default_rng(3)
    sites = [_data(rng, n, 4) for n in (30, 45, 25)]
    x, y = np.vstack([s[0] for s in sites]), np.concatenate([s[1] for s in sites])
    mean, std = x.mean(0), x.std(0)
    pos_weight, wd = float(np.sum(y == 0) / np.sum(y == 1)), 0.05
    arrays = {k: v.numpy() for k, v in model.build_model(mean, std).state_dict().items()}
    for _ in range(3000):
        updates = [families.svm_train_local(arrays, xs, ys, 1, 0.1, wd, pos_weight)[0] for xs, ys in sites]
        weights = np.array([len(ys) for _, ys in sites], dtype=float)
        arrays = {k: np.tensordot(weights / weights.sum(), np.array([u[k] for u in updates]), axes=1)
                  for k in arrays}
    fed = np.r_[arrays["linear.bias"], arrays["linear.weight"].ravel()]
    z = (x - mean) / std
    pooled = _pooled_svm_newton(z, y, pos_weight, wd)
    np.testing.assert_allclose(fed, pooled, atol=1e-6)
    bfgs = minimize(_svm_objective, np.zeros(5), args=(z, y, pos_weight, wd), method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(pooled, bfgs.x, atol=1e-5)
    # the score ranks as the margin does and crosses 0.5 where the margin is 0
    margin = z @ pooled[1:] + pooled[0]
    score = families.predict_proba("svm", arrays, x)
    assert np.array_equal(score > 0.5, margin > 0)
