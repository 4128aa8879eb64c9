"""The shared math against references: scikit-learn metrics, numpy on pooled data."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from common import metrics, moments
from common.split import eligibility_problem


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_including_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    y[:2] = [0, 1]
    score = np.round(rng.random(40), 1)  # coarse rounding forces ties
    assert metrics.roc_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_auc_undefined_with_one_class():
    assert np.isnan(metrics.roc_auc(np.ones(5), np.linspace(0, 1, 5)))


def test_confusion_and_rates_match_sklearn():
    rng = np.random.default_rng(1)
    y, score = rng.integers(0, 2, 50), rng.random(50)
    counts = metrics.confusion_counts(y, score)
    tn, fp, fn, tp = confusion_matrix(y, score >= 0.5).ravel()
    assert (counts["tp"], counts["fp"], counts["tn"], counts["fn"]) == (tp, fp, tn, fn)
    r = metrics.rates(counts)
    assert r["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert r["balanced_accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2)


def test_combined_site_rates_equal_pooled_rates():
    rng = np.random.default_rng(2)
    sites = [(rng.integers(0, 2, n), rng.random(n)) for n in (12, 30, 7)]
    records = [{**metrics.confusion_counts(y, s), "auc": metrics.roc_auc(y, s), "n": len(y)} for y, s in sites]
    combined = metrics.combine_sites(records)
    pooled = metrics.rates(metrics.confusion_counts(np.concatenate([y for y, _ in sites]),
                                                    np.concatenate([s for _, s in sites])))
    assert combined["sensitivity"] == pytest.approx(pooled["sensitivity"])
    assert combined["specificity"] == pytest.approx(pooled["specificity"])
    expected_auc = sum(r["auc"] * r["n"] for r in records) / sum(r["n"] for r in records)
    assert combined["auc"] == pytest.approx(expected_auc)


def test_pooled_moments_equal_numpy_on_pooled_data_even_for_huge_means():
    rng = np.random.default_rng(3)
    # energy-like features: huge mean, small spread, where raw sums of squares lose all precision
    blocks = [1e7 + rng.normal(0, 1.0, (n, 4)) * [1, 10, 100, 0.1] for n in (5, 17, 31)]
    mean, std = moments.pooled_mean_std(*zip(*(moments.site_moments(b) for b in blocks), strict=True))
    pooled = np.vstack(blocks)
    np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(std, pooled.std(axis=0, ddof=1), rtol=1e-7)
    # what raw sums of squares would have given: visibly wrong on the narrowest feature
    n = len(pooled)
    naive = np.sqrt((np.sum(pooled**2, axis=0) - n * pooled.mean(axis=0) ** 2) / (n - 1))
    assert abs(naive[3] - std[3]) / std[3] > 0.01


def test_eligibility_needs_two_release_blocks_per_class_and_k_in_each_split():
    assert eligibility_problem(10, 10, 5, 0.3, block=5) is None  # 5 + 5 training, 5 + 5 held out
    assert "each class needs at least 10" in eligibility_problem(9, 20, 5, 0.3, block=5)
    assert "each class needs at least 16" in eligibility_problem(12, 30, 5, 0.3, block=8)
    # the run's k above the block size: 2 blocks of 5 leave 5 training HGG < 6
    assert "training" in eligibility_problem(10, 30, 6, 0.3, block=5)
    assert eligibility_problem(15, 15, 6, 0.3, block=5) is None  # 3 blocks: 2 train (>= 10), 1 held out


def test_site_share_is_the_r2_of_the_feature_on_site_indicators():
    from common.moments import site_moments, site_share

    rng = np.random.default_rng(4)
    sizes = (12, 30, 7)
    blocks = [rng.normal(loc=rng.normal(0, 2, 5), scale=rng.uniform(0.5, 3, 5), size=(n, 5)) for n in sizes]
    blocks[1][:, 0] = blocks[0][0, 0] + rng.normal(0, 1, sizes[1])  # feature 0: one site shifted, others similar
    parts = [site_moments(b) for b in blocks]
    share = site_share(*zip(*parts, strict=True))
    x = np.vstack(blocks)
    onehot = np.repeat(np.eye(len(sizes)), sizes, axis=0)
    fitted = onehot @ np.linalg.lstsq(onehot, x, rcond=None)[0]
    r2 = 1 - ((x - fitted) ** 2).sum(axis=0) / ((x - x.mean(axis=0)) ** 2).sum(axis=0)
    np.testing.assert_allclose(share, r2, rtol=1e-10, atol=1e-12)
    same = [site_moments(np.ones((n, 1))) for n in sizes]  # no variation at all: undefined, not 0
    assert np.isnan(site_share(*zip(*same, strict=True))[0])

@pytest.mark.parametrize("seed", range(6))
def test_local_training_is_torch_sgd_bit_for_bit(seed):
    """train_local writes the module's forward, its loss and SGD's step out on the state's tensors (no module per
    message; torch.optim's first step imports torch._dynamo, seconds per process): the trained state, in the state
    dict's order, and the loss equal RadiomicsLogistic under torch.optim.SGD's exactly, weight decay on the weights
    only."""
    import torch

    from common import model

    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(10, 60)), int(rng.integers(1, 12))
    x, y = rng.normal(size=(n, d)) * 3 + 1, (rng.random(n) < 0.4).astype(float)
    epochs, lr, pos_weight = int(rng.integers(1, 8)), float(rng.uniform(0.01, 0.5)), float(rng.uniform(0.5, 2))
    wd = float(rng.choice([0, 1e-3, 0.1]))
    reference = model.build_model(x.mean(0), x.std(0) + 0.1)
    with torch.no_grad():  # a zero start (as FedAvg's first round) or a trained model's
        reference.linear.weight.copy_(torch.as_tensor(rng.normal(size=(1, d)) if seed % 2 else np.zeros((1, d))))
        reference.linear.bias.fill_(float(rng.normal()) if seed % 2 else 0.0)
    start = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
    trained, loss = model.train_local(start, x, y, epochs, lr, wd, pos_weight)

    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float64))
    optimizer = torch.optim.SGD([{"params": [reference.linear.weight], "weight_decay": wd},
                                 {"params": [reference.linear.bias], "weight_decay": 0.0}], lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        ref_loss = loss_fn(reference(xt), yt)
        ref_loss.backward()
        optimizer.step()
    assert loss == float(ref_loss.detach())
    assert list(trained) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert trained[key].dtype == np.float64 and np.array_equal(trained[key], value.numpy()), key


def test_local_training_writes_its_gradient_out_without_autograd():
    """The logistic model's local epochs take no autograd graph (its gradient is written out, common.model
    _logistic_descend: half the CPU of a tiny site's step): with autograd off they give the same bits as with it on,
    where a backward pass would have nothing to differentiate; the caller's grad mode is left as it was."""
    import torch

    from common import model

    rng = np.random.default_rng(7)
    n, d = 40, 5
    x, y = rng.normal(size=(n, d)) * 3 + 1, (rng.random(n) < 0.4).astype(float)
    start = {"mean": x.mean(0), "scale": x.std(0) + 0.1, "linear.weight": rng.normal(size=(1, d)),
             "linear.bias": rng.normal(size=1)}
    with_grad, loss = model.train_local(start, x, y, 5, 0.05, 1e-3, 1.3)
    with torch.no_grad():
        without, loss_without = model.train_local(start, x, y, 5, 0.05, 1e-3, 1.3)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert loss == loss_without
    for key in with_grad:
        assert np.array_equal(with_grad[key], without[key]), key
        assert not np.shares_memory(with_grad[key], start[key])  # the global model's arrays are not trained in place
    assert not np.array_equal(with_grad["linear.weight"], start["linear.weight"])


