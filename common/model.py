"""The shared classifier: standardisation + logistic regression in torch, with class weights.

Standardisation (the federation's pooled mean and std) is part of the model as fixed buffers, so one
state dict carries everything needed to score a harmonised feature vector.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional

STATE_KEYS = ("mean", "scale", "linear.weight", "linear.bias")  # a state dict's arrays, in its order


class RadiomicsLogistic(nn.Module):
    """logit = w . ((x - mean) / scale) + b, for x of shape (n, d); forward returns (n,) logits."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(n_features, dtype=torch.float64))
        self.linear = nn.Linear(n_features, 1, dtype=torch.float64)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.scale).squeeze(-1)


def build_model(mean: np.ndarray, scale: np.ndarray) -> RadiomicsLogistic:
    """A zero-initialised model standardising with the given (d,) mean and scale."""
    model = RadiomicsLogistic(len(mean))
    with torch.no_grad():
        model.mean.copy_(torch.as_tensor(mean, dtype=torch.float64))
        model.scale.copy_(torch.as_tensor(scale, dtype=torch.float64))
    return model


def model_from_state(state: dict[str, torch.Tensor]) -> RadiomicsLogistic:
    model = RadiomicsLogistic(int(state["mean"].shape[0]))
    model.load_state_dict(state)
    return model


def train_local(arrays: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, epochs: int, lr: float,
                weight_decay: float, pos_weight: float) -> tuple[dict[str, np.ndarray], float]:
    """Full-batch gradient descent on class-weighted logistic loss from the global model's arrays (a
    RadiomicsLogistic state dict); returns the new arrays and the final mean loss.

    ``pos_weight`` (n_negative / n_positive over the federation) balances HGG against BM;
    the buffers (mean, scale) are not trained. The module's forward and BCEWithLogitsLoss's operations, in the same
    order on the same tensors, without building a module per message (a third of a train message's handler time);
    the standardisation, the same in every epoch, is computed once.
    """
    _check_state(arrays)
    mean, scale, weight, bias = (torch.tensor(np.asarray(arrays[k]), dtype=torch.float64) for k in STATE_KEYS)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    z = (torch.as_tensor(x, dtype=torch.float64) - mean) / scale
    yt = torch.as_tensor(y, dtype=torch.float64)
    weights = torch.tensor(pos_weight, dtype=torch.float64)
    # weight decay on the weights only: penalising the intercept would bias the class balance
    decay = ((weight, weight_decay), (bias, 0.0))
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        weight.grad = bias.grad = None
        loss = functional.binary_cross_entropy_with_logits(functional.linear(z, weight, bias).squeeze(-1), yt,
                                                           pos_weight=weights)
        loss.backward()
        _sgd_step(decay, lr)
    trained = (mean, scale, weight.detach(), bias.detach())
    return {k: v.numpy() for k, v in zip(STATE_KEYS, trained, strict=True)}, float(loss.detach())


def _check_state(arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse a state that is not exactly RadiomicsLogistic's arrays in its shapes (what load_state_dict refused:
    a missing, extra or misshapen array)."""
    if set(arrays) != set(STATE_KEYS) or np.ndim(arrays["mean"]) != 1:
        raise ValueError(f"a logistic model's state holds {', '.join(STATE_KEYS)} (d,), (d,), (1, d), (1,); "
                         f"got {sorted(arrays)}")
    d = len(arrays["mean"])
    expected = {"mean": (d,), "scale": (d,), "linear.weight": (1, d), "linear.bias": (1,)}
    wrong = [f"{k} {np.shape(arrays[k])}" for k, shape in expected.items() if np.shape(arrays[k]) != shape]
    if wrong:
        raise ValueError(f"a logistic model of {d} inputs has the wrong shapes: {', '.join(wrong)}")


@torch.no_grad()
def _sgd_step(decay: tuple[tuple[torch.Tensor, float], ...], lr: float) -> None:
    """One step of torch.optim.SGD without momentum, the same operations in the same order (so bit for bit the
    same), written out because torch.optim's first step imports torch._dynamo: ~800 modules, 3 to 7 s in every
    new process, i.e. in every simulation worker and deployed ClientApp process."""
    for param, weight_decay in decay:
        grad = param.grad
        assert grad is not None
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        param.add_(grad, alpha=-lr)


def predict_proba(model: RadiomicsLogistic, x: np.ndarray) -> np.ndarray:
    """(n,) probability of HGG."""
    model.eval()
    with torch.no_grad():
        return torch.sigmoid(model(torch.as_tensor(x, dtype=torch.float64))).numpy()
