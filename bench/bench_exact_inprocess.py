"""Exact federated logistic regression (Newton on summed site gradients/Hessians) vs FedAvg vs sklearn pooled.

    python bench/bench_exact_inprocess.py [--l2 1.0] [--l1 2.0] [--seed 0]

In one process, on seeded synthetic features shaped like the demo after selection: 4 unequal sites
(52/38/46/34 training cases, different class balances and scanner shifts), d = 30 correlated features, a
held-out set per site. Prints, per method: rounds, wall time, max |coefficient - sklearn pooled| and held-out
AUC (n-weighted mean of site AUCs, as the federation reports it).

FedAvg is the app's: per round every site runs ``common.model.train_local`` (5 full-batch epochs, lr 0.05) from
the global model and the server averages weighted by n, 20 rounds. Penalty mapping: torch's ``weight_decay``
adds lambda * w to the gradient of the MEAN loss, i.e. it minimises (1/N) [sum loss + (N lambda / 2) ||w||^2];
the n-weighted average of the site gradients is the gradient of that over the federation's N cases. So
``weight_decay = l2 / N`` is the same objective as exact mode's l2 on the summed loss (l2 = N * weight_decay:
the app's default weight-decay 0.001 on ~170 cases is l2 ~ 0.17).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sklearn.linear_model import LogisticRegression  # noqa: E402

from bench.table import print_table  # noqa: E402
from common import exact, metrics, moments  # noqa: E402
from common.model import build_model, model_from_state, predict_proba, train_local  # noqa: E402

# training cases (HGG, BM) per site, as the demo's hospitals; held-out sets are half as large
SITES = ((30, 22), (15, 23), (28, 18), (14, 20))
D = 30


def make_data(seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
    """Per site (x (n, D), y (n,)) for training and held-out: correlated features, 6 informative, site shifts."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(0.0, 1.0, (D, D)) / np.sqrt(D) + np.eye(D)  # correlated, like radiomics features
    effect = np.zeros(D)
    effect[:6] = rng.normal(0.0, 0.6, 6)
    train, test = [], []
    for n_hgg, n_bm in SITES:
        shift, gain = rng.normal(0.0, 0.3, D), rng.uniform(0.8, 1.25, D)  # the scanner

        def draw(n_pos: int, n_neg: int, shift=shift, gain=gain) -> tuple[np.ndarray, np.ndarray]:
            y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
            latent = rng.normal(0.0, 1.0, (len(y), D)) + np.outer(y - 0.5, effect)
            return (latent @ mixing) * gain + shift + 50.0, y

        train.append(draw(n_hgg, n_bm))
        test.append(draw(max(n_hgg // 2, 5), max(n_bm // 2, 5)))
    return train, test


def held_out_auc(predict, test: list[tuple[np.ndarray, np.ndarray]]) -> float:
    records = [{**metrics.confusion_counts(y, predict(x)), "auc": metrics.roc_auc(y, predict(x)), "n": len(y)}
               for x, y in test]
    return metrics.combine_sites(records)["auc"]


def sklearn_pooled(z: np.ndarray, y: np.ndarray, pos_weight: float, l2: float, l1: float) -> np.ndarray:
    """[b, w...] from sklearn on the pooled data; C and l1_ratio map its C*sum(loss) + penalty onto ours."""
    common = {"class_weight": {0: 1.0, 1: pos_weight}, "fit_intercept": True}
    if l1 == 0:
        model = LogisticRegression(C=1.0 / l2, solver="newton-cholesky", tol=1e-12, max_iter=10_000, **common)
    else:
        model = LogisticRegression(C=1.0 / (l1 + l2), l1_ratio=l1 / (l1 + l2), solver="saga", tol=1e-14,
                                   max_iter=200_000, **common)
    model.fit(z, y)
    return np.concatenate([model.intercept_, model.coef_.ravel()])


def fedavg(train: list[tuple[np.ndarray, np.ndarray]], mean: np.ndarray, scale: np.ndarray, pos_weight: float,
           weight_decay: float, rounds: int = 20, epochs: int = 5, lr: float = 0.05) -> dict[str, torch.Tensor]:
    """The app's FedAvg in one process: local train_local from the global state, n-weighted average."""
    state = build_model(mean, scale).state_dict()
    total = sum(len(y) for _, y in train)
    for _ in range(rounds):
        updates = []
        for x, y in train:
            trained, _ = train_local({k: v.numpy() for k, v in state.items()}, x, y, epochs=epochs, lr=lr,
                                     weight_decay=weight_decay, pos_weight=pos_weight)
            updates.append((len(y), {k: torch.from_numpy(v) for k, v in trained.items()}))
        state = {k: sum(n * s[k] for n, s in updates) / total for k in state}
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--l2", type=float, default=1.0, help="L2 on the summed loss (weights only)")
    parser.add_argument("--l1", type=float, default=2.0, help="L1 for the exact+L1 row (elastic net with --l2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend (seconds per run on a loaded machine)

    train, test = make_data(args.seed)
    mean, std = moments.pooled_mean_std(*zip(*(moments.site_moments(x) for x, _ in train), strict=True))
    scale = np.where(std <= 1e-9 * np.maximum(1.0, np.abs(mean)), 1.0, std)
    sites = [((x - mean) / scale, y) for x, y in train]
    z, y = np.vstack([s[0] for s in sites]), np.concatenate([s[1] for s in sites])
    n_total = len(y)
    pos_weight = float((y == 0).sum() / (y == 1).sum())

    def scorer(coef: np.ndarray):
        return lambda x: 1.0 / (1.0 + np.exp(-(coef[0] + ((x - mean) / scale) @ coef[1:])))

    rows: list[tuple[str, str]] = [
        ("sites (training cases)", " / ".join(str(len(s[1])) for s in sites) + f" = {n_total}"),
        ("features d", str(D)),
        ("l2 (summed loss) / FedAvg weight_decay = l2/N", f"{args.l2:g} / {args.l2 / n_total:.5g}"),
        ("l1 (exact+L1 row)", f"{args.l1:g}"),
    ]
    for label, l1 in (("sklearn pooled (L2)", 0.0), (f"sklearn pooled (L1 {args.l1:g} + L2)", args.l1)):
        t = time.perf_counter()
        coef = sklearn_pooled(z, y, pos_weight, args.l2, l1)
        rows += [(f"{label}: wall time", f"{(time.perf_counter() - t) * 1e3:.1f} ms"),
                 (f"{label}: held-out AUC", f"{held_out_auc(scorer(coef), test):.4f}")]
    reference = {0.0: sklearn_pooled(z, y, pos_weight, args.l2, 0.0),
                 args.l1: sklearn_pooled(z, y, pos_weight, args.l2, args.l1)}

    for label, l1 in (("exact (L2)", 0.0), ("exact+L1", args.l1)):
        t = time.perf_counter()
        fit = exact.fit_exact(sites, pos_weight, args.l2, l1)
        wall = time.perf_counter() - t
        state = "converged" if fit.converged else "NOT converged"
        rows += [(f"{label}: rounds to converge", f"{fit.rounds} ({state})"),
                 (f"{label}: wall time", f"{wall * 1e3:.1f} ms"),
                 (f"{label}: max abs coef diff to sklearn pooled", f"{np.abs(fit.coef - reference[l1]).max():.2e}"),
                 (f"{label}: held-out AUC", f"{held_out_auc(scorer(fit.coef), test):.4f}")]
        if l1:
            rows.append((f"{label}: weights exactly 0", f"{int(np.sum(fit.weights == 0))} of {D}"))

    # warm torch up (its first backward pass costs seconds) so the timing is of the rounds themselves
    train_local({k: v.numpy() for k, v in build_model(mean, scale).state_dict().items()}, *train[0], epochs=1, lr=0.0,
                weight_decay=0.0, pos_weight=pos_weight)
    t = time.perf_counter()
    state = fedavg(train, mean, scale, pos_weight, weight_decay=args.l2 / n_total)
    wall = time.perf_counter() - t
    coef, _, _ = exact.from_state_dict(state)
    net = model_from_state(state)
    rows += [("FedAvg 20 x 5 epochs: rounds", "20 (fixed)"),
             ("FedAvg 20 x 5 epochs: wall time", f"{wall * 1e3:.1f} ms"),
             ("FedAvg 20 x 5 epochs: max abs coef diff to sklearn pooled (L2)",
              f"{np.abs(coef - reference[0.0]).max():.2e}"),
             ("FedAvg 20 x 5 epochs: held-out AUC", f"{held_out_auc(lambda x: predict_proba(net, x), test):.4f}")]
    print_table("Exact federated logistic regression vs FedAvg vs pooled sklearn (in-process, synthetic)", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
