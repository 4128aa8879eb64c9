"""Exact federated logistic regression vs FedAvg vs the pooled fit, on the default demo. Prints one table.

    python bench/bench_exact.py [--work DIR] [--features 10]

Both federations harmonise with ComBat and select the same features (selection comes before training;
``--features`` stays small enough for exact mode: every site needs more than 2 x (features + 1) training
cases). The reference is scikit-learn's LogisticRegression on the pooled harmonised training splits,
standardised as the model does, with the same L2 penalty and class weight (C = 1 / exact-l2).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import agreed_features, harmonizers, load_sites  # noqa: E402
from bench.demo_run import default_config, demo_sites, federate  # noqa: E402
from bench.table import print_table  # noqa: E402
from client.steps import site_matrix  # noqa: E402
from common import exact, metrics  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--features", type=int, default=10)
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-bench-"))
    site_dirs = demo_sites(work)
    common = {"select-features": args.features, "external-validation": "none"}
    runs = {}
    for mode in ("exact", "fedavg"):
        doc, wall, folder = federate(work, site_dirs, mode, training=mode, **common)
        if doc["status"] != "completed":
            print(f"{mode} federation {doc['status']}: {doc['error']}")
            return 1
        runs[mode] = (doc, wall, torch.load(folder / "model.pt", weights_only=False))

    config = {**default_config(), "data-root": str(work / "demo")}
    sites = load_sites(site_dirs, config)
    agreed = agreed_features(sites)
    fns = harmonizers(sites, agreed, config)
    names = runs["exact"][2]["features"]
    assert names == runs["fedavg"][2]["features"], "both runs select the same features"
    coef_exact, mean, scale = exact.from_state_dict(runs["exact"][2]["state_dict"])
    train = [site_matrix(d, agreed, False, names, f) for d, f in zip(sites.values(), fns, strict=True)]
    x, y = np.vstack([t[0] for t in train]), np.concatenate([t[1] for t in train])
    pos_weight = float(np.sum(y == 0) / np.sum(y == 1))
    t = time.perf_counter()
    ref = LogisticRegression(C=1.0 / float(config["exact-l2"]), class_weight={0: 1.0, 1: pos_weight},
                             solver="newton-cholesky", tol=1e-12, max_iter=1000).fit((x - mean) / scale, y)
    sk_s = time.perf_counter() - t
    ref_coef = np.r_[ref.intercept_, ref.coef_[0]]
    held = [site_matrix(d, agreed, True, names, f) for d, f in zip(sites.values(), fns, strict=True)]
    pooled_auc = metrics.combine_sites([{**metrics.confusion_counts(yh, p), "auc": metrics.roc_auc(yh, p), "n": len(yh)}
                                        for xh, yh in held for p in [ref.predict_proba((xh - mean) / scale)[:, 1]]])

    rows = [("sites / training cases / features", f"{len(sites)} / {len(y)} / {len(names)}")]
    for mode in ("exact", "fedavg"):
        doc, wall, saved = runs[mode]
        coef, _, _ = exact.from_state_dict(saved["state_dict"])
        rounds = len(doc["rounds"]) if mode == "fedavg" else len([r for r in doc["rounds"] if r["train"]["sites"]])
        label = "exact (Newton)" if mode == "exact" else (f"fedavg ({config['num-server-rounds']} rounds x "
                                                          f"{config['local-epochs']} local epochs)")
        rows += [
            (f"{label}: rounds", f"{rounds}"),
            (f"{label}: federation wall / ServerApp, s", f"{wall:.1f} / {doc['seconds']:.1f}"),
            (f"{label}: max |coef - pooled sklearn|", f"{np.max(np.abs(coef - ref_coef)):.2e}"),
            (f"{label}: held-out AUC (case-weighted)", f"{doc['final']['aggregate']['auc']:.4f}"),
        ]
    rows += [("pooled sklearn: fit s / held-out AUC", f"{sk_s:.3f} / {pooled_auc['auc']:.4f}")]
    print_table(f"radfed exact vs FedAvg vs pooled on the default demo (work folder {work})", rows)
    return 0 if np.allclose(coef_exact, ref_coef, atol=1e-6) else 1


if __name__ == "__main__":
    raise SystemExit(main())
