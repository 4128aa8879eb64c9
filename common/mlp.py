"""The ``mlp`` family in torch: one hidden layer of tanh units, trained by FedAvg rounds of local full-batch epochs.

Scoring is pure numpy (common.families.mlp_proba); this module only builds the seeded initial model and runs a
site's local epochs. Deterministic: the initial weights come from a generator seeded by the run's split-seed (the
same at every fold and site), full-batch steps use no randomness.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from common.model import descend, state_tensors


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
    biases) from the global model; returns the new arrays and the final mean loss. RadiomicsMLP's forward on the
    arrays' own tensors (common.model.descend), without building a module per message."""
    s, hidden = (len(arrays["mean"]), len(arrays["hidden.bias"])) if {"mean", "hidden.bias"} <= set(arrays) else (0, 0)
    state = state_tensors(arrays, {"mean": (s,), "scale": (s,), "hidden.weight": (hidden, s), "hidden.bias": (hidden,),
                                   "output.weight": (1, hidden), "output.bias": (1,)})
    z = (torch.as_tensor(x, dtype=torch.float64) - state["mean"]) / state["scale"]
    w1, b1, w2, b2 = (state[k] for k in ("hidden.weight", "hidden.bias", "output.weight", "output.bias"))
    loss = descend(((w1, weight_decay), (b1, 0.0), (w2, weight_decay), (b2, 0.0)),
                   lambda: functional.linear(torch.tanh(functional.linear(z, w1, b1)), w2, b2).squeeze(-1), y,
                   epochs, lr, pos_weight)
    return {k: v.detach().numpy() for k, v in state.items()}, loss