@pytest.mark.parametrize("seed", range(4))
def test_mlp_local_training_is_its_module_under_torch_sgd_bit_for_bit(seed):
    """The mlp family's local epochs, written out on the state's tensors (no module per message), equal
    RadiomicsMLP's forward under BCEWithLogitsLoss and torch.optim.SGD exactly: arrays in the state dict's order,
    loss, weight decay on the weights only."""
    import torch

    from common import mlp

    rng = np.random.default_rng(seed)
    n, d, hidden = int(rng.integers(10, 60)), int(rng.integers(1, 9)), int(rng.integers(1, 6))
    x, y = rng.normal(size=(n, d)) * 3 + 1, (rng.random(n) < 0.4).astype(float)
    epochs, lr, pos_weight = int(rng.integers(1, 8)), float(rng.uniform(0.01, 0.5)), float(rng.uniform(0.5, 2))
    wd = float(rng.choice([0, 1e-3, 0.1]))
    start = mlp.initial_arrays(x.mean(0), x.std(0) + 0.1, hidden, seed)
    trained, loss = mlp.train_local(start, x, y, epochs, lr, wd, pos_weight)

    reference = mlp._module(start)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float64))
    optimizer = torch.optim.SGD([{"params": [reference.hidden.weight, reference.output.weight], "weight_decay": wd},
                                 {"params": [reference.hidden.bias, reference.output.bias], "weight_decay": 0.0}],
                                lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        ref_loss = loss_fn(reference(torch.as_tensor(x)), torch.as_tensor(y))
        ref_loss.backward()
        optimizer.step()
    assert loss == float(ref_loss.detach())
    assert list(trained) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert np.array_equal(trained[key], value.numpy()), key


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_local_training_refuses_a_state_load_state_dict_refused(change):
    """A model state that is not the family's module's (an array missing or extra, a wrong shape) is refused, as
    load_state_dict refused it before the steps stopped building a module."""
    from common import mlp, model

    x, y = np.zeros((4, 3)), np.array([0.0, 1, 0, 1])
    logistic = {"mean": np.zeros(3), "scale": np.ones(3), "linear.weight": np.zeros((1, 3)), "linear.bias": np.zeros(1)}
    hidden = mlp.initial_arrays(np.zeros(3), np.ones(3), 2, 0)
    for state, train in ((logistic, model.train_local), (hidden, mlp.train_local)):
        assert train(dict(state), x, y, 1, 0.1, 0.0, 1.0)[0].keys() == state.keys()  # the state as it comes: trained
        if change == "missing":
            del state["scale"]
        elif change == "extra":
            state["extra.weight"] = np.zeros((2, 3))
        else:
            state["mean"] = np.zeros(4)
        with pytest.raises(ValueError, match="model's state"):
            train(state, x, y, 1, 0.1, 0.0, 1.0)
