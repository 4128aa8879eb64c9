"""The FedAvg families (svm, mlp) of a federation run against the same family fitted on the pooled data.

    python bench/fedavg_pooled.py --work DIR [--long-rounds 1000]

``DIR`` is a ``bench/bench_families.py --work`` folder: its demo sites and its last run (``runs-families``). Each
site's training split is rebuilt here as the run saw it (its own ComBat adjustment fitted on the training splits,
the run's selected features; bench/baselines.py), then pooled in one process, which a federation never does. Per
family, the federated model (``model.pt``, every family's main-run model) is compared with:

- ``replay``: FedAvg replayed in process with the sites' own training function (client/compute.py's), the same
  initial model, rounds, local epochs, learning rate, weight decay and class weight (checks the data rebuilt here);
- ``pooled, same steps``: the same optimiser on the pooled cases, rounds x local-epochs full-batch steps from the
  same initial model (for the mlp: the pooled torch run);
- ``pooled optimum``: the svm's objective minimised by a generalised Newton method (``svm_newton``) and by
  scikit-learn's ``LinearSVC(loss="squared_hinge")``; the mlp's by scikit-learn's ``MLPClassifier`` (L-BFGS) from
  the same initial weights (a local optimum: the mlp's objective is not convex);
- ``FedAvg, long``: the in-process replay run ``--long-rounds`` rounds, to show where the rounds lead.

Tolerance: FedAvg is a gradient method stopped after a fixed budget, so the federated fit is judged by the
optimiser's own error: ``max |coef - pooled same steps|`` must not exceed ``max |pooled same steps - pooled optimum|``
(what the same budget leaves undone on the pooled data). Each row prints max |coef difference| over every trained
array (weights and biases, per standardised feature) between the federated model and the reference, and between the
reference and the pooled optimum, and the AUC difference on the pooled held-out cases.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import agreed_features, harmonizers, load_sites  # noqa: E402
from bench.table import print_columns  # noqa: E402
from client.steps import site_matrix  # noqa: E402
from common import families, metrics, mlp  # noqa: E402

Arrays = dict[str, np.ndarray]
Sets = list[tuple[np.ndarray, np.ndarray]]
TRAINED = {"svm": ("linear.weight", "linear.bias"),
           "mlp": ("hidden.weight", "hidden.bias", "output.weight", "output.bias")}
TRAIN_FN: dict[str, Callable[..., tuple[Arrays, float]]] = {"svm": families.svm_train_local, "mlp": mlp.train_local}


def rebuild(site_dirs: list[Path], config: Mapping[str, Any], features: list[str]) -> dict[str, tuple[Sets, Sets]]:
    """Per site (by name), (x, y) of its training split and of its held-out split, harmonised as in the run (ComBat
    over ``site_dirs``, the sites of the run's harmonisation, sorted by name), on ``features``."""
    sites = load_sites(sorted(site_dirs, key=lambda d: d.name), config)
    agreed = agreed_features(sites)
    fns = harmonizers(sites, agreed, config)
    return {name: (site_matrix(d, agreed, False, features, h), site_matrix(d, agreed, True, features, h))
            for (name, d), h in zip(sites.items(), fns, strict=True)}


def fedavg(name: str, initial: Arrays, sites: Sets, rounds: int, options: Mapping[str, float]) -> Arrays:
    """FedAvg in one process: every round each site's local epochs from the global model, averaged by case counts
    (flwr's FedAvg, ``weighted_by_key = "num-examples"``)."""
    model = {k: np.asarray(v, dtype=np.float64) for k, v in initial.items()}
    total = sum(len(y) for _, y in sites)
    for _ in range(rounds):
        local = [TRAIN_FN[name](model, x, y, **options)[0] for x, y in sites]
        model = {k: sum(len(y) * m[k] for m, (_, y) in zip(local, sites, strict=True)) / total for k in model}
    return model


def svm_newton(z: np.ndarray, y: np.ndarray, pos_weight: float, weight_decay: float, tol: float = 1e-12,
               max_iter: int = 100) -> tuple[np.ndarray, float]:
    """The pooled minimiser (w, b) of common.families.svm_loss_grad's objective by generalised Newton steps (the
    squared hinge is once differentiable; its generalised Hessian sums the cases inside the margin) with
    backtracking: reaches the optimum in a few steps."""
    s = z.shape[1]
    w, b = np.zeros(s), 0.0
    c = np.where(y == 1, pos_weight, 1.0)
    t = 2.0 * y - 1.0
    design = np.column_stack([z, np.ones(len(y))])
    ridge = np.diag(np.r_[np.full(s, weight_decay), 0.0])
    for _ in range(max_iter):
        loss, gw, gb = families.svm_loss_grad(w, b, z, y, pos_weight, weight_decay)
        active = (1.0 - t * (z @ w + b)) > 0
        hess = 2.0 / len(y) * (design[active] * c[active, None]).T @ design[active] + ridge
        step = np.linalg.solve(hess + 1e-12 * np.eye(s + 1), np.r_[gw, gb])
        scale = 1.0
        while scale > 1e-10:
            trial = families.svm_loss_grad(w - scale * step[:s], b - scale * step[s], z, y, pos_weight, weight_decay)
            if trial[0] <= loss - 1e-4 * scale * float(np.r_[gw, gb] @ step):
                break
            scale /= 2
        w, b = w - scale * step[:s], b - scale * step[s]
        if np.max(np.abs(scale * step)) < tol:
            break
    return w, b


def svm_sklearn(z: np.ndarray, y: np.ndarray, pos_weight: float, weight_decay: float) -> tuple[np.ndarray, float]:
    """LinearSVC on the same objective: (1/n) sum c_i hinge_i^2 + (wd/2)|w|^2 is (wd) x [(1/2)|w|^2 + C sum c_i
    hinge_i^2] with C = 1 / (n wd); a large intercept_scaling leaves the intercept (nearly) unpenalised."""
    from sklearn.svm import LinearSVC

    fit = LinearSVC(loss="squared_hinge", C=1.0 / (len(y) * weight_decay), class_weight={0: 1.0, 1: pos_weight},
                    dual=False, tol=1e-8, max_iter=100_000, intercept_scaling=1e3).fit(z, y)
    return fit.coef_.ravel(), float(fit.intercept_[0])


def mlp_sklearn(initial: Arrays, z: np.ndarray, y: np.ndarray, pos_weight: float, weight_decay: float) -> Arrays:
    """MLPClassifier (tanh, L-BFGS) from the same initial weights on the same objective: its loss is the
    sample-weighted mean log loss + (alpha / 2) |W|^2 / sum(weights); ours is (1/n) sum c_i loss_i + (wd/2)|W|^2,
    the same up to the factor n / sum(c) when alpha = wd n."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    hidden = initial["hidden.weight"].shape[0]
    net = MLPClassifier((hidden,), activation="tanh", solver="lbfgs", alpha=weight_decay * len(y), max_iter=1,
                        tol=1e-12, warm_start=True, random_state=0)
    weights = np.where(y == 1, pos_weight, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        net.fit(z, y, sample_weight=weights)  # builds the layers; then start again from our initial weights
        net.coefs_ = [initial["hidden.weight"].T.copy(), initial["output.weight"].T.copy()]
        net.intercepts_ = [initial["hidden.bias"].copy(), initial["output.bias"].copy()]
        net.max_iter = 20_000
        net.fit(z, y, sample_weight=weights)
    return {**initial, "hidden.weight": net.coefs_[0].T, "hidden.bias": net.intercepts_[0],
            "output.weight": net.coefs_[1].T, "output.bias": net.intercepts_[1]}


def _max_diff(name: str, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k]).reshape(-1) - np.asarray(b[k]).reshape(-1))))
               for k in TRAINED[name])


def compare(folder: Path, site_dirs: list[Path], long_rounds: int = 1000) -> list[list[str]]:
    """The table's rows for every FedAvg family of the run in ``folder``."""
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    config = doc["config"]
    saved = torch.load(folder / "model.pt", weights_only=False)
    models = saved.get("models") or {saved["family"]: saved["state_dict"]}
    # a site can leave after the harmonisation, moments and selection (e.g. too few cases for exact training): its
    # cases then shaped ComBat, the standardisation and the class weight, but trained nothing
    harmonised = {s for s, c in doc["sites"].items() if c.get("split")}
    rebuilt = rebuild([d for d in site_dirs if d.name in harmonised], config, saved["features"])
    train = [rebuilt[s][0] for s in sorted(doc["final"]["sites"])]
    test = [rebuilt[s][1] for s in sorted(doc["final"]["sites"])]
    x, y = np.vstack([s[0] for s in train]), np.concatenate([s[1] for s in train])
    x_test, y_test = np.vstack([s[0] for s in test]), np.concatenate([s[1] for s in test])
    y_all = np.concatenate([rebuilt[s][0][1] for s in rebuilt])
    pos_weight = float(np.sum(y_all == 0) / np.sum(y_all == 1))  # the cohort's, as server.pipeline.fit sets it
    rounds, epochs = int(config["num-server-rounds"]), int(config["local-epochs"])
    options = {"epochs": epochs, "lr": float(config["learning-rate"]), "weight_decay": float(config["weight-decay"]),
               "pos_weight": pos_weight}
    rows = []
    for name in (n for n in models if n in TRAINED):
        fed = {k: v.numpy() for k, v in models[name].items()}
        if name == "mlp":
            initial = mlp.initial_arrays(fed["mean"], fed["scale"], fed["hidden.weight"].shape[0],
                                         int(config["split-seed"]))
        else:
            initial = {**fed, "linear.weight": np.zeros_like(fed["linear.weight"]), "linear.bias": np.zeros(1)}
        z = families.standardise(fed, x)
        same = TRAIN_FN[name](initial, x, y, **{**options, "epochs": rounds * epochs})[0]
        if name == "svm":
            optima = {"pooled optimum (generalised Newton)": svm_newton(z, y, pos_weight, options["weight_decay"]),
                      "pooled optimum (sklearn LinearSVC)": svm_sklearn(z, y, pos_weight, options["weight_decay"])}
            optimum = {k: {**fed, "linear.weight": w.reshape(1, -1), "linear.bias": np.array([b])}
                       for k, (w, b) in optima.items()}
        else:
            optimum = {"pooled optimum (sklearn MLPClassifier, same start)":
                       mlp_sklearn(initial, z, y, pos_weight, options["weight_decay"])}
        best = next(iter(optimum.values()))
        tolerance = _max_diff(name, same, best)
        auc = metrics.roc_auc(y_test, families.predict_proba(name, fed, x_test))
        references = {"replay (in process)": fedavg(name, initial, train, rounds, options),
                      f"pooled, same steps ({rounds} x {epochs})": same, **optimum,
                      f"FedAvg, long ({long_rounds} rounds)": fedavg(name, initial, train, long_rounds, options)}
        for label, ref in references.items():
            diff = _max_diff(name, fed, ref)
            ref_auc = metrics.roc_auc(y_test, families.predict_proba(name, ref, x_test))
            verdict = ("yes" if diff <= tolerance else "NO") if label.startswith("pooled, same") else ""
            rows.append([name, label, f"{diff:.2e}", f"{auc - ref_auc:+.4f}", f"{_max_diff(name, ref, best):.2e}",
                         f"{tolerance:.2e}", verdict])
    return rows


def print_table(rows: list[list[str]]) -> None:
    print_columns("FedAvg families, federated vs pooled (max |difference| over every trained weight and bias, per "
                  "standardised feature; AUC on the pooled held-out cases; pooled optimum = the first listed; "
                  "tolerance = max |pooled same steps - pooled optimum|, what the optimiser's budget leaves undone)",
                  ["family", "reference", "max |federated - reference|", "AUC diff (federated - reference)",
                   "max |reference - pooled optimum|", "tolerance", "within tolerance"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", required=True, help="a bench/bench_families.py --work folder")
    parser.add_argument("--long-rounds", type=int, default=1000)
    args = parser.parse_args()
    work = Path(args.work)
    folder = sorted((work / "runs-families").glob("*-run*"))[-1]
    site_dirs = sorted(p.parent for p in (work / "demo").glob("*/manifest.csv"))
    print_table(compare(folder, site_dirs, args.long_rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
