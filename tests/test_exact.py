"""Exact federated logistic regression against scikit-learn on the pooled data, torch's loss and the model."""

import numpy as np
import pytest
import sklearn
import torch
from sklearn.linear_model import LogisticRegression

from common import exact, metrics, moments
from common.model import RadiomicsLogistic, model_from_state, predict_proba

SIZES = (23, 61, 140)
D = 8


def _sites(seed: int = 0, sizes=SIZES, d: int = D):
    """Unequal sites with different feature distributions (scanner shifts), labels from a logistic signal.

    Returns the raw per-site (x, y), the per-site standardised (z, y), the pooled mean and scale and pos_weight.
    """
    rng = np.random.default_rng(seed)
    beta = rng.normal(0.0, 1.0, d)
    raw = []
    for k, n in enumerate(sizes):
        x = rng.normal(0.0, 1.0, (n, d)) * (1.0 + 0.3 * k) + 0.5 * k + 10.0 * np.arange(d)
        signal = ((x - 10.0 * np.arange(d) - 0.5 * k) / (1.0 + 0.3 * k)) @ beta
        raw.append((x, (rng.random(n) < 1.0 / (1.0 + np.exp(-(0.4 + 0.8 * signal)))).astype(float)))
    # standardise as the federation does: pooled mean and sample std from the site moments
    mean, scale = moments.pooled_mean_std(*zip(*(moments.site_moments(x) for x, _ in raw), strict=True))
    y = np.concatenate([y for _, y in raw])
    pos_weight = float((y == 0).sum() / (y == 1).sum())
    return raw, [((x - mean) / scale, y) for x, y in raw], mean, scale, pos_weight


def _pooled(sites):
    return np.vstack([z for z, _ in sites]), np.concatenate([y for _, y in sites])


def _sklearn(z, y, pos_weight, l2, l1=0.0):
    """sklearn's fit of the same objective; returns [b, w...].

    sklearn minimises C * sum_i s_i loss_i + l1_ratio ||w||_1 + (1 - l1_ratio)/2 ||w||^2 with the intercept
    unpenalised (lbfgs/newton-* through LinearModelLoss, and sag/saga, in sklearn >= 1.1; liblinear penalises it,
    so it is avoided). Ours is sum_i s_i loss_i + l1 ||w||_1 + l2/2 ||w||^2: multiply by C = 1/(l1 + l2) and
    l1_ratio = l1/(l1 + l2).
    """
    new_api = tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 8)  # `penalty` deprecated in 1.8
    common = {"class_weight": {0: 1.0, 1: pos_weight}, "fit_intercept": True}
    if l1 == 0 and l2 == 0:
        kw = {"C": np.inf} if new_api else {"penalty": None}
        model = LogisticRegression(solver="newton-cholesky", tol=1e-12, max_iter=10_000, **kw, **common)
    elif l1 == 0:
        model = LogisticRegression(C=1.0 / l2, solver="newton-cholesky", tol=1e-12, max_iter=10_000, **common)
    else:
        kw = {} if new_api else {"penalty": "elasticnet"}
        model = LogisticRegression(C=1.0 / (l1 + l2), l1_ratio=l1 / (l1 + l2), solver="saga", tol=1e-14,
                                   max_iter=200_000, **kw, **common)
    model.fit(z, y)
    return np.concatenate([model.intercept_, model.coef_.ravel()])


def _kkt(sites, coef, pos_weight, l2, l1):
    """Max violation of the optimality conditions of J at coef, from fresh site terms."""
    total = exact.sum_terms(exact.site_terms(z, y, coef, pos_weight) for z, y in sites)
    g = total.grad + l2 * np.r_[0.0, coef[1:]]
    w, gw = coef[1:], g[1:]
    viol = np.where(w != 0, np.abs(gw + l1 * np.sign(w)), np.maximum(np.abs(gw) - l1, 0.0))
    return max(abs(g[0]), float(viol.max()))


# ---- site terms -------------------------------------------------------------------------------------------------

def test_site_terms_summed_over_sites_equal_pooled_terms():
    _, sites, _, _, pw = _sites()
    coef = np.random.default_rng(5).normal(0.0, 0.7, D + 1)
    total = exact.sum_terms(exact.site_terms(z, y, coef, pw) for z, y in sites)
    pooled = exact.site_terms(*_pooled(sites), coef, pw)
    assert np.abs(total.grad - pooled.grad).max() <= 1e-10
    assert np.abs(total.hess - pooled.hess).max() <= 1e-10
    assert abs(total.loss - pooled.loss) <= 1e-10
    assert (total.n, total.n_pos, total.n_neg) == (pooled.n, pooled.n_pos, pooled.n_neg) == (
        sum(SIZES), int(pooled.n_pos), sum(SIZES) - int(pooled.n_pos))


