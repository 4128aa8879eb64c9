"""Model families fitted under one protocol: name -> how a model of that family scores cases, pure numpy.

Every family's model is a flat dict of named arrays (what a train reply, ``model.pt`` and the audit hashes hold).
All start with the pooled standardisation ``mean`` (s,) and ``scale`` (s,): z = (x - mean) / scale.

- ``logistic-l2``, ``logistic-l1``: p = sigmoid(w . z + b), ``linear.weight`` (1, s), ``linear.bias`` (1,).
- ``svm``: the same arrays, margin f = w . z + b of a squared-hinge linear SVM; its score is sigmoid(f), which
  ranks as the margin does and crosses 0.5 where f = 0 (the SVM's decision), but is not a calibrated probability.
- ``gbt``: gradient-boosted trees grown from histograms (common/trees.py; its arrays are described there).
- ``mlp``: one hidden layer, p = sigmoid(v . tanh(W z + a) + c), ``hidden.weight`` (u, s), ``hidden.bias`` (u,),
  ``output.weight`` (1, u), ``output.bias`` (1,).

A new family adds one ``Family`` to ``FAMILIES`` with its ``predict_proba``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from common import trees

Arrays = Mapping[str, np.ndarray]


def _sigmoid(eta: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * eta))  # stable for large |eta|


def standardise(arrays: Arrays, x: np.ndarray) -> np.ndarray:
    """z (n, s) of cases x (n, s) with the model's own pooled mean and scale."""
    return (np.asarray(x, dtype=np.float64) - np.asarray(arrays["mean"])) / np.asarray(arrays["scale"])


def linear_margin(arrays: Arrays, x: np.ndarray) -> np.ndarray:
    """(n,) w . z + b of a linear family."""
    w = np.asarray(arrays["linear.weight"], dtype=np.float64).reshape(-1)
    return standardise(arrays, x) @ w + float(np.asarray(arrays["linear.bias"]).reshape(-1)[0])


def linear_proba(arrays: Arrays, x: np.ndarray) -> np.ndarray:
    """(n,) sigmoid of the linear margin."""
    return _sigmoid(linear_margin(arrays, x))


def mlp_proba(arrays: Arrays, x: np.ndarray) -> np.ndarray:
    """(n,) sigmoid(v . tanh(W z + a) + c) of the one-hidden-layer network."""
    hidden = np.tanh(standardise(arrays, x) @ np.asarray(arrays["hidden.weight"]).T + np.asarray(arrays["hidden.bias"]))
    out = hidden @ np.asarray(arrays["output.weight"]).reshape(-1) + float(np.asarray(arrays["output.bias"])[0])
    return _sigmoid(out)


@dataclass(frozen=True)
class Family:
    """One model family: its arrays' names, how it scores cases, and how it is fitted (in words, for the card)."""

    name: str
    predict_proba: Callable[[Arrays, np.ndarray], np.ndarray]  # (arrays, x (n, s)) -> (n,) score in [0, 1]
    keys: tuple[str, ...]  # the arrays a model of this family holds
    linear: bool  # a weight per standardised feature: plain-language drivers (common.explain) apply
    fitted_by: str
    calibrated: bool = True  # the score is meant as a probability of HGG


LINEAR_KEYS = ("mean", "scale", "linear.weight", "linear.bias")
MLP_KEYS = ("mean", "scale", "hidden.weight", "hidden.bias", "output.weight", "output.bias")
TREE_KEYS = ("mean", "scale", "edges", "base", "trees", "feature", "split", "leaf")  # common/trees.py

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("logistic-l2", linear_proba, LINEAR_KEYS, True,
           "class-weighted logistic regression, L2 penalty: FedAvg rounds or the exact pooled fit by federated "
           "Newton steps (run config training)"),
    Family("logistic-l1", linear_proba, LINEAR_KEYS, True,
           "class-weighted logistic regression, L1 (LASSO) penalty model-l1 plus exact-l2: the exact pooled fit by "
           "federated proximal-Newton steps"),
    Family("svm", linear_proba, LINEAR_KEYS, True,
           "linear SVM, class-weighted squared hinge + L2 (weight-decay): FedAvg rounds of full-batch gradient "
           "steps; score = sigmoid(margin), not calibrated", calibrated=False),
    Family("mlp", mlp_proba, MLP_KEYS, False,
           "one hidden layer of mlp-hidden tanh units, class-weighted log loss + weight-decay: FedAvg rounds "
           "(torch), initial weights from split-seed"),
    Family("gbt", trees.predict_proba, TREE_KEYS, False,
           "gradient-boosted trees (logistic loss): tree-rounds trees of depth tree-depth grown level by level from "
           "the sites' summed gradient/hessian histograms over the tree-bins agreed bins, each site's release blocks "
           "routed whole (docs/privacy.md, section 1b)"),
)}


