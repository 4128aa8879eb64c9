"""Harmonisation and selection benchmark on the default synthetic demo: prints one table.

    python bench/bench_harmonization.py [--work DIR] [--rounds N]

- d-ComBat (common.combat, the federated protocol run in process) against the reference neuroCombat on the
  pooled demo features: max abs difference on each feature's pooled-std scale.
- Site predictability: cross-validated one-vs-rest AUC of a classifier that predicts the hospital from the
  features, before and after harmonisation (goal: from > 0.9 down to <= 0.60).
- Federated held-out AUC with harmonisation on and off (two real simulated federations).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
from neuroCombat import neuroCombat
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import agreed_features, load_sites  # noqa: E402
from bench.table import print_table  # noqa: E402
from common import combat  # noqa: E402
from common.metrics import roc_auc  # noqa: E402
from radfed import synth  # noqa: E402
from radfed.cli.coordinator import approve_demo_plan, extract_one_site  # noqa: E402
from radfed.launch import run_federation  # noqa: E402


def site_predictability(xs: list[np.ndarray], harmonise: bool, seed: int = 0, **options: bool) -> float:
    """Mean one-vs-rest AUC of an L2 logistic regression predicting the site, 5-fold cross-validated.

    With ``harmonise``, d-ComBat is fitted on each fold's training cases only and every site applies its
    own parameters to its test cases, as in a real run: fitting on all cases would force each site's
    mean exactly to the grand mean and make held-out folds anti-predictive (AUC well below 0.5).
    """
    x = np.vstack(xs)
    site = np.concatenate([np.full(len(a), i) for i, a in enumerate(xs)])
    prob = np.zeros((len(x), len(xs)))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, site):
        x_train, x_test = x[train].copy(), x[test].copy()
        if harmonise:
            parts = [x_train[site[train] == i] for i in range(len(xs))]
            adjusted, params = combat.federated_combat(parts, **options)
            for i, p in enumerate(params):
                x_train[site[train] == i] = adjusted[i]
                x_test[site[test] == i] = p.apply(x_test[site[test] == i])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        prob[test] = clf.fit(x_train, site[train]).predict_proba(x_test)
    return float(np.mean([roc_auc(site == i, prob[:, i]) for i in range(len(xs))]))


def vs_neurocombat(xs: list[np.ndarray], ages: list[np.ndarray] | None = None,
                   sexes: list[np.ndarray] | None = None) -> tuple[float, int]:
    """Max |ours - neuroCombat| / pooled std over features both leave finite, and features compared; with
    ``ages`` and ``sexes`` (per site), both adjust for them (sex categorical, age continuous)."""
    pooled = np.vstack(xs)
    batch = np.concatenate([np.full(len(a), i) for i, a in enumerate(xs)])
    covars, options = pd.DataFrame({"batch": batch}), {}
    design = None
    if ages is not None and sexes is not None:
        design = [np.column_stack([s == "M", a]).astype(np.float64) for a, s in zip(ages, sexes, strict=True)]
        covars = covars.assign(age=np.concatenate(ages), sex=np.concatenate(sexes))
        options = {"categorical_cols": ["sex"], "continuous_cols": ["age"]}
    ours, _ = combat.federated_combat(xs, design)
    with contextlib.redirect_stdout(io.StringIO()):
        ref = neuroCombat(dat=pooled.T, covars=covars, batch_col="batch", **options)["data"].T
    scale = pooled.std(axis=0)
    ok = (scale > 0) & np.all(np.isfinite(ref), axis=0)
    diff = np.abs(np.vstack(ours) - ref)[:, ok] / scale[ok]
    return float(diff.max()), int(ok.sum())


def federate(work: Path, config: dict, n_sites: int, tag: str, **overrides: object) -> dict:
    out = work / f"runs-{tag}"
    run_config = {**config, "output-dir": str(out), "external-validation": "none", **overrides}
    approve_demo_plan(sorted(p for p in Path(str(config["data-root"])).iterdir() if (p / "manifest.csv").exists()),
                      run_config)
    run_federation(run_config, num_supernodes=n_sites, flwr_home=work / f"flwr-{tag}", echo=False)
    doc = json.loads(sorted(out.glob("*-run*"))[-1].joinpath("metrics.json").read_text())
    if doc["status"] != "completed":
        raise SystemExit(f"federation ({tag}) {doc['status']}: {doc['error']}")
    return doc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-bench-harm-"))
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    if args.rounds:
        config["num-server-rounds"] = args.rounds
    site_dirs = synth.make_demo(work / "demo", seed=0)
    for d in site_dirs:
        extract_one_site(str(d), "default", 2)
    config["data-root"] = str(work / "demo")

    sites = load_sites(site_dirs, config)
    names = agreed_features(sites)
    raw = [s.table.columns(names) for s in sites.values()]
    t = time.perf_counter()
    combat.federated_combat(raw)
    combat_s = time.perf_counter() - t
    max_diff, compared = vs_neurocombat(raw)
    values = []  # each site's manifest covariates, in its feature table's case order
    for site in sites.values():
        by_id = {c.case_id: c.covariates for c in site.site.cases}
        values.append([by_id[i] for i in site.table.case_ids])
    ages = [np.array([float(v["age"]) for v in site]) for site in values]
    sexes = [np.array([v["sex"] for v in site]) for site in values]
    max_diff_cov, _ = vs_neurocombat(raw, ages, sexes)
    before = site_predictability(raw, harmonise=False)
    after = {name: site_predictability(raw, harmonise=True, **opts) for name, opts in (
        ("parametric EB", {}), ("no EB", {"eb": False}), ("non-parametric EB", {"parametric": False}),
        ("mean only", {"mean_only": True}))}

    with_h = federate(work, config, len(site_dirs), "combat", harmonization="combat")
    without = federate(work, config, len(site_dirs), "none", harmonization="none")
    with_cov = federate(work, config, len(site_dirs), "covariates", harmonization="combat",
                        **{"combat-covariates": "age,sex=F|M"})

    rows = [
        ("sites / cases / features", f"{len(raw)} / {sum(len(x) for x in raw)} / {len(names)}"),
        ("d-ComBat vs neuroCombat, max abs diff (pooled-std units)", f"{max_diff:.2e} over {compared} features"),
        ("same, adjusting for age and sex", f"{max_diff_cov:.2e}"),
        ("d-ComBat in process, s", f"{combat_s:.2f}"),
        ("site predictability AUC, raw features", f"{before:.3f}"),
        *((f"site predictability AUC, after d-ComBat, {name} (fitted within folds)", f"{auc:.3f}")
          for name, auc in after.items()),
        ("federated AUC, harmonisation on", f"{with_h['final']['aggregate']['auc']:.3f}"),
        ("federated AUC, harmonisation off", f"{without['final']['aggregate']['auc']:.3f}"),
        ("federated AUC, harmonisation on with age and sex", f"{with_cov['final']['aggregate']['auc']:.3f}"),
        ("federated sens / spec, on", f"{with_h['final']['aggregate']['sensitivity']:.3f} / "
                                       f"{with_h['final']['aggregate']['specificity']:.3f}"),
        ("federated sens / spec, off", f"{without['final']['aggregate']['sensitivity']:.3f} / "
                                        f"{without['final']['aggregate']['specificity']:.3f}"),
        ("selected features (on / off)", f"{with_h['features']['n']} / {without['features']['n']}"),
    ]
    print_table(f"radfed harmonisation on the default demo (work folder {work})", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