@pytest.mark.parametrize("n", [1, 5, 300])
def test_what_a_site_sends_has_sizes_fixed_by_d_not_n(n):
    rng = np.random.default_rng(n)
    terms = exact.site_terms(rng.normal(size=(n, D)), rng.integers(0, 2, n), np.zeros(D + 1), 1.3)
    assert terms.grad.shape == (D + 1,)
    assert terms.hess.shape == (D + 1, D + 1)
    assert np.array_equal(terms.hess, terms.hess.T)
    assert np.isscalar(terms.loss) or isinstance(terms.loss, float)


def test_site_terms_are_torch_weighted_bce_summed_with_its_gradient_and_hessian():
    """The same loss FedAvg's train_local optimises (BCEWithLogitsLoss with pos_weight), summed, not averaged."""
    _, sites, _, _, pw = _sites(seed=2)
    z, y = sites[1]
    coef = np.random.default_rng(1).normal(0.0, 0.5, D + 1)
    terms = exact.site_terms(z, y, coef, pw)
    zt, yt = torch.from_numpy(z), torch.from_numpy(y)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pw, dtype=torch.float64), reduction="sum")

    def loss(beta):
        return loss_fn(beta[0] + zt @ beta[1:], yt)

    beta = torch.tensor(coef, requires_grad=True)
    value = loss(beta)
    value.backward()
    assert terms.loss == pytest.approx(float(value.detach()), rel=1e-13)
    assert np.abs(terms.grad - beta.grad.numpy()).max() <= 1e-10
    hess = torch.autograd.functional.hessian(loss, torch.tensor(coef)).numpy()
    assert np.abs(terms.hess - hess).max() <= 1e-10


def test_site_terms_refuse_bad_input():
    z, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="shape"):
        exact.site_terms(z, y, np.zeros(2), 1.0)
    with pytest.raises(ValueError, match="0 or 1"):
        exact.site_terms(z, np.array([0, 2, 0, 1]), np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="finite"):
        exact.site_terms(np.full((4, 2), np.nan), y, np.zeros(3), 1.0)


# ---- the fit ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("l2", [1.0, 0.01])
def test_l2_fit_equals_sklearn_pooled_fit(l2):
    _, sites, _, _, pw = _sites()
    fit = exact.fit_exact(sites, pw, l2)
    z, y = _pooled(sites)
    reference = _sklearn(z, y, pw, l2)
    assert fit.converged
    assert fit.rounds <= 15
    assert np.abs(fit.coef - reference).max() <= 1e-8
    assert metrics.roc_auc(y, fit.intercept + z @ fit.weights) == metrics.roc_auc(y, reference[0] + z @ reference[1:])
    # Newton from zero decreases J every round here, and the split between sites does not matter
    assert all(b <= a + 1e-9 for a, b in zip(fit.objective, fit.objective[1:], strict=False))
    assert np.abs(exact.fit_exact([(z, y)], pw, l2).coef - fit.coef).max() <= 1e-12
    assert (fit.n, fit.n_pos + fit.n_neg) == (sum(SIZES), sum(SIZES))


def test_the_fit_is_not_sklearn_with_a_penalised_intercept():
    """Guards the comparison: with the intercept penalised (liblinear) the answer differs measurably."""
    _, sites, _, _, pw = _sites()
    z, y = _pooled(sites)
    fit = exact.fit_exact(sites, pw, 1.0)
    lib = LogisticRegression(C=1.0, solver="liblinear", class_weight={0: 1.0, 1: pw}, tol=1e-12,
                             max_iter=10_000).fit(z, y)
    assert abs(fit.intercept - float(lib.intercept_[0])) > 1e-4


@pytest.mark.parametrize(("l1", "l2"), [(5.0, 0.0), (5.0, 1.0), (20.0, 0.0)])
def test_l1_and_elastic_net_fit_kkt_sparsity_and_saga(l1, l2):
    _, sites, _, _, pw = _sites()
    fit = exact.fit_exact(sites, pw, l2, l1)
    assert fit.converged and fit.rounds <= 15
    # optimality checked directly, from fresh site terms at the answer (gradients are sums over ~200 cases)
    assert _kkt(sites, fit.coef, pw, l2, l1) <= 1e-8
    zeros = int(np.sum(fit.weights == 0.0))
    assert 0 < zeros < D, "the penalty should zero some weights exactly, not all"
    # saga (intercept unpenalised) stops when an epoch moves no weight by more than tol (1e-14) relative; on
    # standardised data its linear rate leaves an error orders of magnitude below 1e-8
    reference = _sklearn(*_pooled(sites), pw, l2, l1)
    assert np.abs(fit.coef - reference).max() <= 1e-8
    assert np.array_equal(fit.weights == 0.0, np.abs(reference[1:]) < 1e-10)
    info = fit.history[-1].info
    assert info is not None and info.optimality <= 1e-6