class FamilyError(ValueError):
    """A family name or a model's arrays radfed does not know; the message names it and what is known."""


# With model-covariates, the run also fits the reference family on part of the inputs, for the comparison:
# "<family>:radiomics-only" and "<family>:clinical-only" (a variant scores and trains as its family).
VARIANTS = ("radiomics-only", "clinical-only")


def base(name: str) -> str:
    """A model's family: ``logistic-l2:radiomics-only`` -> ``logistic-l2``."""
    return name.split(":", 1)[0]


def family(name: str) -> Family:
    if base(name) not in FAMILIES or (":" in name and name.split(":", 1)[1] not in VARIANTS):
        raise FamilyError(f"unknown model family {name!r}: radfed knows {', '.join(FAMILIES)}")
    return FAMILIES[base(name)]


def widen(arrays: Arrays, names: list[str], full: list[str]) -> Arrays:
    """A model on ``names`` as the same model on the inputs ``full`` (a superset): the inputs it does not take get
    weight 0 (mean 0, scale 1), so it scores cases x (n, len(full)) exactly as before on their ``names`` columns."""
    cols = [full.index(n) for n in names]
    out = dict(arrays)
    for key, fill in (("mean", 0.0), ("scale", 1.0)):
        out[key] = np.full(len(full), fill)
        out[key][cols] = np.asarray(arrays[key]).reshape(-1)
    for key in ("linear.weight", "hidden.weight"):
        if key in arrays:
            w = np.asarray(arrays[key])
            out[key] = np.zeros((w.shape[0], len(full)))
            out[key][:, cols] = w
    return out


def parse_models(text: str) -> list[str]:
    """The ``models`` run-config list ("logistic-l2,svm"): known names, each once, in the order given."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise FamilyError(f"models is empty: name at least one of {', '.join(FAMILIES)}")
    for name in names:
        if ":" in name:
            raise FamilyError(f"models names {name!r}: list families only ({', '.join(FAMILIES)}); the "
                              "radiomics-only and clinical-only variants come with model-covariates")
        family(name)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise FamilyError(f"models names {', '.join(twice)} more than once: list each family once")
    return names


def predict_proba(name: str, arrays: Arrays, x: np.ndarray) -> np.ndarray:
    """(n,) score of cases x (n, s) by a model of family ``name``; refuses arrays that are not that family's."""
    fam = family(name)
    missing = [k for k in fam.keys if k not in arrays]
    if missing:
        raise FamilyError(f"a {name} model needs arrays {', '.join(missing)}, which these arrays lack")
    return fam.predict_proba(arrays, x)


# ---- the linear SVM's local training (FedAvg): full-batch gradient steps on the class-weighted squared hinge


def svm_loss_grad(w: np.ndarray, b: float, z: np.ndarray, y: np.ndarray, pos_weight: float,
                  weight_decay: float) -> tuple[float, np.ndarray, float]:
    """Mean class-weighted squared hinge over cases z (n, s), labels y (n,) in {0, 1}, plus (weight_decay / 2)|w|^2;
    returns (loss, d/dw (s,), d/db). With targets t = 2y - 1: mean_i c_i max(0, 1 - t_i f_i)^2."""
    t = 2.0 * y - 1.0
    c = np.where(y == 1, pos_weight, 1.0)
    slack = np.maximum(0.0, 1.0 - t * (z @ w + b))
    n = len(y)
    loss = float(np.sum(c * slack**2) / n + 0.5 * weight_decay * w @ w)
    coef = -2.0 * c * slack * t / n
    return loss, z.T @ coef + weight_decay * w, float(np.sum(coef))


def svm_train_local(arrays: Arrays, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, weight_decay: float,
                    pos_weight: float) -> tuple[dict[str, np.ndarray], float]:
    """``epochs`` full-batch gradient steps from the global model; returns the new arrays and the mean loss.
    One epoch at every site, averaged by case counts (FedAvg), is exactly one gradient step on the pooled
    objective, so the rounds converge to the pooled fit."""
    z = standardise(arrays, x)
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(arrays["linear.weight"], dtype=np.float64).reshape(-1).copy()
    b = float(np.asarray(arrays["linear.bias"]).reshape(-1)[0])
    loss = float("nan")
    for _ in range(epochs):
        loss, gw, gb = svm_loss_grad(w, b, z, y, pos_weight, weight_decay)
        w, b = w - lr * gw, b - lr * gb
    out = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    out["linear.weight"], out["linear.bias"] = w.reshape(1, -1), np.array([b])
    return out, loss
