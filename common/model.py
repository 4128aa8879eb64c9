"""The shared classifier: standardisation + logistic regression in torch, with class weights.

Standardisation (the federation's pooled mean and std) is part of the model as fixed buffers, so one
state dict carries everything needed to score a harmonised feature vector.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional


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
    the buffers (mean, scale) are not trained. The module's forward on the arrays' own tensors, without building a
    module per message, and its gradient written out (``_logistic_descend``) rather than taken by autograd.
    """
    d = len(arrays["mean"]) if "mean" in arrays else 0
    state = state_tensors(arrays, {"mean": (d,), "scale": (d,), "linear.weight": (1, d), "linear.bias": (1,)})
    with torch.no_grad():
        z = (torch.as_tensor(x, dtype=torch.float64) - state["mean"]) / state["scale"]
        # weight decay on the weights only: penalising the intercept would bias the class balance
        loss = _logistic_descend(z, state["linear.weight"], state["linear.bias"], y, epochs, lr, weight_decay,
                                 pos_weight)
    return {k: v.numpy() for k, v in state.items()}, loss


def _logistic_descend(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y: np.ndarray, epochs: int,
                      lr: float, weight_decay: float, pos_weight: float) -> float:
    """``descend`` for the logistic model (logits = z weightᵀ + bias) with the gradient written out: the operations
    autograd runs for ``nn.Linear`` and ``BCEWithLogitsLoss(pos_weight)`` (mean) in their order (torch's
    binary_cross_entropy_with_logits_backward: (pos_weight y + 1 - y) sigmoid(logit) - pos_weight y, over n; addmm's
    backward: gradᵀ z and the column sum), so the same bits (tests/test_math.py, against torch.optim.SGD on the
    module), at about half the CPU of a tiny site's step: no graph, no engine call per epoch, and the loss only for
    the last epoch, the one returned (before its step). Runs under no_grad; updates weight and bias in place."""
    yt = torch.as_tensor(y, dtype=torch.float64)
    weights = torch.tensor(pos_weight, dtype=torch.float64)
    positive = weights.mul(yt)  # the same for every epoch, as autograd computes them in each
    factor = positive.add(1).sub(yt)
    n = yt.numel()
    loss = float("nan")
    for epoch in range(epochs):
        logits = torch.addmm(bias, z, weight.t()).squeeze(-1)
        if epoch == epochs - 1:
            loss = float(functional.binary_cross_entropy_with_logits(logits, yt, pos_weight=weights))
        grad = factor.mul(logits.sigmoid()).sub(positive).div_(n).unsqueeze(-1)  # (n, 1): d loss / d logit
        grad_weight, grad_bias = grad.t().mm(z), grad.sum(0)
        if weight_decay != 0:  # as torch.optim.SGD adds it
            grad_weight = grad_weight.add(weight, alpha=weight_decay)
        weight.add_(grad_weight, alpha=-lr)
        bias.add_(grad_bias, alpha=-lr)
    return loss


def state_tensors(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A model's arrays as float64 tensors of their own (the trained ones will require grad), in the order of
    ``shapes``, the module's state dict order; a missing, extra or misshapen array is refused, as the module's
    load_state_dict refused it."""
    if set(arrays) != set(shapes):
        raise ValueError(f"the model's state holds {sorted(arrays)}, not {list(shapes)}")
    wrong = [f"{k} {np.shape(arrays[k])} (expected {shape})" for k, shape in shapes.items()
             if np.shape(arrays[k]) != shape]
    if wrong:
        raise ValueError(f"the model's state has the wrong shapes: {', '.join(wrong)}")
    return {k: torch.tensor(np.asarray(arrays[k]), dtype=torch.float64) for k in shapes}


def descend(params: tuple[tuple[torch.Tensor, float], ...], logits: Callable[[], torch.Tensor], y: np.ndarray,
            epochs: int, lr: float, pos_weight: float) -> float:
    """``epochs`` full-batch SGD steps of the trained tensors ``params`` (each with its weight decay) on the
    class-weighted mean log loss of ``logits()`` (n,) against y (n,): BCEWithLogitsLoss and torch.optim.SGD's
    operations in their order, so bit for bit the same; returns the last epoch's loss (before its step)."""
    for param, _ in params:
        param.requires_grad_(True)
    yt = torch.as_tensor(y, dtype=torch.float64)
    weights = torch.tensor(pos_weight, dtype=torch.float64)
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        for param, _ in params:
            param.grad = None
        loss = functional.binary_cross_entropy_with_logits(logits(), yt, pos_weight=weights)
        loss.backward()
        _sgd_step(params, lr)
    return float(loss.detach())


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