def test_unpenalised_fit_with_a_constant_feature_is_damped_not_singular():
    """A feature constant over the federation standardises to 0 everywhere; with l2 = 0 its Hessian row is 0."""
    _, sites, _, _, pw = _sites(seed=4)
    padded = [(np.column_stack([z, np.zeros(len(z))]), y) for z, y in sites]
    fit = exact.fit_exact(padded, pw, l2=0.0)
    assert fit.converged
    assert abs(fit.weights[-1]) <= 1e-12
    assert any(r.info is not None and r.info.damping > 0 for r in fit.history)
    reference = _sklearn(*_pooled(sites), pw, l2=0.0)
    assert np.abs(fit.coef[:-1] - reference).max() <= 1e-7


def test_rejected_overshoot_is_halved_back_and_still_converges():
    """From a far start plain Newton oscillates off to infinity; the server's safeguard (J from the next round's
    loss sums) rejects the overshoot and lands on sklearn's answer."""
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 1.0, (200, 1))
    y = (rng.random(200) < 1.0 / (1.0 + np.exp(-z[:, 0]))).astype(float)
    pw = float((y == 0).sum() / (y == 1).sum())
    start = np.array([0.0, 30.0])

    plain = start.copy()
    for _ in range(10):
        terms = exact.site_terms(z, y, plain, pw)
        plain, _ = exact.newton_update(terms.grad, terms.hess, plain, 1.0)
    assert np.abs(plain).max() > 100  # diverged

    server = exact.ExactNewton(d=1, l2=1.0)
    server.coef = start.copy()
    while not server.update(exact.site_terms(z, y, server.coef, pw)):
        pass
    assert server.converged
    assert any(not r.accepted for r in server.history)
    assert np.abs(server.coef - _sklearn(z, y, pw, 1.0)).max() <= 1e-8
    with pytest.raises(RuntimeError):
        server.update(exact.site_terms(z, y, server.coef, pw))


# ---- dimensions -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "d"), [(20, 20), (20, 19), (5, 30)])
def test_check_dimensions_refuses_features_not_fewer_than_cases(n, d):
    with pytest.raises(ValueError) as err:
        exact.check_dimensions(n, d, site_name="hospital-d")
    message = str(err.value)
    assert "hospital-d" in message and f"{n} cases" in message and f"{d} features" in message
    assert "select-features" in message and "fedavg" in message


def test_check_dimensions_accepts_enough_cases_and_honours_the_factor():
    exact.check_dimensions(21, 19, site_name="a")
    with pytest.raises(ValueError, match="at least 41 cases"):
        exact.check_dimensions(40, 19, site_name="a", min_cases_per_parameter=2.0)
    exact.check_dimensions(41, 19, site_name="a", min_cases_per_parameter=2.0)


def test_fit_exact_refuses_a_site_too_small_for_its_features():
    _, sites, _, _, pw = _sites(sizes=(40, 8, 60))
    with pytest.raises(ValueError, match="site 1: 8 cases"):
        exact.fit_exact(sites, pw, 1.0)


# ---- the model's state dict -------------------------------------------------------------------------------------

def test_state_dict_has_the_model_format_and_predicts_on_raw_features():
    raw, sites, mean, scale, pw = _sites()
    fit = exact.fit_exact(sites, pw, 1.0)
    state = exact.to_state_dict(fit.coef, mean, scale)
    template = RadiomicsLogistic(D).state_dict()
    assert list(state) == list(template)
    for key, value in template.items():
        assert state[key].dtype == value.dtype == torch.float64
        assert state[key].shape == value.shape
    model = model_from_state(state)  # load_state_dict is strict
    x = np.vstack([x for x, _ in raw])
    expected = 1.0 / (1.0 + np.exp(-(fit.intercept + ((x - mean) / scale) @ fit.weights)))
    assert np.abs(predict_proba(model, x) - expected).max() <= 1e-12
    coef, mean_back, scale_back = exact.from_state_dict(state)
    assert np.array_equal(coef, fit.coef) and np.array_equal(mean_back, mean) and np.array_equal(scale_back, scale)
