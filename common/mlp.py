"""The ``mlp`` family in torch: one hidden layer of tanh units, trained by FedAvg rounds of local full-batch epochs.

Scoring is pure numpy (common.families.mlp_proba); this module only builds the seeded initial model and runs a
site's local epochs. Deterministic: the initial weights come from a generator seeded by the run's split-seed (the
same at every fold and site), full-batch steps use no randomness.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.model import _sgd_step


class RadiomicsMLP(nn.Module):
    """logit = v . tanh(W ((x - mean) / scale) + a) + c, for x (n, s); forward returns (n,) logits."""

    def __init__(self, n_features: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(n_features, dtype=torch.float64))
        self.hidden = nn.Linear(n_features, hidden, dtype=torch.float64)
        self.output = nn.Linear(hidden, 1, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.tanh(self.hidden((x - self.mean) / self.scale))).squeeze(-1)


def initial_arrays(mean: np.ndarray, scale: np.ndarray, hidden: int, seed: int) -> dict[str, np.ndarray]:
    """The seeded initial model (Glorot-uniform weights, zero biases) standardising with mean and scale (s,)."""
    rng = np.random.default_rng(seed)
    s = len(mean)
    bound_in, bound_out = np.sqrt(6.0 / (s + hidden)), np.sqrt(6.0 / (hidden + 1))
    return {"mean": np.asarray(mean, dtype=np.float64), "scale": np.asarray(scale, dtype=np.float64),
            "hidden.weight": rng.uniform(-bound_in, bound_in, (hidden, s)), "hidden.bias": np.zeros(hidden),
            "output.weight": rng.uniform(-bound_out, bound_out, (1, hidden)), "output.bias": np.zeros(1)}


def _module(arrays: dict[str, np.ndarray]) -> RadiomicsMLP:
    net = RadiomicsMLP(arrays["mean"].shape[0], arrays["hidden.weight"].shape[0])
    net.load_state_dict({k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()})
    return net


def train_local(arrays: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, epochs: int, lr: float,
                weight_decay: float, pos_weight: float) -> tuple[dict[str, np.ndarray], float]:
    """``epochs`` full-batch gradient steps on the class-weighted log loss (weight decay on the weights, not the
    biases) from the global model; returns the new arrays and the final mean loss."""
    net = _module(arrays)
    xt, yt = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float64))
    decay = ((net.hidden.weight, weight_decay), (net.hidden.bias, 0.0),
             (net.output.weight, weight_decay), (net.output.bias, 0.0))
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        for param, _ in decay:
            param.grad = None
        loss = loss_fn(net(xt), yt)
        loss.backward()
        _sgd_step(decay, lr)
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}, float(loss.detach())
